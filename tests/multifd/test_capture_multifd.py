"""``livemig capture --multifd``: a multifd migration from livemig's source (MULTIFD_FLUSH sync
points, 8.1+ style) captured into a one-channel stream that holds the guest's whole RAM, and a
capture that disagrees with its source failing cleanly on both sides. Real QEMU 7.2 sources (EOS
sync points) are in ``tests/qemu``."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from livemig.guests.memstress import check_invariant
from livemig.migration.manager import MigrationManager
from livemig.streams import analyze_stream as analyze
from livemig.testing.procs import wait_until

from .conftest import FINAL, MakePair, Pair

RAM = 16 << 20


def _capture(sock: Path, out: Path, *args: str) -> subprocess.Popen[str]:
    cap = subprocess.Popen(
        [sys.executable, "-m", "livemig", "capture", f"unix:{sock}", str(out),
         "--timeout", "10", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_until(lambda: sock.exists() or cap.poll() is not None, 10, "capture listens")
    return cap


def _migrate(
    p: Pair, sock: Path, caps: dict[str, bool], params: dict[str, Any], uri: str = ""
) -> dict:
    if caps:
        p.src_mgr.set_capabilities([{"capability": k, "state": v} for k, v in caps.items()])
    p.src_mgr.set_parameters(params)
    p.src_mgr.migrate(uri or f"unix:{sock}")
    deadline = time.monotonic() + 60
    while p.src_mgr.source.status.value not in FINAL:
        assert time.monotonic() < deadline, "migration did not finish"
        time.sleep(0.02)
    return p.src_mgr.query_migrate()


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_capture_of_a_multifd_migration_holds_all_ram(
    make_pair: MakePair, tmp_path: Path, compression: str
) -> None:
    p = make_pair("ws=1M rate=2000", ram=RAM)  # a guest that keeps dirtying pages
    time.sleep(0.2)
    sock, out = tmp_path / "mig.sock", tmp_path / "cap.mig"
    cap = _capture(sock, out, "--multifd", "3", "--multifd-compression", compression)
    info = _migrate(p, sock, {"multifd": True, "return-path": True},
                    {"multifd-channels": 3, "multifd-compression": compression,
                     "max-bandwidth": 16 << 20, "downtime-limit": 100})  # fmt: skip
    stdout, stderr = cap.communicate(timeout=30)
    assert cap.returncode == 0, stderr
    assert info["status"] == "completed", info
    assert info["ram"]["dirty-sync-count"] >= 3  # several passes: several sync points
    assert "from 3 multifd channels" in stdout, stdout
    ram = analyze(out.read_bytes(), keep_ram=True).ram["pc.ram"].reshape(-1)
    # the source stays paused after completion: its RAM is what was sent
    assert np.array_equal(ram, np.frombuffer(p.src.read_guest(0, RAM), np.uint8))
    report = check_invariant(lambda gpa, n: ram[gpa : gpa + n])
    assert report.ok, report.problems


@pytest.mark.parametrize(
    ("capture_args", "params", "error"),
    [
        (("--multifd", "2", "--multifd-compression", "zlib"), {"multifd-channels": 2},
         "compression flags 0x0, this side uses 'zlib'"),
        (("--multifd", "2"), {"multifd-channels": 3}, "channel id 2 out of range|different multifd-channels"),
        (("--multifd", "2", "--uuid", "12345678-1234-5678-1234-567812345678"),
         {"multifd-channels": 2}, "expected uuid '12345678-1234-5678-1234-567812345678'"),
        (("--timeout", "3"), {"multifd-channels": 2},
         r"opened 2 multifd channel\(s\) besides main .* capture it with --multifd 2"),
    ],
)  # fmt: skip
def test_capture_that_disagrees_with_its_source_fails_cleanly(
    make_pair: MakePair, tmp_path: Path, capture_args: tuple[str, ...], params: dict, error: str
) -> None:
    p = make_pair("ws=1M rate=2000", ram=RAM)
    sock, out = tmp_path / "mig.sock", tmp_path / "cap.mig"
    cap = _capture(sock, out, *capture_args)
    info = _migrate(p, sock, {"multifd": True, "return-path": True},
                    {**params, "max-bandwidth": 64 << 20})  # fmt: skip
    _stdout, stderr = cap.communicate(timeout=30)
    assert cap.returncode == 1 and re.search(error, stderr), stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    assert info["status"] == "failed", info
    assert p.src.runstate.value == "running"  # the guest went on


def test_capture_then_replay_with_other_channels_into_livemig(
    make_pair: MakePair, tmp_path: Path
) -> None:
    """A multifd migration captured into one stream, then ``livemig replay`` of it into a
    livemig destination with 3 channels and zstd: the sync points are the stream's own
    MULTIFD_FLUSH words, and the destination ends with the source's RAM."""
    p = make_pair("ws=1M rate=2000", ram=RAM)
    time.sleep(0.2)
    sock, out = tmp_path / "mig.sock", tmp_path / "cap.mig"
    cap = _capture(sock, out, "--multifd", "2")
    info = _migrate(p, sock, {"multifd": True, "return-path": True},
                    {"multifd-channels": 2, "max-bandwidth": 16 << 20, "downtime-limit": 100})  # fmt: skip
    _stdout, stderr = cap.communicate(timeout=30)
    assert cap.returncode == 0, stderr
    assert info["status"] == "completed", info
    p.dst_mgr = MigrationManager(p.dst, autostart=lambda: False)  # stays paused, as with -S
    p.dst_mgr.set_capabilities([{"capability": c, "state": True}
                                for c in ("multifd", "return-path")])  # fmt: skip
    p.dst_mgr.set_parameters({"multifd-channels": 3, "multifd-compression": "zstd"})
    uri = p.dst_mgr.incoming_start("tcp:127.0.0.1:0")
    rp = subprocess.run(
        [sys.executable, "-m", "livemig", "replay", str(out), uri, "--timeout", "10",
         "--multifd", "3", "--multifd-compression", "zstd"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert rp.returncode == 0, rp.stderr
    assert "over 3 multifd channels" in rp.stdout
    assert p.dst_mgr.incoming is not None and p.dst_mgr.incoming.join(10)
    assert p.dst_mgr.query_migrate()["status"] == "completed"
    assert bytes(p.dst.read_guest(0, RAM)) == bytes(p.src.read_guest(0, RAM))


def test_replay_with_multifd_of_a_stream_made_without(make_pair: MakePair, tmp_path: Path) -> None:
    """A snapshot made without multifd has no MULTIFD_FLUSH words: replay syncs its channels at
    every RAM section's EOS, as QEMU 7.2 does, and livemig's destination, having seen no flush
    word in the setup section, syncs there too."""
    p = make_pair("ws=1M rate=2000", ram=RAM)
    time.sleep(0.2)
    path = tmp_path / "snap.mig"
    info = _migrate(p, Path("unused"), {}, {"max-bandwidth": 16 << 20, "downtime-limit": 100},
                    uri=f"file:{path}")  # fmt: skip
    assert info["status"] == "completed", info
    p.dst_mgr = MigrationManager(p.dst, autostart=lambda: False)
    p.dst_mgr.set_capabilities([{"capability": "multifd", "state": True}])
    p.dst_mgr.set_parameters({"multifd-channels": 2})
    uri = p.dst_mgr.incoming_start("tcp:127.0.0.1:0")
    rp = subprocess.run(
        [sys.executable, "-m", "livemig", "replay", str(path), uri, "--timeout", "10",
         "--multifd", "2"], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert rp.returncode == 0, rp.stderr
    assert p.dst_mgr.incoming is not None and p.dst_mgr.incoming.join(10)
    assert p.dst_mgr.query_migrate()["status"] == "completed"
    assert bytes(p.dst.read_guest(0, RAM)) == bytes(p.src.read_guest(0, RAM))
