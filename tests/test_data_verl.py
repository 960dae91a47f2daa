"""`reczero data prepare --dataset verl-parquet`: the authors' verl parquet layout (written here
with pyarrow, broken rows included) -> TFDS samples whose prompts are exactly verl's."""


import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reczero_jax import prompts
from reczero_jax.data import load_split
from reczero_jax.data.pipeline import make_pipeline
from reczero_jax.data.sources import DataError, ReadReport
from reczero_jax.data.tfds_builder import load_metadata
from reczero_jax.data.verl_parquet import DEFAULT_AVG_RATING, read_verl_parquet
from tests.helpers import run_data_prepare

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
EXTRA = pa.struct([("index", pa.int64()), ("split", pa.string()), ("user_id", pa.string()),
                   ("user_avg_rating", pa.float64())])


def prompt(user_avg: str = "", item_avg: str = "", body: str = "1. Toy Story, 5.0;") -> list:
    """One user message holding the whole pre-formatted prompt, as the authors' files do."""
    text = (f"Predict the rating.\n<|im_end|>\n<|im_start|>user\nuser_history: {body}\n\n"
            f"{user_avg}\n\ntarget_item: Title: Heat\n\n{item_avg}\n<|im_end|>\n"
            "<|im_start|>assistant")
    return [{"role": "user", "content": text}]


def row(messages, truth, extra=None, style="rule"):
    return {"data_source": "rec_rate_format", "prompt": messages, "ability": "rec_rate",
            "reward_model": {"style": style, "ground_truth": truth}, "extra_info": extra}


def write(path, rows, truth_type):
    schema = pa.schema([
        ("data_source", pa.string()), ("prompt", pa.list_(MESSAGE)), ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", truth_type)])),
        ("extra_info", EXTRA)])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


TRAIN_ROWS = [
    # kept: averages from extra_info / the prompt text / the default
    row(prompt(), 4, {"index": 0, "split": "train", "user_id": "u1", "user_avg_rating": 3.5}),
    row(prompt("user_avg_rating: 2.25", "target_item_avg_rating: 4.75"), 2, {"index": 1}),
    row(prompt(), 5, None),
    # broken
    row(None, 3, None),
    row([], 3, None),
    row([{"role": "user", "content": None}], 3, None),
    row([{"role": "user", "content": "   "}], 3, None),
    row(prompt(), 6, None),
    row(prompt(), None, None),
    row(prompt(), 3, None, style="model"),
]
TEST_ROWS = [  # the authors' nested ground truth {"ground_truth": "4"}
    row(prompt("user_avg_rating: 4.0", "target_item_avg_rating: 3.0"), {"ground_truth": "1"},
        {"index": 0, "split": "val"}),
    row(prompt(), {"ground_truth": "four"}, None),
]


@pytest.fixture
def verl_files(tmp_path):
    nested = pa.struct([("ground_truth", pa.string())])
    return (write(tmp_path / "train.parquet", TRAIN_ROWS, pa.int64()),
            write(tmp_path / "music_test.parquet", TEST_ROWS, nested))


def test_reader_keeps_good_rows_and_counts_every_broken_one(verl_files):
    table = read_verl_parquet(verl_files, ReadReport())
    train, test = table.records["train"], table.records["test"]
    assert [r["rating"] for r in train] == [4, 2, 5] and [r["rating"] for r in test] == [1]
    assert [(r["user_avg_rating"], r["item_avg_rating"]) for r in train] == [
        (3.5, DEFAULT_AVG_RATING), (2.25, 4.75), (DEFAULT_AVG_RATING, DEFAULT_AVG_RATING)]
    assert train[0]["user_id"] == "u1" and train[1]["user_id"] == ""
    assert train[0]["prompt_messages"] == TRAIN_ROWS[0]["prompt"]
    assert train[0]["extra_info"]["split"] == "train" and train[0]["data_source"] == "rec_rate_format"
    assert table.report.read["rows"] == len(TRAIN_ROWS) + len(TEST_ROWS)
    assert dict(table.report.rejected) == {
        "rows: prompt is not a non-empty list of chat messages": 2,
        "rows: prompt message without a role and string content": 1,
        "rows: prompt message with empty content": 1,
        "rows: rating outside the integer 1..5 scale": 1,
        "rows: no reward_model.ground_truth": 1,
        "rows: reward_model.style is not 'rule'": 1,
        "rows: rating is not a number": 1,
    }
    assert table.report.examples["rows: rating is not a number"] == [
        f"{verl_files[1]}: row 2: rating 'four'"]
    cleaned = table.report.cleaned
    assert cleaned["user_avg_rating not in the row: read from the prompt text"] == 2
    assert cleaned["item_avg_rating not in the row or its prompt: 3.0 (scale midpoint)"] == 2
    # the test file's row says split "val"; its file name wins, and the difference is counted
    assert cleaned["extra_info.split differs from the file name's split (file name used)"] == 1


