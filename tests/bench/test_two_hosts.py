"""``bench throughput --two-hosts`` beside QEMU: the dirtier's memory against memstress's, its
kernel argument, the summary table, and (root, QEMU 10, a cached or allowed kernel) one tiny
round end to end over a shaped link."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from livemig.bench import qemu_baseline, two_hosts
from livemig.bench.qemu_baseline import DIRTIER_C, dirty_arg, qemu_argv
from livemig.errors import UsageError
from livemig.guests.memstress import page_pattern


def test_dirty_arg() -> None:
    assert dirty_arg(512, 2000, 50) == "dirty=512,7.8125,50"  # memstress rate=2000 pages/s
    assert dirty_arg(64, 25600) == "dirty=64,100"  # the old two-field form: one byte a page
    assert dirty_arg(8, 0, 0) == "dirty=8,0,0"
    assert dirty_arg(8, 1, 100) == "dirty=8,0.003906,100"
    with pytest.raises(UsageError, match="percentage"):
        dirty_arg(8, 10, 101)
    with pytest.raises(UsageError, match=">= 0"):
        dirty_arg(-1, 10)


@pytest.fixture(scope="module")
def dirtier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dirtier built for this host (the guest's /init is the same C, linked static)."""
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc})")
    d = tmp_path_factory.mktemp("dirtier")
    (d / "dirtier.c").write_text(DIRTIER_C)
    subprocess.run([cc, "-O2", "-o", str(d / "dirtier"), str(d / "dirtier.c")], check=True,
                   timeout=120)  # fmt: skip
    return d / "dirtier"


def _dump(exe: Path, arg: str) -> np.ndarray:
    env = {**os.environ, "dirty": arg.split("=", 1)[1], "dirtier_dump": "1"}
    out = subprocess.run([str(exe)], env=env, capture_output=True, check=True, timeout=60).stdout
    return np.frombuffer(out, np.uint64).reshape(-1, 512)


@pytest.mark.parametrize("comp", [0, 50, 100])
def test_dirtier_fills_its_working_set_as_memstress_does(dirtier: Path, comp: int) -> None:
    import zlib

    words = _dump(dirtier, dirty_arg(2, 2000, comp))
    assert words.shape == (512, 512)  # 2 MiB of pages
    assert not words[:, 0].any()  # the counters, before any pass
    assert (words[:, 1:] == page_pattern(1, np.arange(512, dtype=np.uint64), comp)).all()
    raw = words.tobytes()
    small = sum(len(zlib.compress(raw[i * 4096 : (i + 1) * 4096])) < 512 for i in range(512))
    assert abs(small - 512 * comp / 100) <= 512 * 0.08  # comp percent of the pages compress


def test_dirtier_without_comp_touches_one_byte_a_page(dirtier: Path) -> None:
    words = _dump(dirtier, dirty_arg(1, 256))
    assert (words[:, 0] == 1).all() and not words[:, 1:].any()


def test_initramfs_is_rebuilt_when_the_dirtier_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which(os.environ.get("CC", "gcc")) is None:
        pytest.skip("no C compiler")
    first = qemu_baseline.build_initramfs(tmp_path)
    assert qemu_baseline.build_initramfs(tmp_path) == first  # cached
    monkeypatch.setattr(qemu_baseline, "DIRTIER_C", DIRTIER_C + "\n/* changed */\n")
    second = qemu_baseline.build_initramfs(tmp_path)
    assert second != first and second.exists() and first.exists()


def test_qemu_argv_takes_the_vcpu_count() -> None:
    if not qemu_baseline.qemu_available():
        pytest.skip("no QEMU")
    argv = qemu_argv(1 << 30, Path("k"), Path("i"), "x", "/q", "/s", smp=2)
    assert argv[argv.index("-smp") + 1] == "2"
    argv = qemu_argv(1 << 30, Path("k"), Path("i"), "x", "/q", "/s")
    assert argv[argv.index("-smp") + 1] == "1"  # the other benches' default


