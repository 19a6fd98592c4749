"""Auto-converge: throttle the guest's vCPUs while it dirties memory faster than we send it.

QEMU's rule (``mig_throttle_guest_down`` and its trigger in ``migration_trigger_throttle``): at a
dirty-bitmap sync at least one second after the previous period, if the bytes dirtied in the
period exceed ``throttle-trigger-threshold`` percent of the bytes sent in it, count a "high"
period; on the second one, reset the count and raise the throttle: ``cpu-throttle-initial``
first, then ``cpu-throttle-increment`` more each time (with ``cpu-throttle-tailslow``, less as
the remaining excess shrinks), never above ``max-cpu-throttle``.

The first period starts at the setup's sync (QEMU's ``time_last_bitmap_sync`` is set by the
first ``migration_bitmap_sync``, in ``ram_init_bitmaps``), not at the first sync of the
iteration: a pass later would delay every raise by as much. QEMU 9.2+ also syncs the dirty bitmap
every ``DIRTY_SYNC_PERIOD`` (5 s) while auto-converge is on if no pass ended meanwhile
(``cpu_throttle_dirty_sync_timer``; 10.0 arms it at the migration's setup, and it stays idle
during the first pass): with passes longer than that, the throttle would otherwise be decided on
stale periods.

A period ends at the first sync at least ``PERIOD - PERIOD_SLACK`` after the previous one (QEMU:
more than 1000 ms). The slack keeps the cadence QEMU gets: QEMU's 100 ms rate windows each start
when its migration thread comes back (``migration_update_counters``), so they drift a little
later every time and the sync after a period's tenth window is past 1000 ms. livemig's windows sit
on a fixed grid (``transport/ratelimit.py``, which keeps the link at its full rate), so that sync
comes 1 s after the period's own give or take the difference of the two syncs' lengths, a few ms:
with no slack, about half the periods took an eleventh window (periods of 1.14 s on average
against QEMU 10.0's 1.07 s in the same bench cell, ~1.3 s more to climb from 20 % to 99 %). The
slack is a quarter of a window: more than that jitter, never enough to end a period one window
early.
"""

from __future__ import annotations

import time
from typing import Any

from livemig.machine.abi import PAGE_SIZE

PERIOD = 1.0
PERIOD_SLACK = 0.025  # a quarter of the rate limiter's 100 ms window (see above)
HIGH_PERIODS_TO_THROTTLE = 2
DIRTY_SYNC_PERIOD = 5.0  # QEMU 9.2+: CPU_THROTTLE_DIRTY_SYNC_TIMESLICE_MS


