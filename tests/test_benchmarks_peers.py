"""benchmarks/peers.py without running either system: the step split (update = step - rollout,
medians after the warm-up step), the ratios table, a system that fails reported in its row,
and the response-length check."""

import re

import pytest

from benchmarks import peers
from benchmarks.sampling import Shape


def times(system: str, steps, rollouts) -> peers.StepTimes:
    return peers.StepTimes(system, "1.0", "P=512 R=128 G=8 B=1", 509, tuple(steps), tuple(rollouts))


def test_medians_leave_out_the_warm_up_and_the_update_is_the_rest_of_the_step():
    ours = times("reczero", [90.0, 30.0, 34.0, 31.0], [40.0, 14.0, 15.0, 13.0])
    assert ours.step == 31.0
    assert ours.rollout == 14.0
    assert ours.update == 18.0  # median of 16, 19, 18


def test_report_gives_each_system_and_trl_over_reczero_per_part():
    report = peers.report([times("reczero", [90.0, 30.0], [40.0, 12.0]),
                           times("trl", [80.0, 75.0], [30.0, 30.0])], steps=2, minutes=4.5)
    assert re.search(r"^\| P=512 R=128 G=8 B=1 \| trl 1.0 \| 509 \| 75.0 \| 30.0 \| 45.0 \| 80.0 \|$",
                     report, re.MULTILINE)
    assert re.search(r"^\| P=512 R=128 G=8 B=1 \| trl / reczero \| 2.50x \| 2.50x \| 2.50x \|$",
                     report, re.MULTILINE)


def test_a_system_that_fails_is_reported_with_its_last_line_and_left_out_of_the_ratios(
        tmp_path):
    # A worker that cannot read its prompt fails like one that runs out of memory: its
    # process exits non-zero after printing the error.
    failed = peers.run_worker("trl", "512x128x8", tmp_path / "missing.json", 2, tmp_path)
    assert isinstance(failed, peers.Failed) and failed.system == "trl"
    assert failed.reason.startswith("exit 1 (pip install -e '.[peers]'): FileNotFoundError")
    assert "missing.json" in failed.reason
    report = peers.report([times("reczero", [90.0, 30.0], [40.0, 12.0]), failed], steps=2,
                          minutes=1.0)
    assert re.search(r"^\| P=512 R=128 G=8 B=1 \| trl \|\s+\| failed \(exit 1 .*FileNotFoundError"
                     r".*\)(\s+\|){4}$", report, re.MULTILINE)
    assert "trl / reczero" not in report


def test_a_response_of_another_length_is_an_error():
    shape = Shape.parse("512x128x8", batch=1)
    peers.check_lengths("trl", [128] * 8, shape)
    with pytest.raises(RuntimeError, match=r"lengths \[37, 128\], expected exactly 128"):
        peers.check_lengths("trl", [128] * 7 + [37], shape)
