"""Samples on disk: a TFDS builder from local files, and its reader (no TensorFlow needed).

``prepare`` runs the ``ReczeroSamples`` builder (``tfds.core.GeneratorBasedBuilder``) over a local
source and writes ``array_record`` splits; tensorflow-datasets 4.9 builds and reads these without
TensorFlow (its example serialiser and ``tfds.data_source`` are pure Python over array_record).
Layout::

    OUT/reczero_samples/<dataset, e.g. movielens_100k>/1.0.0/
        dataset_info.json, features.json, metadata.json (the read/sample report and the options),
        reczero_samples-<split>.array_record-0000N-of-0000M

Any of ``tfds.data_source("reczero_samples/movielens_100k", data_dir=OUT)``,
``tfds.builder_from_directory(VERSION_DIR).as_data_source(split)`` or ``load_split(OUT, split)``
(which decodes records back into sample dicts) reads it.

The ids, rating and timestamp are typed features; ``item``, ``user_history``, ``item_history`` and
the two averages are stored together as one JSON string ``context`` (TFDS features have no ragged
list-of-dicts type, and tf.Example floats are float32) and decoded by ``load_split``. Records are
written in time order (``disable_shuffling``), so a split reads back in the order
``samples.build_samples`` produced it; empty splits are not written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from reczero_jax.data.samples import SPLITS, SampleConfig, SampleSet, build_samples
from reczero_jax.data.sources import DATASETS, DataError, read_source

BUILDER_NAME = "reczero_samples"
SCALAR_FIELDS = {
    "user_id": tfds.features.Text(),
    "item_id": tfds.features.Text(),
    "rating": np.int32,
    "timestamp": np.int64,
}
TFDS_LOG = logging.getLogger("tensorflow_datasets")
READ_CHUNK = 256  # records per batched array_record read when iterating a split


def config_name(dataset: str) -> str:
    """TFDS config name of a dataset: "movielens-100k" -> "movielens_100k"."""
    return dataset.replace("-", "_")


@dataclasses.dataclass(eq=False)
class SourceConfig(tfds.core.BuilderConfig):
    """Where the raw data is and how to turn it into samples (see ``sources.read_source`` and
    ``samples.SampleConfig``). ``name`` is ``config_name(dataset)``."""

    dataset: str = "movielens-100k"
    source: str | None = None
    meta: str | None = None
    on_error: str = "skip"
    allow_pickle: bool = False
    samples: SampleConfig = dataclasses.field(default_factory=SampleConfig)

    @classmethod
    def for_dataset(cls, dataset: str, **options: Any) -> SourceConfig:
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}")
        return cls(name=config_name(dataset), dataset=dataset, **options)

    def options(self) -> dict[str, Any]:
        """The options that decide the output, as JSON (stored in metadata.json)."""
        samples = dataclasses.asdict(self.samples)
        samples["max_samples"] = dict(self.samples.max_samples)
        source = str(Path(self.source).resolve()) if self.source else None
        meta = str(Path(self.meta).resolve()) if self.meta else None
        return {"dataset": self.dataset, "source": source, "meta": meta,
                "on_error": self.on_error, "samples": samples}  # fmt: skip


class ReczeroSamples(tfds.core.GeneratorBasedBuilder):
    """Think-before-Recommendation samples (``samples`` module) from a local rating dataset."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Samples with user/item histories, chronological splits."}
    # TFDS looks for a download-checksums file next to the builder's code; resolving that path
    # for a builder inside an installed package needs the `importlib_resources` backport, which
    # tensorflow-datasets 4.9.10 uses but does not declare on Python >= 3.9 (tensorflow/datasets
    # issue 11212). This builder downloads nothing, so it has no checksums file: no code path.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        features = {**SCALAR_FIELDS, "context": tfds.features.Text()}
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        config: SourceConfig = self.builder_config
        table = read_source(
            config.dataset,
            config.source,
            on_error=config.on_error,
            meta=config.meta,
            allow_pickle=config.allow_pickle,
        )
        sample_set = build_samples(table, config.samples)
        report = sample_set.report()
        self.info.metadata["report"] = report
        self.info.metadata["options"] = config.options()
        written = [name for name in SPLITS if sample_set.splits[name]]
        if not written:
            raise DataError(
                f"no sample survived for {config.dataset}: {json.dumps(report, indent=1)}"
            )
        return {name: self._generate_examples(sample_set, name) for name in written}

    def _generate_examples(self, sample_set: SampleSet, split: str):
        encode = RecordEncoder(sample_set)
        for position, k in enumerate(sample_set.splits[split]):
            yield position, encode(k)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class RecordEncoder:
    """Target interaction -> TFDS features: the scalars, and ``context``, one JSON object of
    item, user_history, item_history, user_avg_rating and item_avg_rating (tf.Example holds
    floats as float32; JSON keeps the float64 means exact). ``dataset`` and ``split`` are not
    stored: the directory and the split file say them. An interaction appears in up to
    2 * history_len histories, so each history entry is serialised once and its JSON reused
    (``decode_record`` of the result equals ``SampleSet.sample``, which the tests check)."""

    def __init__(self, sample_set: SampleSet):
        self.sample_set = sample_set
        self._user_entries: dict[int, str] = {}
        self._item_entries: dict[int, str] = {}

    def _entries(self, indices: list[int], cache: dict[int, str], build) -> str:
        for j in indices:
            if j not in cache:
                cache[j] = _json(build(j))
        return ",".join(cache[j] for j in indices)

    def __call__(self, k: int) -> dict[str, Any]:
        interaction = self.sample_set.index.table.interactions[k]
        parts = self.sample_set.parts(k)
        user_history = self._entries(
            parts.user_history, self._user_entries, self.sample_set.user_entry
        )
        item_history = self._entries(
            parts.item_history, self._item_entries, self.sample_set.item_entry
        )
        context = (
            f'{{"item":{_json(self.sample_set.index.table.items[interaction.item_id])},'
            f'"user_history":[{user_history}],"item_history":[{item_history}],'
            f'"user_avg_rating":{_json(parts.user_avg_rating)},'
            f'"item_avg_rating":{_json(parts.item_avg_rating)}}}'
        )
        return {
            "user_id": interaction.user_id,
            "item_id": interaction.item_id,
            "rating": interaction.rating,
            "timestamp": interaction.timestamp,
            "context": context,
        }


