"""The authors' verl parquet files -> sample records per split (``read_verl_parquet``).

Their rows are ready prompts, not interactions: they become samples directly
(``reczero_jax.data.verl`` writes them as TFDS splits), with no histories to build. Bad rows are
skipped and counted in the same ``ReadReport`` as the interaction sources'.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reczero_jax.data.sources.common import (
    RATING_SCALE,
    DataError,
    ReadReport,
    Skip,
    parse_rating,
    parse_timestamp,
    require_file,
)
from reczero_jax.prompts import FORMAT_KEY, PROMPT_FORMATS, messages_format

VERL_DATASET = "verl-parquet"
VERL_REQUIRED = ("prompt", "reward_model")  # data_source, ability, extra_info are optional
CHAT_ROLES = ("system", "user", "assistant")
# The fallback prediction for an unparseable answer is the user's average rating. A row that
# gives no average (neither a column, nor extra_info, nor its prompt text) gets the midpoint of
# the rating scale, the constant prediction that is never off by more than 2.
DEFAULT_AVG_RATING = (RATING_SCALE[0] + RATING_SCALE[1]) / 2
# Where a row may state its averages, in order: extra_info keys, then top-level columns (the
# authors' later scripts write user_avg / item_avg columns), then the prompt's own field.
AVG_KEYS = {
    "user_avg_rating": ("user_avg_rating", "user_avg"),
    "item_avg_rating": ("item_avg_rating", "target_item_avg_rating", "item_avg"),
}
AVG_IN_PROMPT = {
    name: re.compile(rf"(?<![A-Za-z_]){field}:\s*([0-9]+(?:\.[0-9]+)?)")
    for name, field in (("user_avg_rating", "user_avg_rating"),
                        ("item_avg_rating", "target_item_avg_rating"))
}
# --verl-prompt: "auto" renders each row as its content needs (prompts.messages_format): the
# authors' whole ChatML strings verbatim, as their verl does, plain text through the template.
VERL_PROMPTS = ("auto", *PROMPT_FORMATS)
FORCED_NOTES = {  # a forced format that is not the one the content needs, counted per row
    "verbatim": "plain-text prompt used verbatim (no chat turns around it)",
    "template": "ChatML prompt rendered through the chat template (its turns wrapped twice)",
}
SPLIT_WORDS = {"train": "train", "val": "validation", "valid": "validation",
               "validation": "validation", "dev": "validation", "test": "test"}


@dataclass
class VerlTable:
    """Rows of verl parquet files as sample records, per split (``samples.SPLITS`` names), in
    file and row order; ``files``: rows read per file; ``formats``: per file, kept rows by
    prompt format ("verbatim" / "template", see ``prompts.messages_format``)."""

    records: dict[str, list[dict[str, Any]]]
    report: ReadReport
    files: dict[str, int]
    formats: dict[str, dict[str, int]]


def _split_word(text: Any) -> str | None:
    """"train" / "validation" / "test" from a file stem or an extra_info.split value: the first
    word (split on ``_-. ``) that names a split, e.g. "music_train" -> train, "val" -> validation."""
    for word in re.split(r"[_\-. ]+", str(text).lower()):
        if word in SPLIT_WORDS:
            return SPLIT_WORDS[word]
    return None


def _chat_messages(value: Any) -> list[dict[str, str]]:
    """The prompt column: a non-empty list of {"role", "content"} messages."""
    if not isinstance(value, list | tuple) or not value:
        raise Skip("prompt is not a non-empty list of chat messages", f"prompt {value!r:.120}")
    messages = []
    for message in value:
        role = message.get("role") if isinstance(message, Mapping) else None
        content = message.get("content") if isinstance(message, Mapping) else None
        if role not in CHAT_ROLES or not isinstance(content, str):
            raise Skip(
                "prompt message without a role and string content",
                f"message {message!r:.120}; need {{'role': one of {CHAT_ROLES}, 'content': str}}",
            )
        if not content.strip():
            raise Skip("prompt message with empty content", f"{role} message {content!r}")
        messages.append({"role": role, "content": content})
    return messages


def _ground_truth(reward_model: Any) -> int:
    """reward_model.ground_truth as an integer rating: a number, a numeric string, or the
    authors' nested {"ground_truth": "4"}; reward_model.style, when given, must be "rule"."""
    if not isinstance(reward_model, Mapping):
        raise Skip("reward_model is not a mapping", f"reward_model {reward_model!r:.120}")
    style = reward_model.get("style")
    if style not in (None, "rule"):
        raise Skip("reward_model.style is not 'rule'", f"style {style!r} (only rule rewards)")
    truth = reward_model.get("ground_truth")
    if isinstance(truth, Mapping):
        truth = truth.get("ground_truth")
    if truth is None or (isinstance(truth, str) and not truth.strip()):
        raise Skip("no reward_model.ground_truth", f"reward_model {reward_model!r:.120}")
    return parse_rating(truth)


def _average(name: str, row: Mapping, extra: Mapping, messages, notes: list[str]) -> float:
    """The row's ``name`` average (``AVG_KEYS`` order, then the prompt text), else
    ``DEFAULT_AVG_RATING``; each fallback adds a note (counted once the row is kept)."""
    for source, label in ((extra, "extra_info"), (row, "column")):
        for key in AVG_KEYS[name]:
            value = source.get(key)
            if value is not None:
                try:
                    return float(value)
                except (TypeError, ValueError):
                    raise Skip(f"{name} is not a number", f"{label} {key} {value!r}") from None
    found = AVG_IN_PROMPT[name].findall(messages[-1]["content"])
    if found:
        notes.append(f"{name} not in the row: read from the prompt text")
        return float(found[-1])
    notes.append(f"{name} not in the row or its prompt: {DEFAULT_AVG_RATING} (scale midpoint)")
    return DEFAULT_AVG_RATING


