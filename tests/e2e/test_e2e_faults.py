"""Faults between real processes: a destination killed, stalled, or fed a malformed stream.

In each case the source reports ``failed`` with a reason, its guest keeps running with memory
intact, and it leaks no thread or file descriptor (``/proc/PID/task`` and ``/proc/PID/fd``
counted before and after).
"""

from __future__ import annotations

import os
import signal
import socket

import pytest

from livemig.testing.procs import LivemigProcess, ProcError, ProcHarness, wait_until

from .test_e2e_cancel import assert_source_unharmed, migrate_again

SLOW = {"max-bandwidth": 8 << 20}


def resources(proc: LivemigProcess) -> tuple[int, int]:
    """Open fds, and OS threads less the QMP server's command pool (up to 4 idle workers that
    it keeps by design, started whenever commands overlap)."""
    pool = sum(t["name"].startswith("qmp-cmd") for t in proc.cmd("x-debug-threads"))
    return proc.fd_count(), proc.thread_count() - pool


def describe(proc: LivemigProcess) -> str:
    fds = sorted(
        os.readlink(f"/proc/{proc.pid}/fd/{f}") for f in os.listdir(f"/proc/{proc.pid}/fd")
    )
    return f"fds {fds}, threads {proc.cmd('x-debug-threads')}"


def assert_no_leak(src: LivemigProcess, baseline: tuple[int, int]) -> None:
    # the migration's threads wind down right after the state change: wait a little for them
    try:
        wait_until(lambda: resources(src) == baseline, 10, f"fds/threads back to {baseline}")
    except ProcError as exc:
        raise AssertionError(f"{exc}: now {resources(src)}, {describe(src)}") from exc


def start_slow_migration(h: ProcHarness, src: LivemigProcess, dst: LivemigProcess, **params: int):
    h.migrate(src, dst.incoming, caps={"events": True, "return-path": True},
              params={**SLOW, **params})  # fmt: skip
    wait_until(
        lambda: src.query_migrate().get("ram", {}).get("transferred", 0) > 2 << 20,
        15,
        "2 MiB sent",
    )


@pytest.mark.timeout(90)
def test_destination_killed(harness: ProcHarness) -> None:
    src = harness.source(append="ws=16M rate=20000")
    dst = harness.destination()
    before = src.wait_passes_increase(0)
    baseline = resources(src)
    start_slow_migration(harness, src, dst)
    dst.signal(signal.SIGKILL)
    info = src.wait_migration(timeout=20)
    assert info["status"] == "failed", info
    assert info["error-desc"], info
    assert [d["status"] for _, d in src.event_names("MIGRATION")][-1] == "failed"
    assert_source_unharmed(src, before)
    assert_no_leak(src, baseline)
    migrate_again(harness, src)


@pytest.mark.timeout(90)
def test_destination_killed_at_switchover(harness: ProcHarness) -> None:
    """The destination dies while the source waits at pre-switchover (its guest stopped);
    migrate-continue then fails the migration and the guest runs again, with QEMU 10.0's
    events in its order: MIGRATION failed, then RESUME (livemig sent RESUME first)."""
    src = harness.source(append="ws=16M rate=20000")
    dst = harness.destination()
    before = src.wait_passes_increase(0)
    harness.migrate(src, dst.incoming, caps={"events": True, "pause-before-switchover": True})
    src.wait_migration(timeout=30, states=frozenset({"pre-switchover"}))
    dst.signal(signal.SIGKILL)
    dst.wait_exit()
    src.cmd("migrate-continue", state="pre-switchover")
    info = src.wait_migration(timeout=20)
    assert info["status"] == "failed" and info["error-desc"], info
    src.wait_status("running")
    names = [(e, d["status"] if e == "MIGRATION" else None) for e, d in src.event_names()
             if e in ("MIGRATION", "STOP", "RESUME")]  # fmt: skip
    at = names.index(("MIGRATION", "pre-switchover")) - 1
    assert names[at:] == [("STOP", None), ("MIGRATION", "pre-switchover"),
                          ("MIGRATION", "device"), ("MIGRATION", "failed"),
                          ("RESUME", None)], names  # fmt: skip
    assert_source_unharmed(src, before)