def decode_record(record: dict[str, Any], dataset: str, split: str) -> dict[str, Any]:
    """A stored record back to the sample dict (``samples`` module docstring)."""
    return {
        "user_id": record["user_id"].decode("utf-8"),
        "item_id": record["item_id"].decode("utf-8"),
        "rating": int(record["rating"]),
        "timestamp": int(record["timestamp"]),
        **json.loads(record["context"]),
        "dataset": dataset,
        "split": split,
    }


# ----------------------------------------------------------------------------- writing


def prepare(
    config: SourceConfig, out_dir: str | Path, *, overwrite: bool = False,
    builder_class: type[tfds.core.GeneratorBasedBuilder] | None = None,
) -> tuple[Path, bool]:
    """Build the dataset under ``out_dir``; returns (its version directory, whether an existing
    build was reused). ``builder_class`` (default ``ReczeroSamples``) must take ``config``.

    An existing build with the same options is reused; one with other options is an error unless
    ``overwrite`` (then it is rebuilt).
    """
    builder = (builder_class or ReczeroSamples)(config=config, data_dir=str(out_dir),
                                                file_format="array_record")
    version_dir = Path(builder.data_dir)
    reused = (version_dir / "dataset_info.json").exists() and not overwrite
    if reused:
        stored = load_metadata(version_dir).get("options")
        if stored != config.options():
            raise FileExistsError(
                f"{version_dir} already holds {builder.name} samples prepared with other options "
                f"({stored}); pass --overwrite (overwrite=True) to rebuild it, or another --out"
            )
    mode = (
        tfds.download.GenerateMode.FORCE_REDOWNLOAD
        if overwrite
        else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    )
    # TFDS prints "Downloading and preparing ..." / "... prepared to" on stdout and draws its own
    # progress bars (splits, shuffling): its prints go to its logger (``library_logs``' file
    # under the CLI), its bars are off; the source reader's progress bar stays.
    printed = io.StringIO()
    tfds.disable_progress_bar()
    try:
        with contextlib.redirect_stdout(printed):
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(download_mode=mode))
    finally:
        tfds.enable_progress_bar()
        for line in printed.getvalue().splitlines():
            TFDS_LOG.info(line)
    return version_dir, reused


# ----------------------------------------------------------------------------- reading


def find_prepared(directory: str | Path) -> Path:
    """The version directory (holding dataset_info.json) at or below ``directory``."""
    directory = Path(directory)
    if (directory / "dataset_info.json").is_file():
        return directory
    found = sorted(path.parent for path in directory.glob("**/dataset_info.json"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(
            f"no prepared dataset under {directory}: run `reczero data prepare --out {directory}`"
        )
    raise ValueError(
        f"{directory} holds {len(found)} prepared datasets; pass one of: "
        + ", ".join(str(path) for path in found)
    )


def load_metadata(directory: str | Path) -> dict[str, Any]:
    """metadata.json of a prepared dataset: {"report": ..., "options": ...}."""
    path = find_prepared(directory) / "metadata.json"
    return json.loads(path.read_text()) if path.is_file() else {}


class SplitSource(Sequence):
    """One split of a prepared dataset as a random-access sequence of sample dicts (a grain
    data source): ``len``, ``source[i]``, ``source.__getitems__(indices)``, iteration."""

    def __init__(self, directory: str | Path, split: str):
        version_dir = find_prepared(directory)
        builder = tfds.builder_from_directory(str(version_dir))
        if split not in builder.info.splits:
            raise ValueError(
                f"split {split!r} not in {version_dir} (it has {sorted(builder.info.splits)}; "
                "an empty split is not written)"
            )
        self.dataset = load_metadata(version_dir)["options"]["dataset"]
        self.split = split
        self._records = builder.as_data_source(split=split)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        return decode_record(self._records[index % len(self)], self.dataset, self.split)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        records = self._records.__getitems__(list(indices))
        return [decode_record(record, self.dataset, self.split) for record in records]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for start in range(0, len(self), READ_CHUNK):
            yield from self.__getitems__(range(start, min(start + READ_CHUNK, len(self))))


def load_split(directory: str | Path, split: str) -> SplitSource:
    """The sample dicts of ``split`` ("train" | "validation" | "test") of the dataset prepared
    under ``directory`` (the ``--out`` directory or its version directory)."""
    return SplitSource(directory, split)
