"""Run states across a migration, as QEMU 7.2 handles them.

A guest stopped before or during the migration arrives stopped (the source's global state
says ``paused``) and runs after ``cont``; ``pause-before-switchover`` waits in
``pre-switchover`` until ``migrate-continue``; a destination with another vCPU count refuses
the stream and the source keeps its guest.
"""

from __future__ import annotations

import pytest

from livemig.qmp.client import QMPClientError
from livemig.testing.procs import ProcHarness, wait_until

from .test_e2e_cancel import assert_source_unharmed


@pytest.mark.timeout(60)
def test_stopped_guest_arrives_stopped(harness: ProcHarness) -> None:
    src = harness.source(append="ws=8M rate=20000")
    dst = harness.destination()
    src.wait_passes_increase(0)
    src.cmd("stop")
    at_stop = src.guest_check()
    harness.migrate(src, dst.incoming, caps={"return-path": True, "x-verify": True})
    assert src.wait_migration()["status"] == "completed"
    assert src.status() == "postmigrate"
    assert dst.wait_migration(timeout=10)["status"] == "completed"
    assert dst.wait_status("paused") == "paused"
    report = dst.guest_check()
    assert report["ok"], report["problems"]
    assert report["passes"] == at_stop["passes"]  # nothing ran in between
    dst.cmd("cont")
    dst.wait_passes_increase(report["total-passes"])


@pytest.mark.timeout(60)
def test_stop_during_migration(harness: ProcHarness) -> None:
    """``stop`` while active: the migration goes on and the guest arrives paused."""
    src = harness.source(append="ws=16M rate=20000")
    dst = harness.destination()
    src.wait_passes_increase(0)
    harness.migrate(src, dst.incoming, params={"max-bandwidth": 8 << 20})
    wait_until(lambda: src.query_migrate().get("status") == "active", 10, "active")
    src.cmd("stop")
    at_stop = src.guest_check()
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    assert src.wait_migration()["status"] == "completed"
    assert dst.wait_status("paused") == "paused"
    report = dst.guest_check()
    assert report["ok"], report["problems"]
    assert report["passes"] == at_stop["passes"]


@pytest.mark.timeout(60)
def test_pause_before_switchover_and_continue(harness: ProcHarness) -> None:
    src = harness.source(append="ws=8M rate=20000")
    dst = harness.destination()
    src.wait_passes_increase(0)
    harness.migrate(src, dst.incoming, caps={"pause-before-switchover": True, "events": True})
    src.wait_migration(states=frozenset({"pre-switchover"}))
    # the wrong state is refused with QEMU's message
    with pytest.raises(QMPClientError, match="Migration not in expected state: pre-switchover"):
        src.cmd("migrate-continue", state="active")
    assert src.status() == "finish-migrate"
    src.cmd("migrate-continue", state="pre-switchover")
    assert src.wait_migration()["status"] == "completed"
    statuses = [d["status"] for _, d in src.event_names("MIGRATION")]
    assert statuses == ["setup", "active", "pre-switchover", "device", "completed"]
    dst.wait_status("running")
    assert dst.guest_check()["ok"]


@pytest.mark.timeout(60)
def test_destination_with_other_vcpu_count_refuses(harness: ProcHarness) -> None:
    src = harness.source(append="ws=8M rate=20000")
    dst = harness.destination(smp=1)
    before = src.wait_passes_increase(0)
    harness.migrate(src, dst.incoming, caps={"return-path": True})
    info = src.wait_migration()
    assert info["status"] == "failed", info
    assert dst.wait_exit(timeout=20) == 1
    assert "the source has 2 vCPUs, this machine 1" in dst.log()
    assert "destination refused: machine mismatch" in info["error-desc"], info
    assert_source_unharmed(src, before)
