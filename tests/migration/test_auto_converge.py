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
    """QEMU 10.0's cpu_throttle_dirty_sync_timer: armed at the migration's setup (migration_thread,
    before qemu_savevm_state_setup), it syncs when dirty-sync-count did not move for a tick (5 s),
    never in the first pass."""
    conv = AutoConverge(PARAMS, start=0.0)
    assert not conv.sync_due(4.9, 5)  # before the first tick
    assert not conv.sync_due(5.0, 5)  # first tick: remembers count 5
    assert not conv.sync_due(8.0, 5)  # before the next tick
    assert conv.sync_due(10.0, 5)  # no pass ended for a tick: sync
    assert not conv.sync_due(15.0, 7)  # a pass ended after the sync it asked for
    assert not conv.sync_due(20.0, 9)  # passes ended meanwhile
    assert conv.sync_due(20.0 + DIRTY_SYNC_PERIOD, 9)
    assert conv.sync_due(20.0 + 2 * DIRTY_SYNC_PERIOD, 10)  # only its own sync since: again


def test_dirty_sync_timer_is_armed_at_setup_not_at_the_first_period() -> None:
    """Armed at the first period's end (QEMU 9.2's place) it ticked a period later than 10.0's:
    a pass stuck from 5 s on was synced at 11 s, not 10 s."""
    conv = AutoConverge(PARAMS, start=0.0)
    conv.on_sync(1 << 20, 0, now=1.0)
    assert not conv.sync_due(5.0, 3)  # 10.0's first tick, 5 s after setup
    assert conv.sync_due(10.0, 3)


def test_dirty_sync_timer_leaves_the_first_pass_alone() -> None:
    conv = AutoConverge(PARAMS, start=0.0)
    conv.on_sync(1 << 20, 0, now=1.0)
    assert not conv.sync_due(5.0, 1)
    assert not conv.sync_due(10.0, 1)


def test_a_period_ends_at_the_sync_closing_its_tenth_rate_window() -> None:
    """livemig's rate windows sit on a fixed 100 ms grid (transport/ratelimit.py), so the sync
    after the tenth window of a period comes 1 s after the period's own sync give or take the
    jitter of two syncs' lengths (1-8 ms measured). QEMU's windows start when its thread comes
    back (each >= 100 ms), so its tenth window's sync is past 1 s and ends the period; livemig's
    ended it only when the jitter fell that way, else one window (100 ms) later."""
    conv = AutoConverge(PARAMS, start=0.003)  # the setup's sync took 3 ms past its window
    window = (128 << 20) // 10  # one window's worth at max-bandwidth 128 MiB/s
    sent, raised_at = 0, None
    for k in range(1, 40):
        sent += window
        t = k * 0.1 + 0.001  # this sync took 1 ms: the tenth is 0.998 s after the start
        if conv.on_sync(sent, window // PAGE, now=t) and raised_at is None:  # all high
            raised_at = round(t, 3)
    assert raised_at == 2.001  # two periods of ten windows (2.101 when the first took eleven)
    conv = AutoConverge(PARAMS, start=0.0)  # never a window early: nine are not a period
    assert conv.on_sync(1 << 20, 1 << 20, now=0.93) == 0
    assert conv._high == 0


def test_tailslow_increment_as_qemu_rounds_it() -> None:
    """QEMU: cpu_ideal = cpu_now x threshold / dirtied truncated, increment = min(increment,
    cpu_now - cpu_ideal): rounded up, where int(cpu_now x (1 - threshold / dirtied)) rounded
    down (3 where QEMU raises by 4 below)."""
    conv = AutoConverge({**PARAMS, "cpu-throttle-tailslow": True}, start=0.0)
    sent = 0
    for k in (1, 2):
        sent += 192 << 20
        conv.on_sync(sent, (192 << 20) // PAGE, now=float(k))
    assert conv.percentage == 20
    for k in (3, 4):  # dirtied 100 MiB against a threshold of 96 MiB (50 % of 192 MiB sent)
        sent += 192 << 20
        conv.on_sync(sent, (100 << 20) // PAGE, now=float(k))
    # cpu_now 80, cpu_ideal trunc(80 x 0.96) = 76: +4
    assert conv.percentage == 24


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
