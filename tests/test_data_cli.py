"""`reczero data prepare` end to end: TFDS array_record output, load_split, tfds.data_source
without TensorFlow, printed counts, and the errors users meet."""

import json
import logging
import random
import subprocess
import sys
from pathlib import Path

import pytest

from reczero_jax.data import load_split
from reczero_jax.data.cli import PICKLE_HELP
from reczero_jax.data.pipeline import make_pipeline
from reczero_jax.data.samples import build_samples
from reczero_jax.data.sources import read_source
from reczero_jax.data.tfds_builder import load_metadata
from tests.helpers import run_data_prepare

DATA = Path(__file__).parent / "data"


def report_lines(stdout):
    """The counts block of the output (TFDS prints its own lines around it)."""
    lines = stdout.splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith("dataset:"))
    end = next(n for n, line in enumerate(lines) if line.startswith(("written:", "reused:")))
    return lines[start:end]


@pytest.fixture(scope="module")
def tokenizer_dir(smollm2_tokenizer, tmp_path_factory):
    """SmolLM2's tokenizer saved as tokenizer.json (loads in well under a second)."""
    path = tmp_path_factory.mktemp("smollm2_tokenizer")
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory, tokenizer_dir):
    out = tmp_path_factory.mktemp("ml100k")
    status, stdout, _ = run_data_prepare(
        "--dataset", "movielens-100k", "--out", out, "--tokenizer", tokenizer_dir,
        "--length-sample", 100,
    )  # fmt: skip
    assert status == 0
    return out, stdout


@pytest.fixture(scope="module")
def ml100k_in_memory():
    return build_samples(read_source("movielens-100k"))


@pytest.mark.slow
def test_movielens_prepare_prints_counts(ml100k, ml100k_in_memory):
    out, stdout = ml100k
    report = ml100k_in_memory.report()
    assert "interactions read: 100000  kept: 100000  users: 943  items: 1682" in stdout
    assert "rejected: 0" in stdout
    splits = report["samples"]
    assert (
        f"samples (per-user split): train: {splits['train']}  validation: {splits['validation']}"
        f"  test: {splits['test']}" in stdout
    )
    for reason, count in report["targets_dropped"].items():
        assert f"  {reason}: {count}" in stdout
    lengths = json.loads(next(out.glob("**/prompt_lengths.json")).read_text())
    assert set(lengths) == {"train", "validation", "test"}
    for split, row in lengths.items():
        assert row["count"] == 100 and row["of"] == splits[split]
        assert f"  {split}: 100 of {splits[split]} prompts" in stdout
    assert load_metadata(out)["report"] == json.loads(json.dumps(report))


@pytest.mark.slow
def test_load_split_reads_back_the_samples(ml100k, ml100k_in_memory):
    out, _ = ml100k
    for split in ("validation", "test"):
        assert list(load_split(out, split)) == list(ml100k_in_memory.samples(split))
    train = load_split(out, "train")
    targets = ml100k_in_memory.splits["train"]
    assert len(train) == len(targets)
    for position in random.Random(0).sample(range(len(targets)), 500):
        assert train[position] == ml100k_in_memory.sample(targets[position], "train")


@pytest.mark.slow
def test_tfds_data_source_reads_without_tensorflow(ml100k):
    out, _ = ml100k
    script = (
        "import json, sys, tensorflow_datasets as tfds\n"
        f"splits = tfds.data_source('reczero_samples/movielens_100k', data_dir={str(out)!r})\n"
        "record = splits['test'][0]\n"
        "print(json.dumps({'test': len(splits['test']), 'user': record['user_id'].decode(),\n"
        "  'tf': 'tensorflow' in sys.modules}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
    )
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found == {"test": 943, "user": load_split(out, "test")[0]["user_id"], "tf": False}


@pytest.mark.slow
def test_rerun_reuses_or_refuses(ml100k):
    out, stdout = ml100k
    status, again, _ = run_data_prepare("--dataset", "movielens-100k", "--out", out, "--tokenizer", "none")
    assert status == 0 and "reused:" in again
    assert report_lines(again) == report_lines(stdout)
    status, _, err = run_data_prepare(
        "--dataset", "movielens-100k", "--out", out, "--tokenizer", "none",
        "--split-mode", "global-time",
    )  # fmt: skip
    assert status == 2 and "prepared with other options" in err and "--overwrite" in err


