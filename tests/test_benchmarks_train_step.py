"""Smoke test of benchmarks/train_step.py: the smallest shape, the report's rows (no timing
asserts: this checks that the benchmark runs and reports what it measured). The materialized
and plain blockwise arms differ from the others only in ``model.attention``, whose gradients
test_attention checks; each arm is a compilation of its own (about 10 s), so they are left out."""

import re

from benchmarks import train_step

ARMS = ("shared", "naive", "blockwise+chunks", "lora", "torch")


def test_quick_run_reports_each_arm_it_runs_and_the_ratios(tmp_path):
    out = tmp_path / "train_step.md"
    report = train_step.main(["--quick", "--shapes", "8x4x2", "--repeats", "1",
                              "--torch-threads", "1", "--arms", *ARMS, "--out", str(out)])
    assert out.read_text() == report + "\n"
    shape = "P=8 R=4 G=2 B=1"
    grad_norms = {}
    for arm in ARMS:
        row = re.search(rf"^\| {shape} \| {re.escape(arm)} \|(.*)\|$", report, re.MULTILINE)
        assert row, f"no {arm} row in:\n{report}"
        grad_norms[arm] = float(row.group(1).split("|")[-1])  # the last column
    # The full fine-tuning arms take the same step: their gradient norms agree.
    full = [grad_norms[arm] for arm in ARMS if arm != "lora"]
    assert max(full) - min(full) < 1e-3 * grad_norms["torch"]
    assert re.search(rf"^\| {shape} \| [\d.]+x \| [\d.]+x \|$", report, re.MULTILINE)
    # LoRA beside full: a time ratio and a memory ratio (adapters alone hold moments).
    (time_ratio, memory_ratio) = re.findall(rf"^\| {shape} \| ([\d.]+)x \|$", report,
                                            re.MULTILINE)
    assert 0 < float(memory_ratio) < 1