class AutoConverge:
    """Decides the throttle percentage, one call per sync.

    ``start`` is the time of the setup's sync (every page dirty), where the first period begins.
    """

    def __init__(self, params: dict[str, Any], start: float | None = None) -> None:
        self.params = params
        self.percentage = 0
        self._high = 0
        self._period_start = time.monotonic() if start is None else start
        self._sent_at_start = 0
        self._dirty_pages = 0
        # the dirty sync timer's next tick: QEMU 10.0 arms it at the migration's setup
        self._timer_at = self._period_start + DIRTY_SYNC_PERIOD
        self._timer_syncs = 0  # dirty-sync-count at its previous tick

    def sync_due(self, now: float, sync_count: int) -> bool:
        """QEMU's ``cpu_throttle_dirty_sync_timer_tick``: whether the timer, if it ticked by
        ``now``, asks for a sync (no pass ended since its previous tick, and the first pass,
        which sends every page anyway, is over). Call it often; it re-arms itself."""
        if now < self._timer_at:
            return False
        due = sync_count > 1 and sync_count == self._timer_syncs
        self._timer_syncs = sync_count + (1 if due else 0)  # the sync it asks for counts
        self._timer_at = now + DIRTY_SYNC_PERIOD
        return due

    def on_sync(self, transferred: int, new_dirty_pages: int, now: float | None = None) -> int:
        """Account a sync that found ``new_dirty_pages``; returns the throttle (percent)."""
        now = time.monotonic() if now is None else now
        self._dirty_pages += new_dirty_pages
        if now - self._period_start < PERIOD - PERIOD_SLACK:
            return self.percentage
        dirtied = self._dirty_pages * PAGE_SIZE
        sent = transferred - self._sent_at_start
        self._period_start = now
        self._sent_at_start = transferred
        self._dirty_pages = 0
        threshold = sent * self.params["throttle-trigger-threshold"] // 100  # QEMU's integers
        if dirtied > threshold:
            self._high += 1
            if self._high >= HIGH_PERIODS_TO_THROTTLE:
                self._high = 0
                self._raise(dirtied, threshold)
        return self.percentage

    def _raise(self, dirtied: int, threshold: int) -> None:
        """QEMU's ``mig_throttle_guest_down``; ``dirtied`` > ``threshold`` >= 0."""
        p = self.params
        if self.percentage == 0:
            new = p["cpu-throttle-initial"]
        else:
            inc = p["cpu-throttle-increment"]
            if p["cpu-throttle-tailslow"]:
                # the share of the vCPU that would dirty just the threshold, truncated as QEMU
                # does (so the increment rounds up, and is at least 1 as dirtied > threshold)
                cpu_now = 100 - self.percentage
                cpu_ideal = int(cpu_now * (threshold / dirtied))
                inc = min(inc, cpu_now - cpu_ideal)
            new = self.percentage + inc
        self.percentage = min(new, p["max-cpu-throttle"])


class SwitchoverRefiner:
    """Whether to run one more pass although QEMU's rule already allows switch-over.

    QEMU switches over at the first sync where the remaining bytes fit in ``bandwidth x
    downtime-limit``. livemig's passes are fast, so on a fast link that threshold is large and
    the blackout then carries everything the guest dirtied during a whole pass: under the limit,
    but much longer than it needs to be. When re-sending what is left would take so little time
    that the guest dirties at most ``SHRINK`` (three quarters) of it meanwhile, one more pass
    cuts the blackout by at least a quarter. Each extra pass starts with at most a threshold's
    worth of bytes, so it lasts at most ``downtime-limit``, and the bytes left must then have
    shrunk by that much; otherwise, or after ``max_passes``, switch-over proceeds.
    ``max_passes`` 0 is QEMU's behaviour exactly.

    Why three quarters and not a half: a guest dirtying 60-70 % of the link's rate (the bench
    matrix's 200 MiB/s cells run at QEMU's measured 72-89 MiB/s against 128 MiB/s) got no extra
    pass with a half, and its blackout carried ~36 MiB where three passes leave ~12 MiB; those
    passes add at most 3 x ``downtime-limit`` to the total time, and in practice the time to
    send 2-3 x what is left (0.3-0.6 s at 128 MiB/s).
    """

    # Below this the blackout is dominated by the fixed costs (vCPU stop, device state).
    FLOOR = 1 << 20
    SHRINK = 0.75  # a pass must leave at most this share of what it started with
    DEFAULT_PASSES = 3  # x-switchover-refine's default

    def __init__(self, max_passes: int) -> None:
        self.max_passes = max_passes
        self.passes = 0
        self._last: int | None = None

    def another_pass(self, pending: int, dirty_bytes_per_s: float, bandwidth: float) -> bool:
        """Called when the rule allows switch-over with ``pending`` bytes left."""
        if self.passes >= self.max_passes or pending <= self.FLOOR or bandwidth <= 0:
            return False
        if self._last is not None and pending > self._last * self.SHRINK:
            self.max_passes = self.passes  # the last one did not pay off: stop refining
            return False
        if dirty_bytes_per_s / bandwidth > self.SHRINK:
            return False
        self._last = pending
        self.passes += 1
        return True