def _row(vm: str, method: str, total: int, checksums: bool | None = True, rate: str = "1gbit"
         ) -> dict:  # fmt: skip
    return {"vm": vm, "rate": rate, "method": method, "checksums": checksums, "total_ms": total,
            "downtime_ms": total // 100, "transferred": total * 1000, "cpu_s": 1.0}  # fmt: skip


def test_summarize_medians_ranges_and_ratio() -> None:
    q = "QEMU 10.0.2"
    rows = [_row("livemig", "none", t) for t in (5000, 4000, 6000)]
    rows += [_row(q, "none", t, None) for t in (8000, 9000, 10000)]
    rows += [_row("livemig", "zstd", 3000), _row(q, "zstd", 2000, None)]
    rows += [_row("livemig", "none", 500, rate="10gbit"), _row(q, "none", 1000, None, "10gbit")]
    none, zstd, fast = two_hosts.summarize(rows, q)
    assert (none["rate"], none["method"]) == ("1gbit", "none")
    assert (none["runs"], none["qemu_runs"]) == (3, 3)
    assert none["livemig_total_ms"] == 5000 and none["qemu_total_ms"] == 9000
    assert none["livemig_total_range"] == (4000, 6000)
    assert none["qemu_total_range"] == (8000, 10000)
    assert none["ratio"] == pytest.approx(5000 / 9000)
    assert zstd["ratio"] == pytest.approx(1.5)  # slower than QEMU: shown, not hidden
    assert fast["rate"] == "10gbit" and fast["ratio"] == pytest.approx(0.5)
    alone = two_hosts.summarize([r for r in rows if r["vm"] == "livemig"], None)
    assert all(ln["ratio"] is None and ln["qemu_total_ms"] is None for ln in alone)


def _args(**kw: object) -> argparse.Namespace:
    base = {"size": "256M", "ws": "16M", "rate": "1gbit", "comp": 50, "compress": "none",
            "repeat": 1, "checksums": "on", "json": None, "no_qemu": False}  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def test_without_qemu_installed_it_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu_baseline, "qemu_available", lambda: False)
    with pytest.raises(UsageError, match=r"no QEMU is installed.*--no-qemu"):
        two_hosts.run(_args())


def test_a_bad_link_rate_is_refused_first() -> None:
    with pytest.raises(UsageError, match="link rate"):
        two_hosts.run(_args(rate="1gbit,fast", no_qemu=True))


def _root_and_netns() -> None:
    from livemig.netns import TwoHosts

    try:
        TwoHosts.check()
    except UsageError as exc:  # not root / no ip(8): the namespaces cannot be made
        pytest.skip(str(exc))


def _qemu10_and_kernel() -> None:
    q = qemu_baseline.qemu_binary()
    if q is None or not q.at_least(10):
        pytest.skip(f"needs QEMU 10 (found {q.label if q else 'none'})")
    kernel = qemu_baseline.cache_dir() / f"vmlinuz-{qemu_baseline.KERNEL_PACKAGE}"
    if not kernel.exists() and not os.environ.get("LIVEMIG_BENCH_QEMU"):
        pytest.skip("no cached baseline kernel: set LIVEMIG_BENCH_QEMU=1 to download it")


@pytest.mark.qemu
@pytest.mark.timeout(180)
def test_two_hosts_beside_qemu_end_to_end(tmp_path: Path) -> None:
    """One tiny round over a shaped link: livemig then QEMU 10, each checked after, the table
    and JSON naming QEMU's version."""
    _root_and_netns()
    _qemu10_and_kernel()
    out = tmp_path / "2h.json"
    assert two_hosts.run(_args(json=str(out))) == 0
    res = json.loads(out.read_text())
    label = qemu_baseline.qemu_label()
    assert res["qemu"] == label and label.startswith("QEMU 10.")
    assert [r["vm"] for r in res["runs"]] == ["livemig", label]
    for r in res["runs"]:
        assert r["total_ms"] > 0 and r["downtime_ms"] is not None and r["cpu_s"] > 0
        assert r["transferred"] > 16 << 20  # at least the working set went
    (line,) = res["summary"]
    assert line["ratio"] == pytest.approx(res["runs"][0]["total_ms"] / res["runs"][1]["total_ms"])


def test_table_names_qemus_version_in_every_qemu_label() -> None:
    from rich.console import Console

    q = "QEMU 10.0.2"
    rows = [_row("livemig", "zstd", 3000), _row(q, "zstd", 2000, None)]
    t = two_hosts.table(two_hosts.summarize(rows, q), q, "1G", "512M", 50, 1)
    heads = [str(c.header) for c in t.columns]
    assert all(q in h for h in heads if "QEMU" in h or "/" in h)
    assert q in str(t.title) and "2 vCPUs each" in str(t.title)
    console = Console(width=300, record=True)
    console.print(t)
    text = console.export_text()
    assert "3.00 (3.00-3.00)" in text and "1.50" in text  # livemig, slower: the ratio says so
    assert "30 / 20" in text  # downtime ms, livemig / QEMU
    alone = two_hosts.table(two_hosts.summarize(rows[:1], None), None, "1G", "512M", 50, 1)
    assert "not run" in str(alone.title)


def test_beat_rate_from_the_dirtiers_heartbeats() -> None:
    lines = [(10.0, "dirtier: ready ws=8 MiB rate=7.8125 MiB/s comp=50")]
    lines += [(10.0 + i, f"dirtier: beat {i} written {2000 * i + 3}") for i in range(1, 5)]
    assert two_hosts.beat_rate(lines) == pytest.approx(2000)
    assert two_hosts.beat_rate(lines[:2]) is None  # one beat: no rate