@pytest.mark.timeout(90)
def test_destination_stalled(harness: ProcHarness) -> None:
    """SIGSTOP: the peer neither reads nor closes; x-io-timeout (1 s) fails the migration."""
    src = harness.source(append="ws=16M rate=20000")
    dst = harness.destination()
    before = src.wait_passes_increase(0)
    baseline = resources(src)
    start_slow_migration(harness, src, dst, **{"x-io-timeout": 1000})
    dst.signal(signal.SIGSTOP)
    try:
        info = src.wait_migration(timeout=20)
        assert info["status"] == "failed", info
        assert "no progress" in info["error-desc"], info
        assert_source_unharmed(src, before)
        assert_no_leak(src, baseline)
    finally:
        dst.signal(signal.SIGCONT)
    # the stalled destination, once woken, finds its stream cut and exits 1
    assert dst.wait_exit(timeout=20) == 1, dst.log()


@pytest.mark.timeout(60)
def test_malformed_stream_into_destination(harness: ProcHarness) -> None:
    """Garbage after a valid header: the destination exits 1 naming the stream offset."""
    dst = harness.destination()
    assert dst.incoming is not None
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(dst.incoming[len("unix:") :])
        # QEMU_VM_FILE_MAGIC, version 3, then a section type that does not exist
        s.sendall(b"QEVM\x00\x00\x00\x03" + b"\x7f" * 64)
        assert dst.wait_exit(timeout=20) == 1
    log = dst.log()
    assert "incoming migration failed" in log
    assert "offset 8 (0x8)" in log, log


@pytest.mark.timeout(90)
def test_destination_rejects_stream(harness: ProcHarness) -> None:
    """A destination with less RAM refuses the block list at setup: XError with its reason,
    then SHUT(1); the source fails and says why."""
    src = harness.source(append="ws=8M rate=20000")
    dst = harness.destination(memory="32M")
    before = src.wait_passes_increase(0)
    baseline = resources(src)
    harness.migrate(src, dst.incoming, caps={"return-path": True})
    info = src.wait_migration(timeout=20)
    assert info["status"] == "failed", info
    # the destination's own words, not only the broken pipe or SHUT(1) it left behind
    err = info["error-desc"]
    assert err.startswith("destination refused: ") and "pc.ram" in err, info
    assert dst.wait_exit(timeout=20) == 1
    assert "pc.ram" in dst.log(), dst.log()
    assert_source_unharmed(src, before)
    assert_no_leak(src, baseline)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault", ["killed", "stalled"])
def test_multifd_destination_fault(harness: ProcHarness, fault: str) -> None:
    """The same with two multifd channels: every channel's thread gives up, the source fails
    cleanly with the first reason and leaks nothing."""
    src = harness.source(append="ws=16M rate=20000")
    uri = f"unix:{harness.path('mf-fault.sock')}"
    dst = harness.destination(incoming="defer")
    dst.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    dst.cmd("migrate-incoming", uri=uri)
    before = src.wait_passes_increase(0)
    baseline = resources(src)
    params = {**SLOW, **({"x-io-timeout": 1000} if fault == "stalled" else {})}
    harness.migrate(src, uri, caps={"events": True, "return-path": True, "multifd": True},
                    params=params)  # fmt: skip
    wait_until(lambda: src.query_migrate().get("ram", {}).get("multifd-bytes", 0) > 2 << 20,
               15, "2 MiB sent on the multifd channels")  # fmt: skip
    dst.signal(signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
    try:
        info = src.wait_migration(timeout=20)
        assert info["status"] == "failed", info
        assert info["error-desc"], info
        if fault == "stalled":
            assert "no progress" in info["error-desc"] or "within" in info["error-desc"], info
        assert_source_unharmed(src, before)
        assert_no_leak(src, baseline)
    finally:
        if fault == "stalled":
            dst.signal(signal.SIGCONT)
    # and multifd again, to a fresh destination: nothing of the failed attempt is left over
    uri2 = f"unix:{harness.path('mf-again.sock')}"
    dst2 = harness.destination(incoming="defer")
    dst2.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    dst2.cmd("migrate-incoming", uri=uri2)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 128 << 20, "x-io-timeout": 30000})
    src.cmd("migrate", uri=uri2)
    info = src.wait_migration(timeout=60)
    assert info["status"] == "completed", info
    assert info["ram"]["multifd-bytes"] > 0
    dst2.wait_status("running")
    assert dst2.guest_check()["ok"]
