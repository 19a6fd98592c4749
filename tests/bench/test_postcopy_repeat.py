"""``livemig bench postcopy --repeat``: a row is one real run (the median by p50), and it says
how many runs met each target."""

from __future__ import annotations

from livemig.bench.postcopy import _median_run


def _run(p50: float, p99: float, blocktime: int) -> dict:
    return {"latency": {"p50-us": p50, "p99-us": p99}, "floor": {"p50-us": 70.0},
            "blocktime-ms": blocktime}  # fmt: skip


def test_median_run_is_a_real_run_with_target_counts() -> None:
    runs = [_run(250, 900, 1), _run(180, 2500, 2), _run(199, 1500, 3), _run(300, 1000, 4),
            _run(150, 800, 5)]  # fmt: skip
    row = _median_run(runs)
    assert row["latency"] == {"p50-us": 199, "p99-us": 1500} and row["blocktime-ms"] == 3
    assert row["met-p50"] == 3 and row["met-p99"] == 4
    assert [r["p50-us"] for r in row["runs"]] == [250, 180, 199, 300, 150]


def test_preempt_rows_count_against_the_1_ms_target() -> None:
    runs = [{**_run(250, p99, 1), "preempt": True} for p99 in (900, 1080, 650)]
    assert _median_run(runs)["met-p99"] == 2
    assert _median_run([{**r, "preempt": False} for r in runs])["met-p99"] == 3


def test_one_run_is_reported_as_it_is() -> None:
    row = _median_run([_run(210, 900, 7)])
    assert row["blocktime-ms"] == 7 and "runs" not in row and "met-p50" not in row