def test_reader_fails_on_first_bad_row_under_fail_and_on_missing_columns(verl_files, tmp_path):
    with pytest.raises(DataError, match=r"train.parquet: row 4: prompt is not"):
        read_verl_parquet(verl_files[:1], ReadReport(on_error="fail"))
    no_reward = tmp_path / "test.parquet"
    pq.write_table(pa.table({"prompt": [[{"role": "user", "content": "x"}]]}), no_reward)
    with pytest.raises(DataError, match=r"no column\(s\) \['reward_model'\]"):
        read_verl_parquet([no_reward], ReadReport())


def test_split_from_extra_info_when_the_file_name_has_none(tmp_path):
    rows = [row(prompt(), 3, {"index": 0, "split": "validation"}), row(prompt(), 3, {"index": 1})]
    table = read_verl_parquet([write(tmp_path / "book.parquet", rows, pa.int64())], ReadReport())
    assert len(table.records["validation"]) == 1
    assert table.report.rejected == {"rows: no split": 1}


def test_prepare_writes_splits_whose_prompts_are_verls(verl_files, tmp_path, qwen2_tokenizer):
    status, stdout, _ = run_data_prepare("--dataset", "verl-parquet", "--source", *verl_files,
                                "--out", tmp_path / "out", "--tokenizer", "none")
    assert status == 0
    assert "rows read: 12  rejected: 8" in stdout and "samples: train: 3  validation: 0  test: 1" in stdout
    assert "e.g. " + str(verl_files[1]) + ": row 2: rating 'four'" in stdout
    train = list(load_split(tmp_path / "out", "train"))
    assert [r["rating"] for r in train] == [4, 2, 5] and train[1]["user_avg_rating"] == 2.25
    assert train[0]["prompt_messages"] == TRAIN_ROWS[0]["prompt"]
    assert load_metadata(tmp_path / "out")["options"]["dataset"] == "verl-parquet"

    # verl renders a row with the tokenizer's chat template and the generation prompt
    encoded = prompts.encode_prompt(train[0], qwen2_tokenizer, max_prompt_tokens=512)
    expected = qwen2_tokenizer.apply_chat_template(TRAIN_ROWS[0]["prompt"],
                                                   add_generation_prompt=True, tokenize=False)
    assert encoded.text == expected and not encoded.trimmed
    assert encoded.ids == qwen2_tokenizer(expected, add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="cannot be trimmed"):
        prompts.encode_prompt(train[0], qwen2_tokenizer, max_prompt_tokens=len(encoded.ids) - 1)

    batch = next(iter(make_pipeline(load_split(tmp_path / "out", "train"), qwen2_tokenizer,
                                    global_batch_size=3, max_prompt_tokens=128, shuffle=False,
                                    process_index=0, process_count=1)))
    assert batch["rating"].tolist() == [4, 2, 5]
    assert batch["user_avg_rating"].tolist() == [3.5, 2.25, DEFAULT_AVG_RATING]
    assert batch["prompt_mask"].sum(axis=1)[0] == len(encoded.ids)


def test_prepare_caps_a_split_and_rejects_a_verl_run_without_source(verl_files, tmp_path):
    status, stdout, _ = run_data_prepare("--dataset", "verl-parquet", "--source", *verl_files,
                                "--out", tmp_path, "--tokenizer", "none", "--max-samples", "train=2")
    assert status == 0 and "samples: train: 2" in stdout
    assert "available: {'train': 3, 'validation': 0, 'test': 1}" in stdout
    assert len(load_split(tmp_path, "train")) == 2
    with pytest.raises(ValueError, match="needs --source"):
        run_data_prepare("--dataset", "verl-parquet", "--out", tmp_path / "none",
                         "--tokenizer", "none")


# The authors' layout exactly: their make_prefix ChatML string (system turn, user turn, opened
# assistant turn) as the one message, ground_truth an integer string, extra_info split + index.
AUTHORS_SAMPLE = {"user_id": "u1", "item_id": "i1", "rating": 4, "user_avg_rating": 3.5,
                  "item_avg_rating": 4.25, "item": {"title": "Heat (1995)"},
                  "user_history": [{"item_id": "i0", "title": "Casino (1995)", "rating": 5}],
                  "item_history": [{"user_id": "u0", "rating": 4}]}
AUTHORS_PROMPT = prompts.build_raw_prompt(AUTHORS_SAMPLE)


