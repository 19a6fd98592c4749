"""Smoke test of ``livemig bench throughput``: every table and baseline on a small guest, each
migration verified (RAM hashes equal on both sides)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest

from livemig.bench import qemu_multifd, throughput


def test_tcp_baselines_move_every_byte_and_count_cpu() -> None:
    # each baseline raises if the receiver did not get every byte
    for n in (1, 2):
        r = throughput.tcp_streams(8 << 20, n)
        assert r.rate > 0 and r.cpu_per_gb > 0
    src = np.random.default_rng(5).integers(0, 256, 8 << 20, dtype=np.uint8)
    rx = throughput.GuestMemoryTcp(8 << 20)
    try:
        for n in (1, 2, 4):  # one receiver process for every run
            r = rx.run(n, src)
            assert r.rate > 0 and r.cpu_per_gb > 0
    finally:
        rx.close()
    assert rx.proc.returncode == 0


def test_bench_throughput_small_guest(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    args = argparse.Namespace(size="64M", channels="1,2", kinds="idle,random",
                              compress="none,zstd", repeat=1, dest_ram="fresh",
                              json=str(out), verify=True, no_qemu=True,
                              zero_page_detection="multifd")  # fmt: skip
    assert throughput.run(args) == 0
    res = json.loads(out.read_text())
    rows = {(r["memory"], r["channels"]): r for r in res["rows"]}
    assert set(rows) == {("idle", 1), ("idle", 2), ("random", 1), ("random", 2)}
    assert res["target"] == 0.85
    for (kind, _), r in rows.items():
        assert r["verified"] is True
        assert r["throughput"] > 0 and r["tcp"] > 0 and r["cpu_per_gb"] > 0
        assert r["ratio"] == r["throughput"] / r["tcp"]
        # each run has its own TCP baseline, measured just before it; the row is the median
        (run,) = r["runs"]
        assert run["tcp"] == r["tcp"] and run["ratio"] == r["ratio"]
        # the RAM-to-RAM baseline reads the guest's pages: only where they are data
        assert ("tcp_ram_to_ram" in r) == (kind == "random")
    # idle: one page in 64 has data, the rest go as zero pages (a few bytes each)
    assert rows[("idle", 1)]["bytes_per_page"] < 0.1 * rows[("random", 1)]["bytes_per_page"]
    comp = {c["method"]: c for c in res["compression"]}
    assert comp["zstd"]["verified"] is True and comp["none"]["verified"] is True
    # the mixed image's text third compresses: fewer bytes on the wire with zstd
    assert comp["zstd"]["bytes_per_page"] < 0.8 * comp["none"]["bytes_per_page"]


def test_paired_ratio_is_the_median_of_each_rounds_own_ratio() -> None:
    runs = [{"ratio_qemu": 1.3}, {"ratio_qemu": 0.9}, {"ratio_qemu": 1.1}, {"other": 5.0}]
    assert throughput._paired(runs, "ratio_qemu") == {"median": 1.1, "min": 0.9, "max": 1.3}
    assert throughput._spread({"median": 1.1, "min": 0.9, "max": 1.3}) == "1.10 (0.90-1.30)"
    assert throughput._spread({"median": 1.1, "min": 1.1, "max": 1.1}) == "1.10"


def test_bench_throughput_without_zero_page_detection(tmp_path: Path) -> None:
    """zero-page-detection none: an idle guest's pages go as data, and still arrive."""
    out = tmp_path / "t.json"
    args = argparse.Namespace(size="32M", channels="1", kinds="idle", compress="", repeat=1,
                              dest_ram="fresh", json=str(out), verify=True, no_qemu=True,
                              zero_page_detection="none")  # fmt: skip
    assert throughput.run(args) == 0
    res = json.loads(out.read_text())
    assert res["zero_page_detection"] == "none"
    (row,) = res["rows"]
    assert row["verified"] is True
    assert row["bytes_per_page"] > 4096  # every page as data (plus its share of a header)


@pytest.mark.skipif(not qemu_multifd.available(), reason="qemu-system-x86_64 is not installed")
def test_bench_throughput_beside_qemu(tmp_path: Path) -> None:
    """QEMU (10.0 when installed) migrates the same RAM in the same round, beside prefaulted
    rows only; every row names the QEMU it measured."""
    out = tmp_path / "t.json"
    args = argparse.Namespace(size="64M", channels="2", kinds="random", compress="", repeat=2,
                              dest_ram="both", json=str(out), verify=False, no_qemu=False,
                              zero_page_detection="multifd")  # fmt: skip
    assert throughput.run(args) == 0
    rows = {r["dest_ram"]: r for r in json.loads(out.read_text())["rows"]}
    assert "qemu" not in rows["fresh"]
    r = rows["prefaulted"]
    assert r["qemu"] > 0 and r["qemu_cpu_per_gb"] > 0
    assert r["ratio_qemu"] == r["throughput"] / r["qemu"]
    assert len(r["runs"]) == 2 and all(run["qemu"] > 0 for run in r["runs"])
    # each round's livemig against that round's QEMU and RAM-to-RAM baseline, and their median
    for key in ("ratio_qemu", "ratio_ram_to_ram"):
        paired = sorted(run[key] for run in r["runs"])
        assert r["paired_" + key[6:]] == {"median": paired[1], "min": paired[0],
                                          "max": paired[1]}  # fmt: skip
    from livemig.bench.qemu_baseline import qemu_label

    assert r["qemu_version"] == qemu_label() and qemu_label().startswith("QEMU ")
    assert not list(Path("/dev/shm").glob(f"livemig-bench-{os.getpid()}-*"))  # RAM files gone


def test_two_hosts_with_and_without_checksums(tmp_path: Path) -> None:
    """--two-hosts --checksums both: each round migrates without, then with x-checksums, over
    the shaped link, and the table gets the cost column from the medians."""
    from livemig.bench import two_hosts
    from livemig.errors import UsageError
    from livemig.netns import TwoHosts

    try:
        TwoHosts.check()
    except UsageError as exc:  # not root / no ip(8): the namespaces cannot be made
        pytest.skip(str(exc))
    out = tmp_path / "2h.json"
    args = argparse.Namespace(size="64M", ws="16M", rate="1gbit", comp=50, compress="none",
                              repeat=1, checksums="both", json=str(out),
                              no_qemu=True)  # fmt: skip
    assert two_hosts.run(args) == 0
    rows = json.loads(out.read_text())["runs"]
    assert [(r["method"], r["checksums"]) for r in rows] == [("none", False), ("none", True)]
    for r in rows:
        assert r["total_ms"] > 0 and r["normal"] > 0
