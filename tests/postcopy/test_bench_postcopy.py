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