def _prompt_format(messages: list[dict[str, str]], prompt: str, notes: list[str]) -> str:
    """The row's prompt format under ``--verl-prompt prompt`` (``VERL_PROMPTS``)."""
    needed = messages_format(messages)
    if prompt == "auto" or prompt == needed:
        return needed
    if prompt == "verbatim" and len(messages) != 1:
        raise Skip("verbatim prompt of more than one message",
                   f"{len(messages)} messages; verl takes the one message's content as is")
    notes.append(FORCED_NOTES[prompt])
    return prompt


def _verl_record(row: Mapping, file_split: str | None, prompt: str, notes: list[str]
                 ) -> dict[str, Any]:
    """One verl row -> its sample record plus "split": the scalars of every sample (ids from
    extra_info or columns, "" when absent; timestamp 0 when absent), the chat messages as
    ``prompt_messages`` with their ``prompt_format`` (``_prompt_format``), both averages, and
    data_source, ability, extra_info as given."""
    messages = _chat_messages(row.get("prompt"))
    prompt_format = _prompt_format(messages, prompt, notes)
    rating = _ground_truth(row.get("reward_model"))
    extra = row.get("extra_info")
    if extra is not None and not isinstance(extra, Mapping):
        raise Skip("extra_info is not a mapping", f"extra_info {extra!r:.120}")
    extra = extra or {}
    row_split = _split_word(extra["split"]) if extra.get("split") is not None else None
    split = file_split or row_split
    if split is None:
        raise Skip(
            "no split", "neither the file name nor extra_info.split names train/val/test: "
            "rename the file (e.g. train.parquet) or fill extra_info.split",
        )
    if file_split and row_split and row_split != file_split:
        notes.append("extra_info.split differs from the file name's split (file name used)")

    def identifier(key: str) -> str:
        value = extra.get(key, row.get(key))
        return "" if value is None else str(value).strip()

    timestamp = extra.get("timestamp", extra.get("unixReviewTime"))
    return {
        "split": split,
        "user_id": identifier("user_id"),
        "item_id": identifier("item_id"),
        "rating": rating,
        "timestamp": 0 if timestamp is None else parse_timestamp(timestamp),
        "prompt_messages": messages,
        FORMAT_KEY: prompt_format,
        "user_avg_rating": _average("user_avg_rating", row, extra, messages, notes),
        "item_avg_rating": _average("item_avg_rating", row, extra, messages, notes),
        "data_source": row.get("data_source"),
        "ability": row.get("ability"),
        "extra_info": dict(extra),
    }


def read_verl_parquet(sources: Sequence[str | Path], report: ReadReport, prompt: str = "auto"
                      ) -> VerlTable:
    """The authors' verl parquet files -> sample records per split.

    Columns: ``prompt`` (a list of chat messages; in their files one message whose content is
    the whole ChatML prompt: system turn, user turn, opened assistant turn), ``reward_model``
    ({"style": "rule", "ground_truth": rating}), and optionally ``data_source``, ``ability``,
    ``extra_info`` (a dict: split, index, maybe user/item ids, timestamp and averages) and any
    other column (e.g. ``user_avg``). A file
    without ``prompt`` or ``reward_model`` is fatal; a bad row is skipped and counted by reason.
    A row's split comes from its file's name (``train.parquet``, ``music_val.parquet``), else
    from ``extra_info.split``.

    ``prompt`` (``VERL_PROMPTS``) decides how each row's messages become its prompt: "auto"
    (default) as the content needs (``prompts.messages_format``: a whole ChatML string is used
    verbatim, as the authors' verl does; plain text goes through the chat template);
    "verbatim" / "template" force one, counting the rows whose content needs the other.
    """
    import pyarrow.parquet as pq

    if prompt not in VERL_PROMPTS:
        raise ValueError(f"verl prompt {prompt!r}: use one of {', '.join(VERL_PROMPTS)}")
    records: dict[str, list[dict[str, Any]]] = {}
    files: dict[str, int] = {}
    formats: dict[str, dict[str, int]] = {}
    for source in sources:
        path = require_file(Path(source), "verl parquet file", "pass --source FILE.parquet ...")
        try:
            table = pq.ParquetFile(path)
        except Exception as error:  # pyarrow raises several types for a file that is not parquet
            raise DataError(f"{path}: not a parquet file ({error})") from None
        missing = [c for c in VERL_REQUIRED if c not in table.schema_arrow.names]
        if missing:
            raise DataError(
                f"{path}: no column(s) {missing}; the verl layout has {list(VERL_REQUIRED)} and "
                f"optionally data_source, ability, extra_info; found {table.schema_arrow.names}"
            )
        file_split = _split_word(path.stem)
        kept = formats[str(path)] = dict.fromkeys(PROMPT_FORMATS, 0)
        number = 0
        for batch in table.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                number += 1
                report.read["rows"] += 1
                notes: list[str] = []
                try:
                    record = _verl_record(row, file_split, prompt, notes)
                except Skip as skip:
                    report.reject("rows", skip.reason, f"{path}: row {number}", skip.detail)
                    continue
                for note in notes:
                    report.clean(note)
                kept[record[FORMAT_KEY]] += 1
                records.setdefault(record.pop("split"), []).append(record)
        files[str(path)] = number
    return VerlTable(records, report, files, formats)
