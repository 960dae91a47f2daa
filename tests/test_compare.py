"""`reczero compare` passes on a tiny random Qwen2 checkpoint (prepared verl data in the
authors' layout) and on SmolLM2-135M (the built-in prompts), fails when its tolerances are
scaled to zero (the same measurements judged again), and its re-statement of the authors'
reward gives the hand-computed rewards."""

import argparse
import contextlib
import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers

from reczero_jax.compare import (
    PROBES,
    authors_reward,
    compare,
    format_table,
    load_prompts,
    register,
    scale_tolerances,
    verdict,
)
from reczero_jax.data.verl import VerlConfig, prepare_verl
from reczero_jax.prompts import INSTRUCTION
from reczero_jax.rewards import rating_reward

# PROBES' rewards worked out by hand from PAPER.md's rule: 2 - |pred - y| / 2, or -1.
PROBE_REWARDS = (2.0, -1.0, 1.0, 1.25, 0.0, 2.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """torch on one thread: on a shared 2-core machine, token-by-token generation with two
    OpenMP threads waiting for each other is many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tmp_path_factory, qwen2_tokenizer):
    """A random 2-layer Qwen2 (q/k/v biases, untied head) written by transformers, with the
    real Qwen2 tokenizer. Weights are spread (std 0.2) so greedy choices are clear, not the
    near-ties of transformers' std-0.02 initialisation."""
    config = transformers.Qwen2Config(
        vocab_size=len(qwen2_tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=qwen2_tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.2)
    out = tmp_path_factory.mktemp("tiny_qwen2")
    model.save_pretrained(out)
    qwen2_tokenizer.save_pretrained(out)
    return out


def run_compare(*argv):
    """(exit status, stdout) of ``reczero compare ...`` through ``register``."""
    parser = argparse.ArgumentParser(prog="reczero")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["compare", *map(str, argv)])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = args.func(args)
    return status, out.getvalue()


def table_row(stdout: str, name: str) -> list[str]:
    """The cells after ``name`` in the printed table."""
    line = next(line for line in stdout.splitlines() if line.startswith(name))
    return line[len(name):].split()


def test_authors_rules_and_ours_give_the_hand_computed_probe_rewards():
    assert tuple(authors_reward(text, y) for text, y in PROBES) == PROBE_REWARDS
    assert tuple(rating_reward(text, y).reward for text, y in PROBES) == PROBE_REWARDS


VERL_TEXTS = ["user_history: 1. Heat, 4.0;\n\nuser_avg_rating: 4.0\n\ntarget_item: Casino",
              "user_history: 1. Emma, 2.0;\n\nuser_avg_rating: 2.0\n\ntarget_item: Persuasion",
              "user_history: 1. Fargo, 5.0;\n\nuser_avg_rating: 5.0\n\ntarget_item: Heat"]
# The authors' layout: their make_prefix ChatML string (system turn, user turn, opened assistant
# turn) as the one message, ground truths as integer strings, extra_info with split and index.
AUTHORS_TEXTS = [f"<|im_start|>system\n{INSTRUCTION}<|im_end|>\n<|im_start|>user\n{t}<|im_end|>\n"
                 "<|im_start|>assistant\n" for t in VERL_TEXTS]


def prepared_verl(directory, texts, authors: bool):
    """A prepared verl dataset (test split) of ``texts`` rated 5, 2, 4."""
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    columns = {"reward_model": [{"style": "rule", "ground_truth": y} for y in (5, 2, 4)]}
    if authors:
        columns = {"reward_model": [{"style": "rule", "ground_truth": str(y)} for y in (5, 2, 4)],
                   "extra_info": [{"split": "test", "index": i} for i in range(3)]}
    table = pa.table({
        "prompt": pa.array([[{"role": "user", "content": t}] for t in texts], pa.list_(message)),
        **columns})
    directory.mkdir()
    pq.write_table(table, directory / "test.parquet")
    prepare_verl(VerlConfig.of([directory / "test.parquet"]), directory / "data")
    return directory / "data"


@pytest.fixture(scope="module")
def authors_verl(tmp_path_factory):
    return prepared_verl(tmp_path_factory.mktemp("verl") / "authors", AUTHORS_TEXTS, authors=True)


@pytest.fixture(scope="module")
def tiny_qwen2_compared(tiny_qwen2_dir, authors_verl):
    """(checks, log lines) of one comparison on the tiny model, judged by the tests at two
    tolerance scales."""
    lines = []
    checks = compare(tiny_qwen2_dir, data=authors_verl, n=3, max_new_tokens=8, group_size=3,
                     log=lines.append)
    return checks, lines


def test_tiny_qwen2_passes_on_verl_data_in_the_authors_layout(tiny_qwen2_compared, authors_verl,
                                                              qwen2_tokenizer):
    checks, lines = tiny_qwen2_compared
    stdout = format_table(checks)
    assert verdict(checks) == (0, "result: PASS"), stdout
    assert any(f"inputs: 3 test samples of {authors_verl}" in line for line in lines)
    assert table_row(stdout, "greedy divergences") == ["0"]
    assert table_row(stdout, "largest logit gap at a divergence") == ["0", "0.002", "ok"]
    assert table_row(stdout, "reward mismatches") == ["0", "0", "ok"]
    assert float(table_row(stdout, "GRPO grad norm ours / torch")[0]) > 0  # advantages not all 0
    # compare's prompts are the contents tokenised as they are, as the authors' verl does.
    ids, truths, _ = load_prompts(qwen2_tokenizer, authors_verl, "test", 3, 2048, "chat")
    assert ids == [qwen2_tokenizer(t, add_special_tokens=False)["input_ids"]
                   for t in AUTHORS_TEXTS]
    assert truths == [5, 2, 4]


def test_plain_text_verl_prompts_go_through_the_chat_template(tmp_path, qwen2_tokenizer):
    data = prepared_verl(tmp_path / "plain", VERL_TEXTS, authors=False)
    ids, truths, _ = load_prompts(qwen2_tokenizer, data, "test", 3, 2048, "chat")
    rendered = [qwen2_tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                                    add_generation_prompt=True, tokenize=False)
                for t in VERL_TEXTS]
    assert ids == [qwen2_tokenizer(r, add_special_tokens=False)["input_ids"] for r in rendered]
    assert truths == [5, 2, 4]


def test_tiny_qwen2_fails_with_zero_tolerance(tiny_qwen2_compared):
    checks, _ = tiny_qwen2_compared
    exact = scale_tolerances(checks, 0)
    status, result = verdict(exact)
    # fp32 sums in another order cannot match to the last bit at every position
    assert status == 1 and result.startswith("result: FAIL (logits max |diff|")
    assert table_row(format_table(exact), "reward mismatches")[-1] == "ok"  # exact checks hold
    assert [check.value for check in exact] == [check.value for check in checks]
    with pytest.raises(ValueError, match="scale must be >= 0"):
        scale_tolerances(checks, -1)


def test_cli_refuses_a_negative_tolerance_scale(tiny_qwen2_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_compare("--model", tiny_qwen2_dir, "--tolerance-scale", -1)
    assert exit_info.value.code == 2
    assert "--tolerance-scale: must be >= 0" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_passes(smollm2_dir):
    status, stdout = run_compare("--model", smollm2_dir, "--n", 2, "--max-new-tokens", 4,
                                 "--group-size", 3)
    assert status == 0, stdout
    assert stdout.rstrip().endswith("result: PASS")
    assert table_row(stdout, "greedy sequences identical") == ["2/2"]
