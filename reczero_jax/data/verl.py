"""The authors' verl parquet files -> TFDS sample splits that ``load_split`` reads.

A verl row is a ready prompt (a list of chat messages) with its ground-truth rating, not an
interaction, so no histories are built: each kept row (``verl_parquet.read_verl_parquet``) is one
sample. Records have the scalars of every sample (user_id, item_id, rating, timestamp) and a
JSON ``context`` holding ``prompt_messages``, ``prompt_format``, ``user_avg_rating``,
``item_avg_rating``, ``data_source``, ``ability`` and ``extra_info``. ``prompts.encode_prompt``
renders ``prompt_messages`` as ``prompt_format`` says: the authors' whole ChatML strings
verbatim, tokenised as is (as their verl ``rl_dataset.py`` does), plain text through the
tokenizer's chat template; so training, evaluation and ``reczero compare`` see the identical
prompt. Layout on disk: the one of
``tfds_builder`` (``OUT/reczero_samples/verl_parquet/1.0.0/``), with the read report and the
options in ``metadata.json``.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from reczero_jax.data.samples import SPLITS
from reczero_jax.data.sources import DataError, ReadReport
from reczero_jax.data.tfds_builder import BUILDER_NAME, ReczeroSamples, config_name, prepare
from reczero_jax.data.verl_parquet import VERL_DATASET, read_verl_parquet

SCALARS = ("user_id", "item_id", "rating", "timestamp")


@dataclasses.dataclass(eq=False)
class VerlConfig(tfds.core.BuilderConfig):
    """verl parquet ``sources``; ``max_samples``: (split, n) pairs keeping a ``seed``-ed random
    n rows of a split, in file order; ``prompt``: ``verl_parquet.VERL_PROMPTS``."""

    sources: tuple[str, ...] = ()
    on_error: str = "skip"
    prompt: str = "auto"
    max_samples: tuple[tuple[str, int], ...] = ()
    seed: int = 0

    @classmethod
    def of(cls, sources, **options: Any) -> VerlConfig:
        return cls(name=config_name(VERL_DATASET), sources=tuple(map(str, sources)), **options)

    def options(self) -> dict[str, Any]:
        """The options that decide the output, as JSON (stored in metadata.json)."""
        return {"dataset": VERL_DATASET,
                "sources": [str(Path(source).resolve()) for source in self.sources],
                "on_error": self.on_error, "prompt": self.prompt,
                "max_samples": dict(self.max_samples), "seed": self.seed}  # fmt: skip


def _encode(record: dict[str, Any]) -> dict[str, Any]:
    context = {key: value for key, value in record.items() if key not in SCALARS}
    # extra_info may hold parquet types JSON lacks (timestamps, decimals): stored as text.
    return {**{key: record[key] for key in SCALARS},
            "context": json.dumps(context, ensure_ascii=False, default=str)}  # fmt: skip


class VerlSamples(ReczeroSamples, skip_registration=True):
    """``ReczeroSamples``' features and layout, filled from verl parquet rows."""

    name = BUILDER_NAME

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        config: VerlConfig = self.builder_config
        table = read_verl_parquet(config.sources, ReadReport(on_error=config.on_error),
                                  prompt=config.prompt)
        available = {split: len(table.records.get(split, [])) for split in SPLITS}
        rng = random.Random(config.seed)
        splits = {}
        for split in SPLITS:
            rows = table.records.get(split, [])
            count = dict(config.max_samples).get(split, len(rows))
            if count < len(rows):
                rows = [rows[i] for i in sorted(rng.sample(range(len(rows)), count))]
            splits[split] = rows
        report = table.report.to_dict()
        self.info.metadata["report"] = {
            "dataset": VERL_DATASET, "files": table.files, "prompt": config.prompt,
            "prompt_formats": table.formats, "rows_read": table.report.read["rows"],
            "rejected": report["rejected"], "examples": report["examples"],
            "cleaned": report["cleaned"], "samples_available": available,
            "samples": {split: len(rows) for split, rows in splits.items()},
        }  # fmt: skip
        self.info.metadata["options"] = config.options()
        if not any(splits.values()):
            raise DataError(f"no row kept from {list(config.sources)}: "
                            f"{json.dumps(self.info.metadata['report'], indent=1)}")
        return {split: self._generate(rows) for split, rows in splits.items() if rows}

    def _generate(self, rows):
        for position, record in enumerate(rows):
            yield position, _encode(record)


def prepare_verl(config: VerlConfig, out_dir: str | Path, *, overwrite: bool = False
                 ) -> tuple[Path, bool]:
    """Write the samples of ``config`` under ``out_dir``: ``tfds_builder.prepare`` with the verl
    builder (the same reuse and overwrite rules)."""
    return prepare(config, out_dir, overwrite=overwrite, builder_class=VerlSamples)