def test_amazon_prepare_reports_every_skip(tmp_path, tokenizer_dir, smollm2_tokenizer):
    status, stdout, _ = run_data_prepare(
        "--dataset", "amazon", "--source", DATA / "amazon2018", "--out", tmp_path,
        "--tokenizer", tokenizer_dir,
    )  # fmt: skip
    assert status == 0
    assert "interactions read: 34  kept: 25" in stdout
    assert "rejected: 10" in stdout  # 9 reviews, 1 metadata line
    assert "  interactions: duplicate (user, item, timestamp): 1" in stdout
    assert "Digital_Music.json:" in stdout  # examples name file and line
    assert "empty review text (left out): 1" in stdout
    assert "samples (per-user split): train: 3  validation: 3  test: 4" in stdout
    assert "  test: 4 of 4 prompts" in stdout
    test = list(load_split(tmp_path, "test"))
    assert [s["dataset"] for s in test] == ["amazon"] * 4
    assert any("review" in entry for s in test for entry in s["user_history"])
    # the stored split is a grain source for the pipeline as it is
    pipeline = make_pipeline(
        load_split(tmp_path, "test"), smollm2_tokenizer, global_batch_size=4,
        max_prompt_tokens=2048, process_index=0, process_count=1, shuffle=False,
    )  # fmt: skip
    (batch,) = list(iter(pipeline))
    assert batch["rating"].tolist() == [s["rating"] for s in test]
    assert batch["record_index"].tolist() == [0, 1, 2, 3]


def test_empty_splits_are_not_written(tmp_path):
    source = DATA / "amazon2023" / "All_Beauty.jsonl"
    status, stdout, _ = run_data_prepare(
        "--dataset", "amazon", "--source", source, "--out", tmp_path, "--tokenizer", "none"
    )
    assert status == 0 and "train: 0  validation: 0  test: 1" in stdout
    assert len(load_split(tmp_path, "test")) == 1
    with pytest.raises(ValueError, match=r"split 'train' not in .* \(it has \['test'\]"):
        load_split(tmp_path, "train")

    # TFDS's prints, progress bars and absl messages are in the log file, not on the terminal.
    absl_handlers = list(logging.getLogger("absl").handlers)
    _, stdout, stderr = run_data_prepare("--dataset", "amazon", "--source", source, "--out",
                                tmp_path / "quiet", "--tokenizer", "none")
    assert "Downloading and preparing" not in stdout and "prepared to" not in stdout
    assert "Generating" not in stderr and "Shuffling" not in stderr
    log = (tmp_path / "quiet" / "libraries.log").read_text()
    assert "Downloading and preparing dataset" in log and "Using custom data configuration" in log
    assert logging.getLogger("absl").handlers == absl_handlers  # restored after the command


def test_on_error_fail_names_file_and_line(tmp_path):
    status, _, err = run_data_prepare(
        "--dataset", "yelp", "--source", DATA / "yelp", "--out", tmp_path, "--on-error", "fail",
        "--tokenizer", "none",
    )  # fmt: skip
    assert status == 2
    assert "yelp_academic_dataset_review.json:4: date is not YYYY-MM-DD HH:MM:SS" in err


def test_pickle_needs_the_flag(tmp_path):
    import pickle

    rows = [json.loads(line) for line in (DATA / "table" / "music.jsonl").read_text().splitlines()]
    path = tmp_path / "music.pkl"
    path.write_bytes(pickle.dumps(rows))
    status, _, err = run_data_prepare(
        "--dataset", "table", "--source", path, "--out", tmp_path / "a", "--tokenizer", "none"
    )
    assert status == 2 and "--allow-pickle" in err
    status, stdout, _ = run_data_prepare(
        "--dataset", "table", "--source", path, "--out", tmp_path / "b", "--tokenizer", "none",
        "--allow-pickle",
    )  # fmt: skip
    assert status == 0 and "interactions read: 21  kept: 17" in stdout
    assert "runs whatever code" in PICKLE_HELP


def test_missing_source_is_one_clear_error(tmp_path):
    status, stdout, err = run_data_prepare(
        "--dataset", "movielens-1m", "--source", tmp_path, "--out", tmp_path, "--tokenizer", "none"
    )
    assert status == 2 and "interactions read" not in stdout
    assert err.startswith("error: MovieLens-1M movies file not found")


def test_global_time_split_and_max_samples(tmp_path):
    status, stdout, _ = run_data_prepare(
        "--dataset", "amazon", "--source", DATA / "amazon2018", "--out", tmp_path,
        "--tokenizer", "none", "--split-mode", "global-time", "--validation-fraction", 0.2,
        "--test-fraction", 0.3, "--max-samples", "train=2",
    )  # fmt: skip
    assert status == 0
    assert "samples (global-time split): train: 2  validation: 2  test: 3" in stdout
    assert "(capped by --max-samples; available: {'train': 5})" in stdout
    times = {
        split: [s["timestamp"] for s in load_split(tmp_path, split)]
        for split in ("train", "validation", "test")
    }
    assert max(times["train"]) < min(times["validation"]) <= max(times["validation"])
    assert max(times["validation"]) < min(times["test"])
    with pytest.raises(ValueError, match="use SPLIT=N"):
        run_data_prepare("--dataset", "amazon", "--out", tmp_path, "--max-samples", "dev=3")
