"""The post-copy side of ``replay``: a recorded post-copy migration run again, with
replay as the source serving the destination's page requests.

A post-copy capture holds the pre-copy passes, the discards and the PACKAGED command (device
state, LISTEN, RUN), then every page the source still had to send, pushed in the background
(the capture asked for none), the END section and EOF. Once the destination has the package it
runs the guest and asks for the pages its guest faults on (REQ_PAGES on the return path). So,
as QEMU's source (``ram_save_queue_pages``, ``get_queued_page``), replay keeps the pages still
to send after the switch, the pages recorded after the package, each with its final contents;
between batches of the recorded push it sends the requested ones first, and each page goes
exactly once (a QEMU destination fails on a page placed twice: UFFDIO_COPY says EEXIST). A
request for a page already sent, or never pending, is ignored, as QEMU's source does.

Everything here is decided from the file before the first byte goes out (``PostcopyPlan``).

Two options make replay send the stream pieces livemig's own post-copy source adds
(``migration/source.py`` ``_drain``, ``migration/postcopy_source.py``), so that a destination
(QEMU's above all) can be shown them without a livemig machine:

* ``--postcopy-drain`` (livemig's ``x-postcopy-drain``): where the capture's switch begins
  (its discards, PING 2, the package), replay first discards every page the capture sends
  after the switch, with the commands livemig's source makes (``discard_commands``), sends
  PING ``X_DRAIN_PING`` and waits for its PONG; the capture's own discards then go without
  the pages already discarded (livemig discards a page once). livemig's source waits at most
  0.5 s, its guest still running; replay has no guest to keep running and waits up to its
  time-out, failing without the answer.
* ``--pipe-pings`` (``PipeLimit``): the push starts only once the destination answered the
  PING after the package (PING 4: it reads the main channel), goes in PARTs of
  ``BACKGROUND_PAGES`` pages with a PING ``PIPE_PING_FLAG | n`` after every
  ``PIPE_PING_EVERY`` bytes between two PARTs, and keeps within ``PIPE_LIMIT`` bytes of what
  the last PONG says the destination has read (off after ``PIPE_SILENT`` s without one).
  Requested pages go at once, as a PART of their own when no recorded section is open.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from livemig.errors import StreamError
from livemig.migration.postcopy_source import (
    PIPE_LIMIT,
    PIPE_PING_EVERY,
    PIPE_PING_FLAG,
    PIPE_SILENT,
)
from livemig.wire import events as E

PAGE_SHIFT = 12
SERVE_BATCH = 256  # pages of the background push between two looks at the requests
# With max-postcopy-bandwidth, a piece of the push holds at most this many seconds of it: the
# pace is kept piece by piece, and a piece of SERVE_BATCH pages (1 MiB) went unpaced, more
# than a slow push sends in a second (the running-guest replay test's whole push went in its
# first piece, before the guest could fault on any page: 0 requests, a failure under load).
PACE_SLICE = 0.02


@dataclass
class PostcopyPlan:
    """The pages a capture sends after its PACKAGED command, and where their contents are."""

    # per block: for each page, the index into ``records`` of the event holding its final
    # contents after the switch (-1: not pending after the switch)
    where: dict[str, np.ndarray] = field(default_factory=dict)
    records: list[Any] = field(default_factory=list)
    rows: dict[str, np.ndarray] = field(default_factory=dict)  # row in that event
    pages: int = 0
    switch_at: int = 0  # stream offset where the switch begins (its discards, PINGs, package)
    listening_ping: int | None = None  # the value of the PING right after the package

    @classmethod
    def from_events(cls, events: list[tuple[Any, Any, int]]) -> PostcopyPlan | None:
        """The plan of a post-copy capture's events ``(event, raw, offset)``; None when the
        capture has no PACKAGED command (a pre-copy stream). Raises ``StreamError`` saying
        why a post-copy capture cannot be replayed."""
        package = next((i for i, (ev, _r, _w) in enumerate(events)
                        if isinstance(ev, E.Packaged)), None)  # fmt: skip
        if package is None:
            return None
        at = events[package][2]
        if not any(isinstance(ev, E.OpenReturnPath) for ev, _r, _w in events[:package]):
            raise StreamError("a post-copy capture without OPEN_RETURN_PATH: the destination "
                              "could not ask for its pages", at)  # fmt: skip
        if not any(isinstance(ev, E.PostcopyAdvise) for ev, _r, _w in events[:package]):
            raise StreamError("PACKAGED without POSTCOPY_ADVISE before it", at)
        plan = cls()
        switch = package
        while switch > 0 and isinstance(events[switch - 1][0], E.PostcopyRamDiscard | E.Ping):
            switch -= 1
        plan.switch_at = events[switch][2]
        if package + 1 < len(events) and isinstance(events[package + 1][0], E.Ping):
            plan.listening_ping = events[package + 1][0].value
        sizes: dict[str, int] = {}
        for ev, _raw, _where in events:
            if isinstance(ev, E.RamSetup):
                sizes = {b.idstr: b.used_length for b in ev.blocks}
        plan.where = {b: np.full(n // 4096, -1, np.int64) for b, n in sizes.items()}
        plan.rows = {b: np.zeros(n // 4096, np.int64) for b, n in sizes.items()}
        for ev, _raw, where in events[package + 1 :]:
            if isinstance(ev, E.RamXbzrlePage | E.RamCompressedPage | E.RamMultifdFlush):
                raise StreamError(f"{type(ev).__name__} after the switch to post-copy: replay "
                                  "serves post-copy pages as normal and zero pages only", where)  # fmt: skip
            if isinstance(ev, E.Packaged):
                raise StreamError("a second PACKAGED command", where)
            if not isinstance(ev, E.RamPages | E.RamZeroPages):
                continue
            idx = (ev.offsets >> np.uint64(PAGE_SHIFT)).astype(np.int64)
            slot = len(plan.records)
            plan.records.append(ev)
            plan.where[ev.block][idx] = slot
            plan.rows[ev.block][idx] = np.arange(len(idx))
        plan.pages = sum(int(np.count_nonzero(w >= 0)) for w in plan.where.values())
        return plan


class PostcopyServer:
    """Sends the pages after the switch: requested ones first, each page once."""

    def __init__(
        self, plan: PostcopyPlan, max_bandwidth: int = 0, batch: int = SERVE_BATCH
    ) -> None:
        self.plan = plan
        self.max_bandwidth = max_bandwidth  # bytes/s of the background push; 0: unlimited
        if max_bandwidth:
            batch = min(batch, max(1, int(max_bandwidth * PACE_SLICE) >> PAGE_SHIFT))
        self.batch = batch  # pages of the push between two looks at the requests
        self.requests: queue.Queue[tuple[str, int, int]] = queue.Queue()
        self._arrived = threading.Event()
        self._start = time.monotonic()
        self._pushed = 0  # bytes of the background push so far
        self.sent = {b: np.zeros(len(w), bool) for b, w in plan.where.items()}
        self.requested = 0  # requests received
        self.served = 0  # pages sent because the destination asked for them
        self.stale = 0  # requests for pages already sent or never pending
        self._slot = {id(ev): i for i, ev in enumerate(plan.records)}

    def request(self, block: str, start: int, length: int) -> None:
        """From the return-path thread: a REQ_PAGES of the destination."""
        self.requests.put((block, start, length))
        self._arrived.set()

    def pace(self, nbytes: int) -> bool:
        """After ``nbytes`` of the background push: wait while it is ahead of
        ``max_bandwidth`` (QEMU's max-postcopy-bandwidth), but no longer than until a request
        arrives. True when requests wait to be served."""
        self._pushed += nbytes
        if self.max_bandwidth:
            due = self._start + self._pushed / self.max_bandwidth
            while (left := due - time.monotonic()) > 0:
                if self._arrived.wait(left):
                    break
        return not self.requests.empty()

    def serve(self) -> list[E.Event]:
        """The requested pages not sent yet, as page events (and marks them sent)."""
        out: list[E.Event] = []
        self._arrived.clear()
        while True:
            try:
                block, start, length = self.requests.get_nowait()
            except queue.Empty:
                return out
            self.requested += 1
            where = self.plan.where.get(block)
            if where is None:
                raise StreamError(f"the destination asked for pages of unknown RAM block "
                                  f"{block!r}")  # fmt: skip
            first = start >> PAGE_SHIFT
            end = min(len(where), -(-(start + max(length, 1)) // 4096))
            idx = np.arange(first, end)
            idx = idx[(where[idx] >= 0) & ~self.sent[block][idx]]
            if not len(idx):
                self.stale += 1
                continue
            out += self._events(block, idx)
            self.served += len(idx)

    def push(self, ev: E.RamPages | E.RamZeroPages, urgent: Any) -> Iterator[E.Event]:
        """A recorded event of the background push, without the pages already sent (or sent
        again later in the capture: a page goes once, with its final contents), in pieces of
        ``batch`` pages; before each, the requested pages are handed to
        ``urgent(events)``. A generator: a page is marked sent only when its piece is due."""
        slot = self._slot[id(ev)]
        n = self.batch
        for at in range(0, len(ev), n):
            urgent(self.serve())
            offsets = ev.offsets[at : at + n]
            idx = (offsets >> np.uint64(PAGE_SHIFT)).astype(np.int64)
            keep = ~self.sent[ev.block][idx] & (self.plan.where[ev.block][idx] == slot)
            if not keep.any():
                continue
            self.sent[ev.block][idx[keep]] = True
            if isinstance(ev, E.RamPages):
                yield E.RamPages(ev.block, offsets[keep], ev.data[at : at + n][keep])
            else:
                yield E.RamZeroPages(ev.block, offsets[keep], ev.fill)

    def _events(self, block: str, idx: np.ndarray) -> list[E.Event]:
        self.sent[block][idx] = True
        out: list[E.Event] = []
        slots = self.plan.where[block][idx]
        rows = self.plan.rows[block][idx]
        for slot in np.unique(slots):
            mine = slots == slot
            rec = self.plan.records[int(slot)]
            offsets = idx[mine].astype(np.uint64) << np.uint64(PAGE_SHIFT)
            if isinstance(rec, E.RamPages):
                out.append(E.RamPages(block, offsets, rec.data[rows[mine]]))
            else:
                out.append(E.RamZeroPages(block, offsets, rec.fill))
        return out

    def unsent(self) -> int:
        return sum(int(np.count_nonzero((w >= 0) & ~s))
                   for w, s in zip(self.plan.where.values(), self.sent.values(), strict=True))  # fmt: skip


class PipeLimit:
    """``--pipe-pings``: how far the push may run ahead of the destination's reading, as
    livemig's post-copy source keeps it (``PostcopySource._pushed_part``, ``_pipe_full``, same
    constants): a PING ``PIPE_PING_FLAG | n`` once ``PIPE_PING_EVERY`` bytes went since the
    last, and no piece of the push while more than ``PIPE_LIMIT`` bytes were sent beyond what
    the last PONG vouches for; a PING unanswered for ``PIPE_SILENT`` s turns the limit off.
    ``on_pong`` comes from the return-path thread, the rest from the sending one."""

    def __init__(self, sent: int, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._pings: collections.deque[tuple[int, int, float]] = collections.deque()
        self._seq = 0
        self.read = sent  # main-channel bytes the destination has read, by its last PONG
        self.pinged = sent  # main-channel bytes sent up to the last PING
        self.off = False
        self.pings = 0  # PINGs sent
        self.answered = 0  # of those, answered
        self.holds = 0  # times the push waited for a PONG
        self.most_ahead = 0  # the most bytes sent beyond ``read`` when a piece went

    def ping(self, sent: int, size: int) -> int | None:
        """After a piece that leaves ``sent`` bytes on the main channel: the value of the
        PING of ``size`` bytes to send behind it, if one is due (recorded now: its PONG may
        come before the send returns)."""
        if self.off or sent - self.pinged < PIPE_PING_EVERY:
            return None
        with self._lock:
            self._seq = (self._seq + 1) & 0x7FFF_FFFF
            value = PIPE_PING_FLAG | self._seq
            self.pinged = sent + size
            self._pings.append((value, self.pinged, self._clock()))
            self.pings += 1
        return value

    def on_pong(self, value: int) -> bool:
        """A PONG; True when it answers one of these PINGs."""
        if not value & PIPE_PING_FLAG:
            return False
        with self._lock:
            while self._pings and self._pings[0][0] != value:
                self._pings.popleft()  # PONGs come in order: one skipped was lost
            if not self._pings:
                return False
            self.read = self._pings.popleft()[1]
            self.answered += 1
            return True

    def full(self, sent: int) -> bool:
        """Whether the next piece of the push must wait (``sent``: bytes sent so far)."""
        with self._lock:
            if self.off or not self._pings or sent - self.read <= PIPE_LIMIT:
                return False
            if self._clock() - self._pings[0][2] > PIPE_SILENT:
                self.off = True  # never a stalled push
                return False
            return True

    def going(self, sent: int) -> None:
        """A piece of the push goes now."""
        self.most_ahead = max(self.most_ahead, sent - self.read)


class Pongs:
    """The destination's PONGs, in the order they came (from the return-path thread)."""

    def __init__(self) -> None:
        self.values: list[int] = []
        self._cv = threading.Condition()

    def add(self, value: int) -> None:
        with self._cv:
            self.values.append(value)
            self._cv.notify_all()

    def wait(self, value: int, since: int, timeout: float, idle: Any = None) -> bool:
        """Wait until a PONG ``value`` came after the first ``since`` ones, at most
        ``timeout`` s; ``idle()`` is called every millisecond meanwhile (requests to
        serve)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while value not in self.values[since:]:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.001 if idle else left))
                if idle is not None:
                    self._cv.release()
                    try:
                        idle()
                    finally:
                        self._cv.acquire()
            return True

    def __len__(self) -> int:
        return len(self.values)
