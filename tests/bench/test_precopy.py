"""Smoke tests of ``livemig bench precopy``: its helpers on synthetic data, and every code path
of the benchmark on tiny guests (no QEMU: the baseline needs a kernel download, which only
``LIVEMIG_BENCH_QEMU=1`` allows here)."""

from __future__ import annotations

import argparse
import os

import pytest

from livemig.bench import precopy
from livemig.bench.common import loopback_tcp_throughput, summarize, window_throughput
from livemig.bench.qemu_baseline import newc_archive, qemu_argv, qemu_available
from livemig.errors import UsageError


def _parse_newc(blob: bytes) -> list[tuple[str, int, bytes, int, int]]:
    """(name, mode, data, rdevmajor, rdevminor) of each entry, checking the format as we go."""
    out, off = [], 0
    while True:
        assert blob[off : off + 6] == b"070701", f"bad magic at {off}"
        f = [int(blob[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = blob[off + 110 : off + 110 + namesize - 1].decode()
        assert blob[off + 110 + namesize - 1] == 0
        off += 110 + namesize
        off += -off % 4
        data = blob[off : off + filesize]
        off += filesize
        off += -off % 4
        if name == "TRAILER!!!":
            return out
        out.append((name, f[1], data, f[9], f[10]))


def test_newc_archive_round_trips() -> None:
    blob = newc_archive({"init": b"\x7fELF-odd-size"}, ["dev"], {"dev/console": (5, 1)})
    assert len(blob) % 512 == 0
    entries = {e[0]: e for e in _parse_newc(blob)}
    assert set(entries) == {"dev", "dev/console", "init"}
    assert entries["dev"][1] & 0o170000 == 0o040000
    assert entries["dev/console"][1] & 0o170000 == 0o020000
    assert entries["dev/console"][3:] == (5, 1)
    assert entries["init"][2] == b"\x7fELF-odd-size"
    assert entries["init"][1] & 0o111


@pytest.mark.parametrize(("version", "kib"), [((7, 2, 22), "1048584k"), ((10, 0, 2), "1048576k")])
def test_qemu_argv_unaligned_tcg_before_9(
    monkeypatch: pytest.MonkeyPatch, version: tuple[int, int, int], kib: str
) -> None:
    from livemig.bench import qemu_baseline
    from livemig.testing.qemu import QemuBinary

    monkeypatch.setattr(qemu_baseline, "qemu_binary", lambda: QemuBinary("/q10", version))
    argv = qemu_argv(1 << 30, "k", "i", "console=ttyS0", "/q", "/s", incoming=True)  # type: ignore[arg-type]
    assert argv[0] == "/q10"
    assert argv[argv.index("-m") + 1] == kib  # 1 GiB + 8 KiB before 9.0: its TCG bug
    assert argv[argv.index("-accel") + 1] == "tcg" and "-enable-kvm" not in argv
    assert argv[-2:] == ["-incoming", "defer"]
    assert qemu_baseline.qemu_label() == "QEMU " + ".".join(map(str, version))


def test_pass_rate_sums_vcpus_and_windows() -> None:
    lines = [(10.0 + i * 0.1, f"memstress: cpu0 pass {100 + i * 2}") for i in range(11)]
    lines += [(10.05 + i * 0.1, f"memstress: cpu1 pass {50 + i}") for i in range(11)]
    lines.append((10.5, "idle: something else"))
    assert precopy.pass_rate(lines, 10.0, 11.1) == pytest.approx(30.0)
    assert precopy.pass_rate(lines, 10.0, 10.5) == pytest.approx(30.0)
    assert precopy.pass_rate(lines, 10.0, 10.01) is None  # one mark: no rate
    assert precopy.pass_rate([], 0, 1) is None


def test_window_throughput_and_summary() -> None:
    def info(status: str, sent: int) -> dict:
        return {"status": status, "ram": {"transferred": sent}}

    samples = [(0.0, info("setup", 0)), (1.0, info("active", 100)), (1.6, info("active", 400)),
               (2.0, info("active", 600)), (2.1, info("completed", 700))]  # fmt: skip
    assert window_throughput(samples, skip_s=0.5) == pytest.approx(200 / 0.4)
    assert window_throughput(samples[:2]) is None
    assert summarize([3.0, None, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert summarize([None])["median"] is None


def test_loopback_baseline_counts_every_byte() -> None:
    assert loopback_tcp_throughput(16 << 20) > 10e6


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    precopy.register(parser.add_subparsers())
    return parser.parse_args(["precopy", *argv])


def test_config_from_args() -> None:
    cfg = precopy.config_from_args(_args("--quick", "--no-qemu", "--rates", "10,20"))
    assert cfg.sizes == [256 << 20] and cfg.rates == [10, 20] and not cfg.qemu
    with pytest.raises(UsageError):
        precopy.config_from_args(_args("--only", "idle,bogus"))
    with pytest.raises(UsageError):
        precopy.config_from_args(_args("--repeat", "0"))


@pytest.mark.timeout(90)
def test_bench_precopy_tiny_end_to_end() -> None:
    """Every scenario on 32 MiB guests: migrations complete, the guests survive, figures exist."""
    cfg = precopy.Config(sizes=[32 << 20], dirty_memory=32 << 20, ws=8 << 20, rates=[20],
                         limits=[300], window=1.0, qemu=False, tcp_bytes=64 << 20,
                         brownout_bws=[32 << 20])  # fmt: skip
    result = precopy.run_bench(cfg)
    by = {sc["scenario"]: sc for sc in result["scenarios"]}
    assert by["idle"]["livemig_ok"] == "1/1" and by["idle"]["livemig"]["median"] > 0
    assert by["downtime"]["livemig_ok"] == "1/1"
    assert 0 <= by["downtime"]["livemig"]["median"] < 5000
    tp = by["throughput"]
    assert tp["tcp_beside_guest_bytes_per_s"] > 0
    assert tp["tcp_ram_to_ram_beside_guest_bytes_per_s"] > 0 and tp["ceiling"] > 0
    # The window normally ends it (cancel); a tiny working set may still converge first.
    status = tp["runs"]["livemig"][0]["status"]
    assert status in ("cancelled", "completed")
    if status == "cancelled":  # the window ran its course: both figures were measured
        assert tp["throughput"]["median"] > 0 and tp["brownout"]["median"] is not None
    mf = tp["multifd"]  # the same window over 2 multifd channels
    assert mf["channels"] == 2 and mf["runs"][0]["status"] in ("cancelled", "completed")
    if mf["runs"][0]["status"] == "cancelled":
        assert mf["throughput"]["median"] > 0 and mf["ratio"]["median"] > 0
    assert mf["tcp_ram_to_ram_beside_guest_bytes_per_s"] > 0 and mf["ceiling"] > 0
    pinned = [sc for sc in result["scenarios"] if sc["scenario"] == "brownout" and sc["pinned"]]
    if len(os.sched_getaffinity(0)) > 1:  # a CPU for the vCPU, the rest for the migration
        (pb,) = pinned
        run = pb["runs"]["livemig"][0]
        assert pb["max_bandwidth"] == 0 and run["status"] in ("cancelled", "completed")
        assert run["extra"]["pinned-vcpus"] == 1  # from boot
        # Like the unpinned window, the tiny working set may converge first (once in a loaded
        # full-suite run); then the threads may have ended before they were pinned.
        if run["status"] == "cancelled":
            # the source's migration thread(s) and the destination's incoming one
            assert run["extra"]["pinned-migration-threads"] >= 2
            assert pb["brownout"]["median"] is not None
    else:
        assert not pinned
    bo = by["brownout"]
    assert bo["max_bandwidth"] == 32 << 20 and bo["runs"]["livemig"][0]["status"] == "cancelled"
    # held to 32 MiB/s, it must not have sent much faster than that
    assert 0 < bo["throughput"]["median"] < 2 * (32 << 20)
    assert bo["brownout"]["median"] is not None
    assert result["rss"]["src_max_share"] > 0.5 and result["rss"]["dst_max_share"] > 0.9
    precopy.render(result)  # renders without a QEMU column


@pytest.mark.qemu
@pytest.mark.skipif(not os.environ.get("LIVEMIG_BENCH_QEMU"), reason="set LIVEMIG_BENCH_QEMU=1: "
                    "downloads a Debian kernel with apt-get")  # fmt: skip
@pytest.mark.skipif(not qemu_available(), reason="no QEMU")
@pytest.mark.timeout(300)
def test_qemu_baseline_small_guest() -> None:
    from livemig.bench.common import free_port
    from livemig.bench.qemu_baseline import run_qemu_migration

    fig = run_qemu_migration(128 << 20, 16, 20, params={"max-bandwidth": 0}, port=free_port())
    assert fig.status == "completed" and fig.ok, fig.notes
    assert fig.blackout_ms is not None and fig.transferred > 16 << 20
