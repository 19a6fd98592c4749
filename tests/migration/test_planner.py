"""The convergence planner: the model's cases, the progress judge, and a prediction checked
against a real migration of a steady memstress guest (within 25% of the measured total)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from livemig.migration.planner import ProgressJudge, predict, simulate

MiB = 1 << 20


def test_converging_guest() -> None:
    ok, found, total, down = simulate(256 * MiB, 64 * MiB, 10 * MiB, 100 * MiB, 300,
                                      stop_bandwidth=1000 * MiB)  # fmt: skip
    assert ok
    assert found[0] == 256 * MiB and found[-1] <= 30 * MiB  # switch-over fits the threshold
    assert down <= 30 * MiB / (1000 * MiB) + 0.011
    # between sending everything once and sending everything plus the working set again
    assert (256 - 30) / 100 < total < (256 + 64) / 100


def test_refining_passes_shrink_the_modelled_blackout() -> None:
    args = (64 * MiB, 20 * MiB, 20 * MiB, 128 * MiB, 300)
    ok0, found0, total0, down0 = simulate(*args, stop_bandwidth=2000 * MiB, refine=0)
    ok3, found3, total3, down3 = simulate(*args, stop_bandwidth=2000 * MiB, refine=3)
    assert ok0 and ok3
    assert len(found3) > len(found0) and found3[-1] < found0[-1] / 2
    assert down3 < down0 and total3 > total0
    # each extra pass starts with at most a threshold's worth: at most downtime-limit each
    assert total3 - total0 <= 3 * 0.3


def test_diverging_guest() -> None:
    ok, *_ = simulate(256 * MiB, 200 * MiB, 150 * MiB, 100 * MiB, 50)
    assert not ok


def test_working_set_that_fits_converges_even_when_fast() -> None:
    # dirtying faster than the link, but only 8 MiB of it: fits the threshold at once
    ok, *_ = simulate(64 * MiB, 8 * MiB, 500 * MiB, 100 * MiB, 300)
    assert ok


def test_recommendations() -> None:
    p = predict(populated=256 * MiB, working_set=64 * MiB, dirty_rate=10 * MiB,
                bandwidth=100 * MiB)  # fmt: skip
    assert p.recommendation == "pre-copy" and p.converges
    p = predict(populated=256 * MiB, working_set=200 * MiB, dirty_rate=150 * MiB,
                bandwidth=100 * MiB, downtime_limit_ms=50)  # fmt: skip
    assert p.recommendation == "auto-converge"
    p = predict(populated=1024 * MiB, working_set=900 * MiB, dirty_rate=150 * MiB,
                bandwidth=100 * MiB, downtime_limit_ms=50,
                params={"max-cpu-throttle": 20})  # fmt: skip
    assert p.recommendation == "post-copy" and not p.converges


def _info(status: str, passes: int, remaining: int, mbps: float = 800.0) -> dict:
    return {"status": status, "expected-downtime": 100,
            "ram": {"dirty-sync-count": passes, "remaining": remaining, "mbps": mbps,
                    "dirty-pages-rate": 0, "page-size": 4096}}  # fmt: skip


def test_judge_verdicts_and_countdown() -> None:
    j = ProgressJudge()
    lefts = []
    for i, rem in enumerate([400, 300, 200, 100]):
        verdict, left = j.update(i * 0.5, _info("active", i + 1, rem * MiB))
        lefts.append(left)
    assert verdict == "converging"
    assert all(b <= a for a, b in itertools.pairwise(lefts))
    j = ProgressJudge()
    for i, rem in enumerate([100, 100, 101, 100]):
        verdict, left = j.update(i, _info("active", i + 1, rem * MiB))
    assert verdict == "stalled" and left is None
    j = ProgressJudge()
    for i, rem in enumerate([100, 150, 200, 260]):
        verdict, _ = j.update(i, _info("active", i + 1, rem * MiB))
    assert verdict == "diverging"
    assert j.update(9, _info("completed", 9, 0))[0] == "completed"


@pytest.mark.slow
def test_prediction_within_25_percent_of_a_real_migration(tmp_path: Path) -> None:
    from livemig import procs
    from livemig.control.plan import plan_for

    port = procs.free_port()
    rate = 1 * MiB // 4096  # 1 MiB/s of page writes over a 16 MiB working set
    with procs.source(tmp_path, guest="memstress", memory="128M", smp=1,
                      append=f"ws=16M rate={rate} mark_ms=1000") as src, \
         procs.destination(tmp_path, memory="128M", smp=1,
                           incoming=f"tcp:127.0.0.1:{port}") as dst:  # fmt: skip
        src.wait_ready()
        dst.wait_ready()
        # the link is the bottleneck we predict for: 16 MiB/s
        src.qmp("migrate-set-parameters", **{"max-bandwidth": 16 * MiB})
        import time

        time.sleep(1.5)  # the guest has filled its working set and sweeps steadily
        pred = plan_for(src._qmp, 2.0, None, None)
        assert pred.converges and pred.total_time_s
        src.qmp("migrate", uri=f"tcp:127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = src.qmp("query-migrate")
            if info["status"] in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.1)
        assert info["status"] == "completed", info
        measured = info["total-time"] / 1000
        assert abs(pred.total_time_s - measured) <= 0.25 * measured, (pred, measured)


def _table_text(pred: object) -> str:
    import io

    from rich.console import Console

    from livemig.cli.plan import prediction_table

    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(prediction_table(pred))
    return out.getvalue()


def test_plan_output_cannot_contradict_itself() -> None:
    p = predict(populated=256 * MiB, working_set=200 * MiB, dirty_rate=150 * MiB,
                bandwidth=100 * MiB, downtime_limit_ms=300)  # fmt: skip
    assert p.recommendation == "auto-converge" and not p.converges
    text = _table_text(p)
    assert "never fits the 300 ms limit" in text
    assert "converges" not in text.split("recommendation")[0].split("pre-copy alone")[1]
    assert "passes (auto-converge)" in text and "downtime (auto-converge)" in text
    ok = _table_text(predict(populated=256 * MiB, working_set=64 * MiB, dirty_rate=10 * MiB,
                             bandwidth=100 * MiB))  # fmt: skip
    assert "converges" in ok and "passes (pre-copy)" in ok


def test_plan_refuses_a_guest_that_is_not_running() -> None:
    from livemig.control.plan import plan_for
    from livemig.errors import UsageError

    class Fake:
        def command(self, name: str, **kw: object) -> dict:
            assert name == "query-status", "must not sample a stopped guest"
            return {"status": "postmigrate"}

    with pytest.raises(UsageError, match=r"not running \(run state postmigrate\)"):
        plan_for(Fake(), 1.0, None)
