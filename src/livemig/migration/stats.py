"""Counters of one outgoing migration and the ``query-migrate`` reply built from them.

The migration thread is the only writer; readers (QMP, the progress display) take a consistent
enough snapshot without locks, as QEMU's atomics allow. Bandwidth, the switch-over threshold
and the expected downtime are recomputed once per 100 ms accounting window, as QEMU does; the
dirty-page rate over periods of at least one second, closed at a sync.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from livemig.machine.abi import PAGE_SIZE

WINDOW = 0.1


def qemu_ms_between(start: float, end: float) -> int:
    """Whole milliseconds from ``start`` to ``end`` (``time.monotonic()`` seconds) counted as
    QEMU counts its ``downtime``: each end read as a millisecond clock (``qemu_clock_get_ms``
    of CLOCK_MONOTONIC, which truncates), then subtracted. A 0.4 ms window so reads 0 or 1,
    a 1.6 ms one 1 or 2: on average the true duration, where truncating the duration itself
    (livemig before) read 0.5 ms less on average, a convention more favourable than QEMU's."""
    return math.floor(end * 1000) - math.floor(start * 1000)


@dataclass
class PassRecord:
    """One dirty-bitmap sync (a pass): what it found and how the previous pass went."""

    number: int
    at: float
    dirty_pages: int
    bytes_sent: int
    duration: float
    bandwidth: float  # bytes/s over the pass
    reason: str


@dataclass
class MigrationStats:
    """Everything ``query-migrate`` reports about the source side."""

    start: float = field(default_factory=time.monotonic)
    setup_time: float | None = None
    total_time: float | None = None
    downtime: float | None = None  # seconds, for the timeline (``set_downtime``)
    downtime_ms: int | None = None  # what query-migrate reports, counted as QEMU counts it
    downtime_breakdown: dict[str, float] = field(default_factory=dict)
    # monotonic times (CLOCK_MONOTONIC: comparable with the destination's timeline) of the
    # pre-copy switch-over: vCPUs stopped, everything sent, SHUT received
    blackout_marks: dict[str, float] = field(default_factory=dict)
    total_bytes: int = 0  # guest RAM
    transferred: int = 0
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    postcopy_bytes: int = 0
    normal_pages: int = 0
    zero_pages: int = 0  # QEMU's "duplicate": zero pages, unpopulated ones included
    # never-populated pages: counted in zero_pages (QEMU, reading every page, would send each
    # as a zero record) but not sent at all (zero on both sides)
    unpopulated_pages: int = 0
    remaining: int = 0
    dirty_sync_count: int = 0
    dirty_pages_rate: int = 0
    bandwidth: float = 0.0  # bytes/s, last window
    threshold: int = 0  # bytes
    expected_downtime_ms: int = 300
    mbps: float = 0.0
    pages_per_second: float = 0.0
    throttle: int = 0
    passes: list[PassRecord] = field(default_factory=list)
    # accounting window
    _win_start: float = field(default_factory=time.monotonic)
    _win_bytes: int = 0
    _win_queued: int = 0
    _win_pages: int = 0
    # dirty-rate period
    _rate_start: float = field(default_factory=time.monotonic)
    _rate_pages: int = 0

    def set_downtime(self, start: float, end: float) -> None:
        """The downtime ran from ``start`` to ``end`` (monotonic seconds)."""
        self.downtime = end - start
        self.downtime_ms = qemu_ms_between(start, end)

    def account(self, nbytes: int, normal: int = 0, zero: int = 0, phase: str = "precopy") -> None:
        self.transferred += nbytes
        self._win_bytes += nbytes
        self._win_pages += normal + zero
        self.normal_pages += normal
        self.zero_pages += zero
        if phase == "precopy":
            self.precopy_bytes += nbytes
        elif phase == "downtime":
            self.downtime_bytes += nbytes
        else:
            self.postcopy_bytes += nbytes

    def update_window(
        self,
        downtime_limit_ms: int,
        switchover_bw: int = 0,
        max_bandwidth: int = 0,
        queued: int = 0,
    ) -> bool:
        """Close the accounting window if 100 ms passed; returns True when it did.

        ``queued`` is what the socket still holds unsent (``Channel.unsent``): bytes written
        in the window minus the growth of that queue is what the link really carried.
        """
        now = time.monotonic()
        elapsed = now - self._win_start
        if elapsed < WINDOW:
            return False
        carried = max(0, self._win_bytes - (queued - self._win_queued))
        self._win_queued = queued
        self.bandwidth = carried / elapsed
        self.mbps = self.bandwidth * 8 / 1e6
        self.pages_per_second = self._win_pages / elapsed
        bw = switchover_bw if switchover_bw else self.bandwidth
        if max_bandwidth and not switchover_bw:
            # never believe the link is faster than the limit we are holding it to
            bw = min(bw, max_bandwidth)
        self.threshold = int(bw * downtime_limit_ms / 1000)
        if self.dirty_pages_rate and self._win_bytes > 10000 and self.bandwidth > 0:
            self.expected_downtime_ms = int(self.remaining / self.bandwidth * 1000)
        self._win_start = now
        self._win_bytes = 0
        self._win_pages = 0
        return True

    def note_sync(self, new_dirty_pages: int) -> None:
        self.dirty_sync_count += 1
        self._rate_pages += new_dirty_pages
        now = time.monotonic()
        if now - self._rate_start >= 1.0:
            self.dirty_pages_rate = int(self._rate_pages / (now - self._rate_start))
            self._rate_start = now
            self._rate_pages = 0

    def ram_info(self) -> dict[str, Any]:
        """The ``ram`` member of query-migrate, with QEMU's field names."""
        return {
            "transferred": self.transferred,
            "remaining": self.remaining,
            "total": self.total_bytes,
            "duplicate": self.zero_pages,
            "x-unpopulated": self.unpopulated_pages,
            "normal": self.normal_pages,
            "normal-bytes": self.normal_pages * PAGE_SIZE,
            "dirty-pages-rate": self.dirty_pages_rate,
            "mbps": round(self.mbps, 6),
            "dirty-sync-count": self.dirty_sync_count,
            "postcopy-requests": 0,
            "page-size": PAGE_SIZE,
            "multifd-bytes": 0,
            "pages-per-second": int(self.pages_per_second),
            "precopy-bytes": self.precopy_bytes,
            "downtime-bytes": self.downtime_bytes,
            "postcopy-bytes": self.postcopy_bytes,
            "dirty-sync-missed-zero-copy": 0,
        }

    def elapsed_ms(self) -> int:
        end = self.total_time if self.total_time is not None else time.monotonic() - self.start
        return int(end * 1000)
