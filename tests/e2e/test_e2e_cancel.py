"""``migrate_cancel`` between real processes, at setup, while active and right before completion.

Each time the source guest keeps running with its memory intact, query-migrate says
``cancelled``, the destination reports the failure and exits 1, and a second migration to a
fresh destination succeeds. Cancel is idempotent: twice in a row, and with nothing running.
"""

from __future__ import annotations

import socket
import time

import pytest

from livemig.testing.procs import LivemigProcess, ProcHarness, wait_until

SLOW = {"max-bandwidth": 8 << 20}  # 64 MiB of guest at 8 MiB/s: several seconds of pre-copy


def assert_source_unharmed(src: LivemigProcess, before: dict) -> None:
    """After a cancelled/failed migration the source guest runs on and its memory is whole."""
    src.wait_status("running", timeout=10)
    now = src.guest_check()
    assert now["ok"], now["problems"]
    assert now["total-passes"] >= before["total-passes"]
    later = src.wait_passes_increase(now["total-passes"], timeout=20)
    assert later["ok"], later["problems"]


def assert_destination_failed(dst: LivemigProcess) -> None:
    """The destination said why in its log and exited with status 1."""
    assert dst.wait_exit(timeout=20) == 1, dst.log()
    assert "incoming migration failed" in dst.log()


def migrate_again(h: ProcHarness, src: LivemigProcess) -> None:
    """A second migration, to a fresh destination, completes."""
    dst2 = h.destination()
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 128 << 20})
    h.migrate(src, dst2.incoming, caps={"pause-before-switchover": False})
    info = src.wait_migration(timeout=60)
    assert info["status"] == "completed", info
    dst2.wait_status("running")
    report = dst2.guest_check()
    assert report["ok"], report["problems"]


def cancelled_statuses(src: LivemigProcess) -> list[str]:
    return [d["status"] for _, d in src.event_names("MIGRATION")]


@pytest.mark.timeout(90)
def test_cancel_at_setup_then_again(harness: ProcHarness) -> None:
    src = harness.source(append="ws=16M rate=20000")
    dst = harness.destination()
    before = src.wait_passes_increase(0)
    # nothing to cancel yet: a no-op, no error
    src.cmd("migrate_cancel")
    assert src.query_migrate() == {}
    harness.migrate(src, dst.incoming, caps={"events": True}, params=SLOW)
    src.cmd("migrate_cancel")  # right away: still in (or just out of) setup
    src.cmd("migrate_cancel")  # a second cancel: idempotent
    info = src.wait_migration(timeout=20)
    assert info["status"] == "cancelled", info
    statuses = cancelled_statuses(src)
    assert statuses[0] == "setup" and statuses[-2:] == ["cancelling", "cancelled"], statuses
    src.cmd("migrate_cancel")  # after the end: still a no-op
    assert src.query_migrate()["status"] == "cancelled"
    assert_destination_failed(dst)
    assert_source_unharmed(src, before)
    migrate_again(harness, src)


@pytest.mark.timeout(90)
def test_cancel_while_active(harness: ProcHarness) -> None:
    src = harness.source(append="ws=16M rate=20000")
    dst = harness.destination()
    before = src.wait_passes_increase(0)
    harness.migrate(src, dst.incoming, caps={"events": True}, params=SLOW)
    wait_until(
        lambda: src.query_migrate().get("ram", {}).get("transferred", 0) > 4 << 20,
        15,
        "4 MiB sent",
    )
    assert src.query_migrate()["status"] == "active"
    src.cmd("migrate_cancel")
    src.cmd("migrate_cancel")
    info = src.wait_migration(timeout=20)
    assert info["status"] == "cancelled", info
    assert cancelled_statuses(src) == ["setup", "active", "cancelling", "cancelled"]
    assert_destination_failed(dst)
    assert_source_unharmed(src, before)
    migrate_again(harness, src)


@pytest.mark.timeout(90)
def test_cancel_right_before_completion(harness: ProcHarness) -> None:
    """pause-before-switchover stops the guest at switch-over: cancel there restarts it."""
    src = harness.source(append="ws=16M rate=20000")
    dst = harness.destination()
    before = src.wait_passes_increase(0)
    harness.migrate(
        src,
        dst.incoming,
        caps={"events": True, "pause-before-switchover": True, "return-path": True},
    )
    src.wait_migration(timeout=30, states=frozenset({"pre-switchover"}))
    assert src.status() == "finish-migrate"  # the guest is stopped for the switch-over
    src.cmd("migrate_cancel")
    info = src.wait_migration(timeout=20)
    assert info["status"] == "cancelled", info
    assert cancelled_statuses(src) == [
        "setup", "active", "pre-switchover", "cancelling", "cancelled"
    ]  # fmt: skip
    assert_destination_failed(dst)
    assert_source_unharmed(src, before)
    migrate_again(harness, src)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_cancel_while_connecting(harness: ProcHarness, family: str) -> None:
    """A destination whose accept queue is full: connect hangs; cancel ends it at once,
    not after x-io-timeout (30 s)."""
    if family == "tcp":
        lsock = socket.socket(socket.AF_INET)
        lsock.bind(("127.0.0.1", 0))
        uri = f"tcp:127.0.0.1:{lsock.getsockname()[1]}"
        addr: object = lsock.getsockname()
    else:
        lsock = socket.socket(socket.AF_UNIX)
        addr = harness.path("full.sock")
        lsock.bind(addr)
        uri = f"unix:{addr}"
    fillers: list[socket.socket] = []
    try:
        lsock.listen(0)  # never accepted: a queue of one, filled below
        for _ in range(3):
            c = socket.socket(lsock.family)
            c.setblocking(False)
            try:
                c.connect(addr)
            except (BlockingIOError, InterruptedError):
                pass
            fillers.append(c)
        src = harness.source(append="ws=4M rate=20000")
        before = src.wait_passes_increase(0)
        src.cmd("migrate", uri=uri)
        time.sleep(0.5)
        # QEMU 10.0 shows the status alone in setup (livemig added "x-dirty-tracker": "")
        assert src.query_migrate() == {"status": "setup"}
        t0 = time.monotonic()
        src.cmd("migrate_cancel")
        assert src.wait_migration(timeout=10)["status"] == "cancelled"
        assert time.monotonic() - t0 < 2.0
        assert_source_unharmed(src, before)
    finally:
        for c in fillers:
            c.close()
        lsock.close()
