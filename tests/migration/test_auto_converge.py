"""Auto-converge decides as QEMU 10.0 does (migration/ram.c, migration/cpu-throttle.c)."""

from __future__ import annotations

import time
from pathlib import Path

from livemig.guests import build_guest
from livemig.machine import Machine, RAMBlockSpec
from livemig.machine.runstate import RunState
from livemig.migration.convergence import DIRTY_SYNC_PERIOD, AutoConverge
from livemig.migration.manager import MigrationManager

PARAMS = {"throttle-trigger-threshold": 50, "cpu-throttle-initial": 20,
          "cpu-throttle-increment": 10, "cpu-throttle-tailslow": False,
          "max-cpu-throttle": 99}  # fmt: skip
PAGE = 4096


def _high_period(conv: AutoConverge, t: float, sent: int) -> int:
    """One period of 1 s in which the guest dirtied as much as was sent: "high"."""
    return conv.on_sync(sent, sent // PAGE, now=t)


def test_two_high_periods_per_raise_initial_then_increment_capped() -> None:
    conv = AutoConverge(PARAMS, start=0.0)
    seen, sent = [], 0
    for k in range(1, 24):
        sent += 128 << 20
        seen.append(_high_period(conv, float(k), sent))
    assert seen[:6] == [0, 20, 20, 30, 30, 40]
    assert max(seen) == 99 and seen.count(99) >= 2  # 90 + 10 capped at max-cpu-throttle


def test_the_first_period_starts_at_the_setup_sync() -> None:
    """QEMU's time_last_bitmap_sync is set by the setup's sync: a sync 1 s after it ends the
    first period, whenever the first pass ended."""
    conv = AutoConverge(PARAMS, start=10.0)
    conv.on_sync(64 << 20, 0, now=10.6)  # the first pass ends: still inside the period
    assert _high_period(conv, 11.0, 128 << 20) == 0  # period 1 (high) ends at 1.0 s
    assert _high_period(conv, 12.0, 256 << 20) == 20  # period 2: the first raise


def test_a_low_period_does_not_reset_the_count() -> None:
    """QEMU counts high periods without resetting on a low one (dirty_rate_high_cnt)."""
    conv = AutoConverge(PARAMS, start=0.0)
    assert _high_period(conv, 1.0, 100 << 20) == 0
    assert conv.on_sync(200 << 20, 0, now=2.0) == 0  # nothing dirtied: low
    assert _high_period(conv, 3.0, 300 << 20) == 20


def test_dirty_sync_timer_asks_for_a_sync_only_after_5_s_without_one() -> None:
    """QEMU 9.2+'s cpu_throttle_dirty_sync_timer: armed at the first period's end, it syncs when
    dirty-sync-count did not move for a tick (5 s), never in the first pass."""
    conv = AutoConverge(PARAMS, start=0.0)
    assert not conv.sync_due(100.0, 5)  # not armed before a period ended
    conv.on_sync(1 << 20, 0, now=1.0)  # armed: first tick at 6 s
    assert not conv.sync_due(5.9, 5)
    assert not conv.sync_due(6.0, 5)  # first tick: remembers count 5
    assert not conv.sync_due(8.0, 5)  # before the next tick
    assert conv.sync_due(11.0, 5)  # no pass ended for a tick: sync
    assert not conv.sync_due(16.0, 7)  # a pass ended after the sync it asked for
    assert not conv.sync_due(21.0, 9)  # passes ended meanwhile
    assert conv.sync_due(21.0 + DIRTY_SYNC_PERIOD, 9)
    assert conv.sync_due(21.0 + 2 * DIRTY_SYNC_PERIOD, 10)  # only its own sync since: again


def test_dirty_sync_timer_leaves_the_first_pass_alone() -> None:
    conv = AutoConverge(PARAMS, start=0.0)
    conv.on_sync(1 << 20, 0, now=1.0)
    assert not conv.sync_due(6.0, 1)
    assert not conv.sync_due(11.0, 1)


def test_source_starts_the_first_period_at_setup(tmp_path: Path) -> None:
    """The source makes its AutoConverge at the setup's sync, not at the first pass's end (which
    with a slow link comes much later and delayed every raise by as much)."""
    src = Machine([RAMBlockSpec("pc.ram", 16 << 20)], smp=1)
    dst = Machine([RAMBlockSpec("pc.ram", 16 << 20)], smp=1)
    try:
        src.load_guest(build_guest("memstress").data, "ws=8M rate=0")
        src.start()
        dst.set_runstate(RunState.INMIGRATE)
        sm, dm = MigrationManager(src), MigrationManager(dst)
        sm.set_capabilities([{"capability": "auto-converge", "state": True}])
        sm.set_parameters({"max-bandwidth": 1 << 20})  # the first pass takes seconds
        uri = dm.incoming_start(f"unix:{tmp_path / 'mig.sock'}")
        time.sleep(0.05)
        sm.migrate(uri)
        deadline = time.monotonic() + 10
        while sm.query_migrate().get("status") != "active" and time.monotonic() < deadline:
            time.sleep(0.01)
        out = sm.outgoing
        assert out is not None and out.stats.dirty_sync_count == 1  # still in the first pass
        conv = out._conv
        assert conv is not None
        assert conv._period_start <= out.stats.start + out.stats.setup_time
        sm.cancel_qmp()
        deadline = time.monotonic() + 10
        while sm.query_migrate().get("status") not in ("cancelled", "failed") and \
                time.monotonic() < deadline:  # fmt: skip
            time.sleep(0.02)
    finally:
        src.close()
        dst.close()
