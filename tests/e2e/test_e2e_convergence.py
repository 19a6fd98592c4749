"""A migration that cannot converge under its limits keeps going, as QEMU's does, until it is
cancelled; with ``auto-converge`` the vCPU throttle rises until it completes."""

from __future__ import annotations

import time

import pytest

from livemig.testing.procs import ProcHarness, wait_until

from .test_e2e_cancel import assert_destination_failed, assert_source_unharmed

# 16 MiB working set rewritten at 20000 pages/s, 32 MiB/s link, 100 ms allowed downtime: every
# pass finds ~4096 pages dirty (16 MiB) where 3.2 MiB could go during the downtime.
LIMITS = {"max-bandwidth": 32 << 20, "downtime-limit": 100}
GUEST = "ws=16M rate=20000"


@pytest.mark.timeout(90)
def test_no_convergence_until_cancelled(harness: ProcHarness) -> None:
    src = harness.source(append=GUEST)
    dst = harness.destination()
    before = src.wait_passes_increase(0)
    harness.migrate(src, dst.incoming, caps={"events": True}, params=LIMITS)
    wait_until(
        lambda: src.query_migrate().get("ram", {}).get("dirty-sync-count", 0) >= 3,
        20,
        "3 dirty syncs",
    )
    first = src.query_migrate()
    time.sleep(1.5)
    later = src.query_migrate()
    assert later["status"] == "active", later
    assert "expected-downtime" in later
    assert later["ram"]["dirty-sync-count"] > first["ram"]["dirty-sync-count"]
    assert later["ram"]["transferred"] > first["ram"]["transferred"]
    assert later["ram"]["dirty-pages-rate"] > 0
    assert "cpu-throttle-percentage" not in later  # no auto-converge: no throttle
    assert src.status() == "running"
    src.cmd("migrate_cancel")
    assert src.wait_migration(timeout=20)["status"] == "cancelled"
    assert_destination_failed(dst)
    assert_source_unharmed(src, before)


@pytest.mark.timeout(90)
def test_auto_converge_completes(harness: ProcHarness) -> None:
    src = harness.source(append=GUEST)
    dst = harness.destination()
    src.wait_passes_increase(0)
    params = {**LIMITS, "cpu-throttle-initial": 80, "cpu-throttle-increment": 19}
    harness.migrate(src, dst.incoming, caps={"auto-converge": True, "events": True}, params=params)
    throttles: set[int] = set()

    def finished() -> bool:
        q = src.query_migrate()
        if "cpu-throttle-percentage" in q:
            throttles.add(q["cpu-throttle-percentage"])
        return q["status"] in ("completed", "failed", "cancelled")

    wait_until(finished, 60, "the auto-converged migration to end", interval=0.1)
    info = src.query_migrate()
    assert info["status"] == "completed", info
    assert throttles and max(throttles) >= 80, throttles
    assert src.status() == "postmigrate"
    dst.wait_status("running")
    report = dst.guest_check()
    assert report["ok"], report["problems"]
    # the destination's vCPUs are not throttled: the guest goes at full speed
    later = dst.wait_passes_increase(report["total-passes"], timeout=10)
    assert later["ok"], later["problems"]
