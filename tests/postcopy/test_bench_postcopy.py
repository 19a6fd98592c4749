"""``livemig bench postcopy`` on a tiny guest: one configuration measures and reports sane
figures (the full benchmark and ``--vs-qemu`` run only when asked). Source and destination are
two ``livemig run`` processes."""

from __future__ import annotations

from livemig.bench.postcopy import measure


def test_measure_small_preempt_prefetch() -> None:
    r = measure(32 << 20, "16M", 2, True, 4, 64 << 20, rate_mib=512)
    assert r["vm"] == "livemig" and r["preempt"] is True and r["prefetch"] == 4
    assert r["requests"] > 0
    lat = r["latency"]
    assert lat["count"] == r["requests"]
    assert 0 < lat["p50-us"] <= lat["p90-us"] <= lat["p99-us"] <= lat["max-us"]
    assert r["dirty-gbps"] > 0.1  # 512 MiB/s asked
    assert 0 < r["postcopy-s"] < r["total-s"]
    # a request for a page already on its way sends nothing more: no ">= requests" here
    # the push sent pages too: its RAM-order walk, or the readahead windows of the vCPUs'
    # sequential streams (which may cover a 16M working set on their own)
    assert r["requested-sent"] > 0 and r["pushed"] + r["readahead"] > 0
    # the guest ran on the destination during post-copy, not only once every page was there
    # (one benchmark run in ~70 once showed no requests and no progress; this would catch it)
    assert r["passes-during-postcopy"] > 0 and r["progress-share"] > 0


def test_repeated_rows_report_every_runs_blocktime_and_the_median() -> None:
    """With --repeat, the blocktime of each run and their median (not only the median-p50
    run's), and QEMU's rows get repeated runs too: the issue's ratios are of medians."""
    from livemig.bench.postcopy import _blocktime_cell, _median_qemu_run, _median_run

    runs = [{"latency": {"p50-us": p50, "p99-us": 900.0}, "floor": {"p50-us": 70.0},
             "blocktime-ms": bt} for p50, bt in ((300.0, 40), (200.0, 90), (250.0, 10))]  # fmt: skip
    row = _median_run(runs)
    assert row["blocktime-ms"] == 10  # the median-p50 run's own figure
    assert [r["blocktime-ms"] for r in row["runs"]] == [40, 90, 10]
    assert row["blocktime-median-ms"] == 40
    assert _blocktime_cell(row) == "40 (40/90/10)"
    q = _median_qemu_run([{"blocktime-ms": bt, "requests": 1, "downtime-ms": 150}
                          for bt in (105, 73, 92)])  # fmt: skip
    assert q["blocktime-ms"] == 92 and q["blocktime-median-ms"] == 92
    assert [r["blocktime-ms"] for r in q["runs"]] == [105, 73, 92]
    assert _median_qemu_run([{"blocktime-ms": None}])["blocktime-ms"] is None  # failed run kept
