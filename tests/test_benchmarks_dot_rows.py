"""Smoke test of benchmarks/dot_rows.py: every shape and arm gets a row with a positive rate
(no timing asserts: this checks that the benchmark runs and reports what it measured)."""

import re

from benchmarks import dot_rows


def test_every_shape_and_arm_reports_a_rate():
    report = dot_rows.main(["--rows", "2", "--repeats", "1"])
    for k, n, layers in dot_rows.SHAPES:
        for arm in ("xla", "numpy", "torch", "xla read"):
            row = re.search(rf"^\| \[2, {k}\] x \[{k}, {n}\] x {layers} \| {arm} \| ([\d.]+) \| "
                            rf"([\d.]+) \|$", report, re.MULTILINE)
            assert row, f"no row for {arm} at {k}x{n} in:\n{report}"
            assert float(row.group(1)) > 0 and float(row.group(2)) > 0
