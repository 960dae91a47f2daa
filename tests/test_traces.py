"""Warm-start traces: the rationalisation rules, teacher generation on a real tiny model, the
template teacher, and validation of external trace files with broken lines."""

import argparse
import contextlib
import io
import json

import pytest
from transformers import AutoTokenizer

from reczero_jax.data import load_split
from reczero_jax.models import from_pretrained
from reczero_jax.prompts import encode_prompt
from reczero_jax.traces import (
    RATING_HINT,
    generate_traces,
    judge,
    load_traces,
    template_trace,
    trace_outcome,
    validate_traces,
    with_hint,
)
from reczero_jax.traces.cli import register
from reczero_jax.traces.rules import (
    BAD_FORMAT,
    HINT_LEAK,
    KEPT,
    OK,
    OUTCOMES,
    RATIONALISED,
    RETRY,
    WRONG_RATING,
    hint_text,
)

HINT_MARK = RATING_HINT.split("{rating}")[0].strip()  # "Hint: this user's true rating ... is"


def answer(rating="4", match="The history and the item agree."):
    return (f"<analyze user>Likes musicals.</analyze user>\n<analyze item>A film\n[pos] songs\n"
            f"[neg] long</analyze item>\n<match>{match}</match>\n<rate>{rating}</rate>")


def run_cli(*argv):
    """(exit status, stdout, stderr) of ``reczero traces ...`` through ``register``."""
    parser = argparse.ArgumentParser(prog="reczero")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["traces", *map(str, argv)])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = args.func(args)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def train_samples(small_ml100k):
    split = load_split(small_ml100k, "train")
    return [split[i] for i in range(len(split))]


# ----------------------------------------------------------------------------- rules


@pytest.mark.parametrize("response, truth, hinted, verdict", [
    (answer("4"), 4, False, OK),
    (answer(" 4.0 "), 4, False, OK),
    (answer("4.5"), 4, False, WRONG_RATING),
    (answer("3"), 4, True, WRONG_RATING),
    (answer("4 stars"), 4, False, BAD_FORMAT),
    (answer("4").replace("<match>", ""), 4, False, BAD_FORMAT),
    (answer("4", match="As the hint says, 4."), 4, True, HINT_LEAK),
    (answer("4", match="As the HINT says, 4."), 4, True, HINT_LEAK),
    (answer("4", match="As the hint says, 4."), 4, False, OK),  # only hinted answers
    (answer("2", match="As the hint says, 4."), 4, True, WRONG_RATING),
])
def test_judge(response, truth, hinted, verdict):
    assert judge(response, truth, hinted=hinted) == verdict


@pytest.mark.parametrize("first, second, outcome", [
    (OK, None, KEPT),
    (OK, BAD_FORMAT, KEPT),
    (WRONG_RATING, None, RETRY),
    (BAD_FORMAT, None, RETRY),
    (WRONG_RATING, OK, RATIONALISED),
    (BAD_FORMAT, OK, RATIONALISED),
    (WRONG_RATING, WRONG_RATING, "dropped_wrong_rating"),
    (WRONG_RATING, BAD_FORMAT, "dropped_format"),
    (BAD_FORMAT, HINT_LEAK, "dropped_hint_leak"),
])
def test_trace_outcome(first, second, outcome):
    assert trace_outcome(first, second) == outcome


def test_hint_goes_at_the_end_of_the_user_turn(train_samples, smollm2_tokenizer):
    sample = train_samples[0]
    text = encode_prompt(sample, smollm2_tokenizer, max_prompt_tokens=4096).text
    hinted = with_hint(text, sample)
    hint = hint_text(sample["rating"])
    assert f"true rating of the target item is {sample['rating']}." in hint
    assert hinted.replace(hint, "", 1) == text and hinted.count(hint) == 1
    # After the last field, inside the user turn: the template's end-of-turn and the
    # assistant header follow it.
    last_field = f"target_item_avg_rating: {sample['item_avg_rating']:.2f}"
    assert hinted.index(hint) == hinted.rindex(last_field) + len(last_field)
    assert hinted.endswith(text[text.rindex(last_field) + len(last_field):])
    assert "<|im_start|>assistant" in hinted[hinted.index(hint):]
    with pytest.raises(ValueError, match="to put the hint after"):
        with_hint("no fields here", sample)


# ----------------------------------------------------------------------------- teacher


