"""Snapshots: migrate to ``file:`` or through ``exec:gzip``, restore in a new process.

The restored guest, kept paused (``--paused``), is exactly where the source stopped (same
passes and counters), its invariant holds, and after ``cont`` it goes on.
"""

from __future__ import annotations

import shutil

import pytest

from livemig.testing.procs import ProcHarness


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["file", "exec-gzip"])
def test_snapshot_and_restore(harness: ProcHarness, kind: str) -> None:
    if kind == "exec-gzip" and shutil.which("gzip") is None:
        pytest.skip("gzip is not installed")
    snap = harness.path("snap.bin")
    if kind == "file":
        save, restore = f"file:{snap}", f"file:{snap}"
    else:
        save, restore = f"exec:gzip -c > {snap}.gz", f"exec:gzip -dc < {snap}.gz"
    src = harness.source(append="ws=8M rate=20000")
    src.wait_passes_increase(0)
    # a snapshot restored from the command line must carry checksums
    harness.migrate(src, save, caps={"events": True, "x-checksums": True})
    info = src.wait_migration(timeout=60)
    assert info["status"] == "completed", info
    assert src.status() == "postmigrate"
    saved = src.guest_check()
    assert saved["ok"], saved["problems"]
    src.kill()  # the snapshot must stand on its own

    dst = harness.destination(incoming=restore, extra=["--paused"])
    assert dst.wait_migration(timeout=30)["status"] == "completed"
    assert dst.wait_status("paused") == "paused"
    restored = dst.guest_check()
    assert restored["ok"], restored["problems"]
    for key in ("total-passes", "passes", "min-counter", "max-counter", "seed", "pages"):
        assert restored[key] == saved[key], key
    dst.cmd("cont")
    later = dst.wait_passes_increase(restored["total-passes"], timeout=20)
    assert later["ok"], later["problems"]


@pytest.mark.timeout(60)
def test_restore_from_truncated_file_fails(harness: ProcHarness) -> None:
    """A cut snapshot: the destination exits 1 and says where the stream ended."""
    snap = harness.path("snap.bin")
    src = harness.source(append="ws=4M rate=20000")
    src.wait_passes_increase(0)  # the working set is written: the stream carries 4 MiB
    harness.migrate(src, f"file:{snap}", caps={"x-checksums": True})
    assert src.wait_migration(timeout=60)["status"] == "completed"
    with open(snap, "r+b") as f:
        size = f.seek(0, 2)
        assert size > 4 << 20
        f.truncate(size // 2)  # cut in the middle of the RAM pages
    dst = harness.destination(incoming=f"file:{snap}", wait_qmp=False)
    assert dst.wait_exit(timeout=20) == 1
    assert "incoming migration failed: stream truncated" in dst.log()
    assert "at stream offset" in dst.log()


@pytest.mark.timeout(90)
def test_mapped_ram_restore_is_one_command(harness: ProcHarness) -> None:
    """``livemig run --incoming file:PATH --cap mapped-ram`` restores a mapped-ram snapshot (it
    needed migrate-set-capabilities typed by hand over QMP), and ``--set`` works the same way;
    what the process started with is its default (x-query-migrate-defaults)."""
    snap = harness.path("mapped.mig")
    src = harness.source(append="ws=8M rate=20000")
    src.wait_passes_increase(0)
    # (run --incoming file: wants a checksummed snapshot, as livemig migrate makes by default)
    harness.migrate(src, f"file:{snap}", caps={"mapped-ram": True, "x-checksums": True})
    assert src.wait_migration(timeout=60)["status"] == "completed"
    saved = src.guest_check()
    src.kill()
    dst = harness.destination(incoming=f"file:{snap}", extra=[
        "--paused", "--cap", "mapped-ram", "--set", "downtime-limit=42"])  # fmt: skip
    assert dst.wait_migration(timeout=30)["status"] == "completed"
    restored = dst.guest_check()
    assert restored["ok"] and restored["total-passes"] == saved["total-passes"], restored
    defaults = dst.cmd("x-query-migrate-defaults")
    assert {"capability": "mapped-ram", "state": True} in defaults["capabilities"]
    assert defaults["parameters"]["downtime-limit"] == 42


def test_run_refuses_a_bad_setting(harness: ProcHarness) -> None:
    bad = harness._spawn("dst", ["--incoming", "defer", "--memory", "16M", "--set",
                                 "downtime-limit=fast"], None, None, wait_qmp=False)  # fmt: skip
    assert bad.wait_exit(30) == 1
    assert "downtime-limit" in bad.log() and "Traceback" not in bad.log()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("command", "reason"),
    [
        # reads the whole stream, then fails (a full disk, a remote end that refused it)
        ("cat > /dev/null; exit 3", "exited with status 3"),
        # never reads: a stream small enough for the pipe was 'completed' all the same
        ("sleep 600", "did not exit within 2 s"),
    ],
)
def test_exec_command_that_fails_fails_the_migration(
    harness: ProcHarness, command: str, reason: str
) -> None:
    """``exec:`` has no return path: the command's exit is the only word on whether the stream
    was taken. It went unread: 'completed', the source left stopped in postmigrate with the
    snapshot lost. A command that exits non-zero, or does not exit once the stream has ended
    (within x-io-timeout), fails the migration, and the source guest runs on."""
    src = harness.source(guest="idle", append="")
    before = src.status()
    assert before == "running"
    harness.migrate(src, f"exec:{command}", params={"x-io-timeout": 2000})
    info = src.wait_migration(timeout=30)
    assert info["status"] == "failed", info
    assert reason in info["error-desc"], info
    assert src.wait_status("running", timeout=10) == "running"


@pytest.mark.timeout(60)
def test_exec_command_that_ends_mid_stream_says_how_it_ended(harness: ProcHarness) -> None:
    """A command that exits before it read the stream: the write's broken pipe was all the
    error said; now how the command ended, which is why."""
    src = harness.source(append="ws=8M rate=1000")
    src.wait_passes_increase(0)
    harness.migrate(src, "exec:head -c 1 > /dev/null; exit 5")
    info = src.wait_migration(timeout=30)
    assert info["status"] == "failed", info
    assert info["error-desc"].startswith(
        "the exec: command exited with status 5 before it took the whole stream"
    ), info
    assert src.wait_status("running", timeout=10) == "running"