def write_authors_file(path, contents, truths):
    schema = pa.schema([
        ("data_source", pa.string()), ("prompt", pa.list_(MESSAGE)), ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        ("extra_info", pa.struct([("split", pa.string()), ("index", pa.int64())]))])
    rows = [{"data_source": "rec_rate", "prompt": [{"role": "user", "content": content}],
             "ability": "rec_rate", "reward_model": {"style": "rule", "ground_truth": truth},
             "extra_info": {"split": path.stem, "index": index}}
            for index, (content, truth) in enumerate(zip(contents, truths, strict=True))]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def test_authors_chatml_prompts_are_tokenised_verbatim(tmp_path, qwen2_tokenizer):
    assert AUTHORS_PROMPT.startswith("<|im_start|>system\n")
    assert AUTHORS_PROMPT.endswith("<|im_end|>\n<|im_start|>assistant\n")
    source = write_authors_file(tmp_path / "train.parquet", [AUTHORS_PROMPT] * 2, ["4", "2"])
    status, stdout, _ = run_data_prepare("--dataset", "verl-parquet", "--source", source,
                                "--out", tmp_path / "out", "--tokenizer", "none")
    assert status == 0
    assert "prompts: --verl-prompt auto" in stdout
    assert f"{source}: 2 rows; prompts kept: 2 verbatim" in stdout and "0 through the" in stdout
    train = list(load_split(tmp_path / "out", "train"))
    assert [r["rating"] for r in train] == [4, 2] and train[0]["prompt_format"] == "verbatim"
    assert (train[0]["user_avg_rating"], train[0]["item_avg_rating"]) == (3.5, 4.25)

    # verl's rl_dataset: prompt[0]["content"] tokenised as is, no chat template around it.
    expected = qwen2_tokenizer(AUTHORS_PROMPT, add_special_tokens=False)["input_ids"]
    encoded = prompts.encode_prompt(train[0], qwen2_tokenizer, max_prompt_tokens=2048)
    assert encoded.text == AUTHORS_PROMPT and encoded.ids == expected
    assert encoded.text.count("<|im_start|>") == 3  # not wrapped a second time
    # ... and the same ids reach training and evaluation through the grain pipeline.
    batch = next(iter(make_pipeline(load_split(tmp_path / "out", "train"), qwen2_tokenizer,
                                    global_batch_size=2, max_prompt_tokens=2048, shuffle=False,
                                    process_index=0, process_count=1)))
    row = batch["prompt_ids"][0][batch["prompt_mask"][0] == 1]
    assert row.tolist() == expected


def prompt_notes(report):
    """The cleaned notes of a report but those about averages (these rows state none)."""
    return {note: n for note, n in report.cleaned.items() if "avg_rating" not in note}


def test_verl_prompt_format_can_be_forced_and_mismatches_are_counted(tmp_path, qwen2_tokenizer):
    plain = "user_history: 1. Heat, 4.0;\n\ntarget_item: Casino"
    source = write_authors_file(tmp_path / "test.parquet", [AUTHORS_PROMPT, plain], ["4", "3"])
    auto = read_verl_parquet([source], ReadReport())
    assert [r["prompt_format"] for r in auto.records["test"]] == ["verbatim", "template"]
    assert auto.formats == {str(source): {"verbatim": 1, "template": 1}}
    assert prompt_notes(auto.report) == {}
    encoded = prompts.encode_prompt(auto.records["test"][1], qwen2_tokenizer,
                                    max_prompt_tokens=512)
    assert encoded.text == qwen2_tokenizer.apply_chat_template(
        [{"role": "user", "content": plain}], add_generation_prompt=True, tokenize=False)

    forced = read_verl_parquet([source], ReadReport(), prompt="template")
    assert [r["prompt_format"] for r in forced.records["test"]] == ["template", "template"]
    assert prompt_notes(forced.report) == {
        "ChatML prompt rendered through the chat template (its turns wrapped twice)": 1}
    verbatim = read_verl_parquet([source], ReadReport(), prompt="verbatim")
    assert prompt_notes(verbatim.report) == {
        "plain-text prompt used verbatim (no chat turns around it)": 1}
    assert prompts.encode_prompt(verbatim.records["test"][1], qwen2_tokenizer,
                                 max_prompt_tokens=512).text == plain
    with pytest.raises(ValueError, match="use one of auto, verbatim, template"):
        read_verl_parquet([source], ReadReport(), prompt="chat")


def test_samples_prepared_before_prompt_format_are_rendered_as_their_content_needs(
        qwen2_tokenizer):
    record = {"user_id": "", "item_id": "",
              "prompt_messages": [{"role": "user", "content": AUTHORS_PROMPT}]}
    assert prompts.encode_prompt(record, qwen2_tokenizer,
                                 max_prompt_tokens=2048).text == AUTHORS_PROMPT