def test_generation_accounting_on_a_tiny_teacher(tiny_model_dir, train_samples, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = from_pretrained(tiny_model_dir)
    records, counts = generate_traces(model, tokenizer, train_samples, max_prompt_tokens=1024,
                                      max_new_tokens=8, batch_size=4, temperature=1.0, seed=3,
                                      teacher="tiny")
    n = len(train_samples)
    assert counts["samples"] == n
    assert sum(counts[outcome] for outcome in OUTCOMES) == n
    # Every first answer that was not kept was retried, for exactly one of the two reasons.
    assert counts["first_try_format"] + counts["first_try_wrong_rating"] == n - counts[KEPT]
    assert len(records) == counts[KEPT] + counts[RATIONALISED]
    assert sum(r["rationalised"] for r in records) == counts[RATIONALISED]
    truth = {(s["user_id"], s["item_id"]): s["rating"] for s in train_samples}
    for record in records:
        assert judge(record["response"], truth[record["user_id"], record["item_id"]]) == OK
        assert record["rating"] == truth[record["user_id"], record["item_id"]]
        assert HINT_MARK not in json.dumps(record)
    # What generation writes is what loading accepts.
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded, load_counts = load_traces(path, train_samples)
    assert load_counts["kept"] == len(records) == len(loaded)


def test_generate_command_with_a_model_directory(tiny_model_dir, small_ml100k, tmp_path):
    out = tmp_path / "teacher.jsonl"
    status, stdout, _ = run_cli("generate", "--teacher", tiny_model_dir, "--data", small_ml100k,
                                "--n", 3, "--out", out, "--max-prompt-tokens", 1024,
                                "--max-new-tokens", 4, "--batch-size", 4)
    assert status == 0
    printed = dict(line.strip().split(": ") for line in stdout.splitlines() if line.startswith("  "))
    assert printed["samples"] == "3"
    assert sum(int(printed[outcome]) for outcome in OUTCOMES) == 3
    assert len(out.read_text().splitlines()) == int(printed[KEPT]) + int(printed[RATIONALISED])


def test_template_teacher_writes_every_sample(small_ml100k, train_samples, tmp_path):
    out = tmp_path / "template.jsonl"
    status, stdout, _ = run_cli("generate", "--teacher", "template", "--data", small_ml100k,
                                "--n", 0, "--out", out)
    assert status == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["response"] for r in rows] == [template_trace(s) for s in train_samples]
    matching = sum(judge(r["response"], s["rating"]) == OK
                   for r, s in zip(rows, train_samples, strict=True))
    assert f"samples: {len(train_samples)}" in stdout
    assert f"format_ok: {len(train_samples)}" in stdout
    assert f"rating_equals_truth: {matching}" in stdout
    # Import keeps exactly the template traces that reach the true rating.
    status, stdout, _ = run_cli("import", out, "--data", small_ml100k)
    assert f"{len(rows)} traces read, {matching} valid" in stdout
    assert status == (0 if matching else 1)


# ----------------------------------------------------------------------------- import


def test_import_counts_broken_lines_by_reason(small_ml100k, train_samples, tmp_path):
    first, second, third = train_samples[:3]
    wrong = 1 if second["rating"] != 1 else 2
    lines = [
        json.dumps({"user_id": first["user_id"], "item_id": first["item_id"],
                    "response": answer(str(first["rating"])), "teacher": "R1"}),      # 1 kept
        "{not json",                                                                   # 2
        "",                                                                            # blank
        json.dumps([first["user_id"], first["item_id"]]),                              # 4
        json.dumps({"user_id": first["user_id"], "item_id": first["item_id"]}),        # 5
        json.dumps({"user_id": 1, "item_id": 2, "response": 3}),                       # 6
        json.dumps({"user_id": "nobody", "item_id": first["item_id"],
                    "response": answer("3")}),                                         # 7
        json.dumps({"user_id": second["user_id"], "item_id": second["item_id"],
                    "response": answer("3").replace("</rate>", "")}),                  # 8
        json.dumps({"user_id": second["user_id"], "item_id": second["item_id"],
                    "response": answer(str(wrong))}),                                  # 9
        json.dumps({"user_id": first["user_id"], "item_id": first["item_id"],
                    "response": answer(str(first["rating"]), "again")}),               # 10
        json.dumps({"user_id": int(third["user_id"]), "item_id": int(third["item_id"]),
                    "response": answer(f"{third['rating']}.0"), "rating": 9}),          # 11 kept
    ]
    path = tmp_path / "external.jsonl"
    path.write_text("\n".join(lines) + "\n")

    records, report = validate_traces(path, train_samples)
    assert report.counts() == {"kept": 2, "bad_json": 2, "missing_field": 2, "unknown_sample": 1,
                               "bad_format": 1, "wrong_rating": 1, "duplicate": 1}
    assert report.lines == 10
    assert [e.split(": ")[0] for e in report.examples["bad_json"]] == [f"{path}:2", f"{path}:4"]
    assert report.examples["missing_field"][0].startswith(f"{path}:5: no response")
    assert "response is a int" in report.examples["missing_field"][1]
    assert report.examples["duplicate"][0].startswith(f"{path}:10:")
    # Normalised: the samples' string ids and true rating; other keys kept.
    assert records[0]["teacher"] == "R1"
    assert (records[1]["user_id"], records[1]["item_id"], records[1]["rating"]) == (
        third["user_id"], third["item_id"], third["rating"])

    loaded, counts = load_traces(path, train_samples)
    assert counts == report.counts()
    assert loaded == {(first["user_id"], first["item_id"]): json.loads(lines[0])["response"],
                      (third["user_id"], third["item_id"]): answer(f"{third['rating']}.0")}

    out = tmp_path / "clean" / "valid.jsonl"
    status, stdout, _ = run_cli("import", path, "--data", small_ml100k, "--out", out)
    assert status == 0
    assert "10 traces read, 2 valid, 8 rejected" in stdout
    assert f"e.g. {path}:7: user 'nobody'" in stdout
    assert [json.loads(line) for line in out.read_text().splitlines()] == records


def test_import_exit_status(small_ml100k, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text("nothing valid\n")
    assert run_cli("import", broken, "--data", small_ml100k)[0] == 1
    status, _, stderr = run_cli("import", tmp_path / "absent.jsonl", "--data", small_ml100k)
    assert status == 2 and "no trace file" in stderr
