"""Post-copy on the source: the switch-over, serving page requests, the background push, recovery.

Theory of operation (QEMU: ``postcopy_start``, ``ram_save_queue_pages``, ``get_queued_page``,
``postcopy_do_resume``; reference §7.2-§7.4):

* **setup**: with capability ``postcopy-ram`` the pre-copy setup also sends
  ``POSTCOPY_ADVISE(page-size summary, target page size)`` after OPEN_RETURN_PATH and PING 1.
* **switch** (``migrate-start-postcopy`` sets a flag; the migration thread acts on it at its next
  iteration): first, with the guest still running, a sync, ``POSTCOPY_RAM_DISCARD`` for the
  pages still to send and a PING whose PONG it waits for (``OutgoingMigration._drain``: the
  destination drops them and catches up outside the blackout); then the preempt channel is
  connected and the threads get their priorities; then the downtime (QEMU's window, from
  ``migration_downtime_start`` to ``migration_downtime_end``): stop the vCPUs (finish-migrate,
  STOP, ->device), last dirty sync (``final_sync``), ``POSTCOPY_RAM_DISCARD`` for every run of
  still-dirty pages not discarded yet (never-sent ones included), PING 2, then one
  ``PACKAGED`` command holding LISTEN, the FULL device sections, PING 3 and RUN, then PING 4;
  it ends once they are sent, and ->postcopy-active follows, as in QEMU 10.0. The QMP events
  raised in the window (STOP, MIGRATION device, MIGRATION_PASS) go out at its end, as QEMU's
  BQL holds them. From the moment
  the package leaves, the guest belongs to the destination: nothing here restarts it,
  whatever happens (the guest never runs on both sides).
* **post-copy phase**: the return-path thread serves REQ_PAGES(_ID) itself: with
  ``postcopy-preempt`` on the second channel, otherwise as a PART of its own on the main
  channel between two background PARTs (the requested page first, then its prefetch window);
  only when that is impossible (link down, recovering) does a request go into the queue the
  migration thread empties first. **Readahead** (``postcopy_readahead``): a request just past
  the previous one of a stream (or past its window, or past pages the guest already had)
  doubles the stream's window, 8 pages up to ``x-postcopy-readahead`` (1024); the first
  ``READAHEAD_HEAD`` pages of it go at once from the return-path thread as a PART on the
  main channel (with preempt, its first ``PREEMPT_LEAD`` pages on the preempt channel, which
  the destination installs in runs: the very next page is what a sweeping guest faults on
  at once, and on main it waited behind the background PARTs in flight), and the rest is
  queued for the push. The migration
  thread sends small PART sections: first the queued windows, not held back by
  ``max-postcopy-bandwidth`` but counted against it, then the walk in RAM order, paced by
  it. Why: a guest sweeping its memory faster than the push (1 GB/s against 256 MiB/s in
  ``bench postcopy --smp 1 --rate 1024``) caught up with the walk and then faulted on page
  after page at its front, one round trip each (~700 requests; QEMU 10.0, whose page search
  goes on after the last requested page, had 79-261); with readahead a stream faults a few
  dozen times and blocktime fell 3-5x (session 11 in benchmarks/README.md). The head goes
  from the return-path thread because that one is real-time: the migration thread, at a
  nice value, waited for a time slice on a loaded host while the guest waited for the
  pages. QEMU's way, the walk itself jumping to each request (``FOLLOW_REQUESTS``, off),
  measured worse: with 2 vCPUs sweeping their halves it drags the walk back and forth, and
  at 1 GB/s, 1 vCPU, it did not beat the window (A/B in session 11). Random faults start no
  stream and cost nothing extra. The walk steps aside between PARTs while the return-path
  thread waits for the lock. A page already sent is never sent again: the dirty bitmap is
  the single record, guarded by one lock. The push starts once the destination answers PING
  4 (its listen thread reads: until then pushed pages only queue up in front of the first
  requests), and the walk keeps at most ``PIPE_LIMIT`` bytes past the destination's last
  answer to the PINGs it sends between PARTs (QEMU's PING, answered by any destination), so
  that a page sent at a request on the main channel waits behind little. Request latency is
  mostly scheduling: the return-path thread is real-time above the migration thread, which
  stays real-time for the whole phase, and every other thread of the process is real-time
  too while it lasts (all of them take the interpreter lock the request path needs).
* **end**: no dirty page left: END (EOS only) + EOF, no vmdesc; wait for SHUT;
  ->completed, runstate ``postmigrate``.
* **recovery**: an I/O error (or ``migrate-pause``) gives ``postcopy-paused``; the pages of a
  failed send go back into the bitmap. ``migrate`` with ``resume: true`` (or, with
  ``x-postcopy-auto-recover`` > 0, a retry here) ->postcopy-recover-setup, connects a new main
  channel without header (a connect that fails: ->postcopy-paused, its error the reason, as
  QEMU 10.0), ->postcopy-recover, RECV_BITMAP for every block, dirty := not received, POSTCOPY_RESUME,
  RESUME_ACK(1) ->postcopy-active, and the push goes on.

``page_checksums`` is the order-independent RAM digest x-verify uses in post-copy: the
destination cannot hash its RAM at the end (its guest has been running), so it adds up the
checksums of the pages as they are installed and compares with the source's at switch-over.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gc
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from livemig import threads
from livemig.errors import MigrationError
from livemig.machine.runstate import RunState
from livemig.migration.postcopy_readahead import MAX_WINDOW, Readahead
from livemig.migration.priority import RT_PRIORITY, boost_process_threads, restore_threads
from livemig.migration.state import MigrationStatus
from livemig.migration.state_verify import STATE_IDSTR, state_digests, state_vmsd
from livemig.savevm import checksum as CK
from livemig.savevm.devices import GLOBALSTATE_VMSD, encode_globalstate, machine_entries
from livemig.transport import Channel, ChannelError, connect
from livemig.wire import events as E
from livemig.wire import returnpath as RP

log = logging.getLogger(__name__)

PAGE = 4096
PAGE_WORDS = PAGE // 8
MAX_DISCARD_RANGES = 12
BACKGROUND_PAGES = 32  # pages per background PART: small, so a request never waits long
READAHEAD_RANGES = 8  # readahead windows queued for the push at most (oldest dropped)
READAHEAD_HEAD = 128  # pages of a readahead window sent on the request path, behind the page
# The head's first pages go in a PART of their own: a sweeping guest faults on the very next
# page at once, and the destination installs a PART's pages as one batch (at most as many as
# one read holds, 63 traced): it waited for the whole batch (0.2 ms more, traced).
READAHEAD_LEAD = 8
PREEMPT_LEAD = 32  # with preempt, the head's first pages on the preempt channel (_send_lead)
DEFAULT_PREFETCH = 0  # pages after a requested one sent with it (see the report in bench)
# QEMU's background page search goes on after the last requested page. Measured here (1 GiB
# memstress, 2 vCPUs sweeping their halves): ~15% fewer requests but ~1.5x the blocktime, as
# the push keeps jumping between the two vCPUs' positions; so the walk stays in RAM order and
# a sequential stream gets a readahead window instead (``postcopy_readahead``).
FOLLOW_REQUESTS = False
RESUME_WAIT = 0.2  # poll period while paused
CHECKSUM_IDSTR = "x-postcopy-verify"
# Page-request latency is mostly scheduling: the threads on the request path (the destination's
# fault, preempt and listen threads, the source's return-path thread) run at this nice value
# when the process may raise its priority (root / CAP_SYS_NICE), so busy vCPUs and other
# processes do not delay them (p99 about 3x lower in ``livemig bench postcopy`` on a loaded
# host). A shorter GIL switch interval (0.1-0.5 ms) made no measurable difference.
URGENT_NICE = -10
# A thread that only ever handles a page request (the destination's fault and preempt threads,
# the source's return-path thread) sits one level above one that also moves background pages
# (the destination's listen thread, the source's migration thread in post-copy), so a fault is
# read, asked for and served at once, never behind a background PART: at the same level the
# return-path thread waited 18 ms for a CPU while those two ran (SCHED_FIFO, traced).
RT_REQUEST_PRIORITY = RT_PRIORITY + 1
REMAINING_PERIOD = 0.05  # seconds between updates of the ``remaining`` figure
RP_YIELD_WAIT = 0.01  # longest the migration thread waits for the return-path thread's send
# PING 4 follows the package: the destination answers it once the package is done (its guest
# runs) and its listen thread reads the main channel. The push waits for that PONG (see
# ``_await_listening``).
LISTENING_PING = 4
# The push keeps at most ``PIPE_LIMIT`` bytes between itself and the destination's listen
# thread, whatever the socket buffers hold: a PING after every ``PIPE_PING_EVERY`` bytes, whose
# PONG says the destination has read that far (see ``_await_pipe``). Pings of this kind carry
# ``PIPE_PING_FLAG`` in their value (the switch's are 1-4).
PIPE_LIMIT = 512 << 10
PIPE_PING_EVERY = 128 << 10
PIPE_PING_FLAG = 0x8000_0000
PIPE_SILENT = 1.0  # seconds a pipe PING may go unanswered before the limit is dropped


def boost_thread(realtime: bool = False, priority: int = RT_PRIORITY,
                 tid: int | None = None) -> bool:  # fmt: skip
    """Give the calling thread (or thread ``tid`` of this process) the urgent nice value
    (True) or leave it be (not permitted).

    With ``realtime`` (threads that only wake, serve one page request and sleep again) try
    SCHED_FIFO first: a CFS thread, even at nice -10, waits for the running vCPU's time slice
    to end (3-5 ms on 2 cores with the vCPUs flat out: the request latency's p99).
    ``priority`` is the SCHED_FIFO priority (``RT_PRIORITY`` or ``RT_REQUEST_PRIORITY``).
    """
    if tid is None:
        tid = threading.get_native_id()
    if realtime and os.environ.get("LIVEMIG_NO_RT") is None:
        try:
            os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(priority))
            return True
        except (OSError, AttributeError) as exc:
            log.debug("post-copy thread not real-time: %s", exc)
    try:
        if os.sched_getscheduler(tid) != os.SCHED_OTHER:  # real-time for a blackout until now
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, tid, URGENT_NICE)
        return True
    except OSError as exc:
        log.debug("post-copy thread priority unchanged: %s", exc)
        return False


_ZERO_PAGE = bytes(PAGE)  # a requested page equal to it goes as a ZERO record


@contextlib.contextmanager
def collector_held() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (unless it was off already).

    The switch allocates enough that a generation-0 collection fell inside its downtime in
    every run traced (0.18-0.21 ms of a 1.5-1.9 ms window, 256 MiB memstress, loaded host):
    the interpreter's housekeeping, not the switch's work, and it runs as soon as the
    collector is back on (at the next allocations past the threshold)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _yield_gil() -> None:
    """Let a thread waiting for the interpreter lock have it now (``time.sleep(0)`` gives it
    up). The push calls this between taking a PART's pages and encoding them: a return-path
    thread woken by a request got the lock only at the push's next send, up to a PART's Python
    later (requests' wait for it: median 0.13 -> 0.10 ms, p90 0.52 -> 0.43 ms, traced; p99
    with preempt 0.69-0.82 ms against 0.73-0.96 in 4 interleaved runs)."""
    time.sleep(0)


def _nbytes(bufs: list) -> int:
    """Bytes in a list of buffers as ``Channel.sendv`` takes them."""
    return sum(len(b) if isinstance(b, (bytes, bytearray)) else b.nbytes for b in bufs)


# Odd 64-bit weights per word of a page: a page's checksum is sum(word_j * K_j) * (2*index+1),
# so an all-zero page counts 0 and unpopulated pages need not be read.
_K = (np.arange(1, PAGE_WORDS + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)


def discard_ranges(bitmap: np.ndarray) -> np.ndarray:
    """The runs of pages set in ``bitmap`` as an (n, 2) array of [start, length) in bytes,
    POSTCOPY_RAM_DISCARD's ranges."""
    idx = np.flatnonzero(bitmap)
    if idx.size == 0:
        return np.empty((0, 2), dtype=np.uint64)
    cut = np.flatnonzero(np.diff(idx) != 1) + 1
    firsts = idx[np.concatenate(([0], cut))]
    ends = idx[np.concatenate((cut - 1, [idx.size - 1]))] + 1
    return np.stack((firsts, ends - firsts), axis=1).astype(np.uint64) * np.uint64(PAGE)


def discard_commands(pages: dict[str, np.ndarray]) -> list[E.PostcopyRamDiscard]:
    """POSTCOPY_RAM_DISCARD commands for the pages set in ``pages`` (RAM block -> bitmap, in
    the order given): a range per run of pages, at most ``MAX_DISCARD_RANGES`` a command.
    Also what ``livemig replay --postcopy-drain`` sends, so that a QEMU destination is shown
    the very commands this source sends (``discard_bufs`` makes the same bytes at once)."""
    out: list[E.PostcopyRamDiscard] = []
    for block, bitmap in pages.items():
        ranges = [(s, n) for s, n in discard_ranges(bitmap).tolist()]
        for i in range(0, len(ranges), MAX_DISCARD_RANGES):
            out.append(E.PostcopyRamDiscard(block, tuple(ranges[i : i + MAX_DISCARD_RANGES])))
    return out


def discard_bufs(mig: Any, pages: dict[str, np.ndarray]) -> list:
    """POSTCOPY_RAM_DISCARD commands for the pages set in ``pages`` (RAM block -> bitmap),
    with their x-checksums unit: the buffers to send."""
    enc = mig.encoder
    bufs: list = []
    unit = CK.Unit()  # x-checksums: a discard left out would leave stale pages in place
    for b in mig.ram.blocks:
        if b.idstr not in pages:
            continue
        ranges = discard_ranges(pages[b.idstr])
        if not len(ranges):
            continue
        bufs += enc.postcopy_discards(b.idstr, ranges)
        if mig.checks is not None:
            for i in range(0, len(ranges), MAX_DISCARD_RANGES):
                unit.add_device(*CK.discard_record(b.idstr, ranges[i : i + MAX_DISCARD_RANGES]))
    if mig.checks is not None and unit:
        bufs += mig._checksum(unit)
    return bufs


def page_checksums(words: np.ndarray, idx: np.ndarray) -> int:
    """Sum (mod 2**64) of the checksums of pages ``words`` (n, 512 uint64) at indices ``idx``."""
    if len(idx) == 0:
        return 0
    with np.errstate(over="ignore"):
        h = words.astype(np.uint64, copy=False) @ _K
        h *= idx.astype(np.uint64) * np.uint64(2) + np.uint64(1)
        return int(h.sum(dtype=np.uint64))


def block_checksum(block: Any, present: np.ndarray | None = None) -> int:
    """Checksum of a whole RAMBlock (only ``present`` pages read: the others are zero)."""
    words = block.array.view(np.uint64).reshape(-1, PAGE_WORDS)
    idx = np.flatnonzero(present) if present is not None else np.arange(block.npages)
    total = 0
    for i in range(0, len(idx), 4096):
        part = idx[i : i + 4096]
        total += page_checksums(words[part], part)
    return total & 0xFFFF_FFFF_FFFF_FFFF


def checksum_vmsd(blocks: list) -> Any:
    from livemig import vmstate

    return vmstate.vmsd(CHECKSUM_IDSTR, 1, [vmstate.u64(b.idstr) for b in blocks])


class PostcopySource:
    """The post-copy part of one ``OutgoingMigration`` (``mig``)."""

    def __init__(self, mig: Any) -> None:
        self.mig = mig
        self.caps = mig.config.capabilities
        self.params = mig.config.params
        self.requested = threading.Event()  # migrate-start-postcopy
        self.preempt = "postcopy-preempt" in self.caps
        self.prefetch = int(self.params.get("x-postcopy-prefetch", DEFAULT_PREFETCH))
        self.follow = FOLLOW_REQUESTS
        # Sequential request streams and the windows the push sends next (see
        # ``postcopy_readahead``): ranges [block, start, end), guarded by ``lock``.
        ra_limit = int(self.params.get("x-postcopy-readahead", MAX_WINDOW))
        self.readahead = Readahead(limit=ra_limit) if ra_limit else None
        self._ra: collections.deque[list] = collections.deque()
        self.readahead_sent = 0  # pages the push sent from readahead windows
        # ``lock`` guards the RamSaver bitmap (shared with the return-path thread); each channel
        # has its own send lock, taken *while* holding ``lock`` (never the other way round) by
        # whoever took pages from the bitmap, so nobody sees "nothing left" while pages taken
        # are still unsent. No one holds ``lock`` during a send: a background send blocked on
        # a full socket must not hold up the return-path thread serving a request on the
        # preempt channel (it did: requests waited 50-200 ms).
        self.lock = threading.Lock()
        self.main_lock = threading.Lock()  # the main channel and ``mig.encoder``
        self.preempt_lock = threading.Lock()  # the preempt channel and its encoder
        self.queue: collections.deque[tuple[str, int]] = collections.deque()
        self.preempt_channel: Channel | None = None
        self.preempt_encoder: Any = None
        self.active = False
        # Set once the switch is over (the package sent, the preempt channel up): until then a
        # broken link fails the migration instead of pausing it, so migrate-pause waits.
        self.switched = threading.Event()
        self.requests = 0  # pages asked for by the destination
        self.requested_sent = 0  # pages sent because they were asked for (prefetch included)
        self.pushed = 0  # pages sent by the background walk
        self.resume_uri: str | None = None
        self._resume = threading.Event()
        self._acked = threading.Event()
        self._bitmaps: dict[str, bytes] = {}
        self._bitmap_event = threading.Event()
        self.pause_requested = threading.Event()
        self.recoveries = 0
        self.source_checksums: dict[str, int] | None = None
        # The return-path thread serves requests itself; these let the migration thread step
        # aside between background PARTs while it waits for the lock (Lock is not fair).
        self._rp_want = 0
        self._rp_done = 0
        self._rp_served = threading.Event()
        self._rp_boosted = False
        self._listening = threading.Event()  # PONG 4: the destination reads the main channel
        # The push's pipe limit: (ping value, main-channel bytes sent up to it, when) of the
        # PINGs not answered yet, and the bytes the destination has read by the last PONG.
        self._pipe_pings: collections.deque[tuple[int, int, float]] = collections.deque()
        self._pipe_seq = 0
        self._pipe_read = 0
        self._pipe_pinged = 0  # main-channel bytes sent up to the last PING
        self._pipe_off = PIPE_LIMIT <= 0

    # -- control (QMP threads) ----------------------------------------------------------------

    def start_postcopy(self) -> None:
        self.requested.set()
        self.mig._wake.set()

    def should_switch(self) -> bool:
        return self.requested.is_set()

    def pause(self) -> None:
        """``migrate-pause``: break the link on purpose (postcopy-active only).

        The state is postcopy-active once the package is out (before, "device", as QEMU's);
        a pause asked for before the switch is over waits for it (a link broken mid-switch
        failed the migration)."""
        deadline = time.monotonic() + self.params["x-io-timeout"] / 1000
        while not self.switched.wait(0.05):
            if self.mig.state.status != MigrationStatus.POSTCOPY_ACTIVE:
                break
            if time.monotonic() > deadline:
                raise MigrationError("migrate-pause: the switch to post-copy did not finish")
        if self.mig.state.status != MigrationStatus.POSTCOPY_ACTIVE:
            raise MigrationError("migrate-pause is only possible in postcopy-active")
        self.pause_requested.set()
        self._break_link()

    def resume(self, uri: str) -> None:
        """``migrate`` with ``resume: true``: reconnect to ``uri`` (postcopy-paused only)."""
        if self.mig.state.status != MigrationStatus.POSTCOPY_PAUSED:
            raise MigrationError(
                f"Cannot resume: migration is {self.mig.state.status}, not postcopy-paused"
            )
        self.resume_uri = uri
        # QEMU 10.0 enters postcopy-recover-setup in the command itself, before connecting
        self.mig.state.move(MigrationStatus.POSTCOPY_RECOVER_SETUP)
        self._resume.set()

    def _break_link(self) -> None:
        for ch in (self.mig.channel, self.preempt_channel):
            if ch is not None:
                ch.shutdown()

    # -- setup --------------------------------------------------------------------------------

    def advise(self) -> list:
        summary = 0
        for _b in self.mig.machine.ram_blocks:
            summary |= PAGE
        return self.mig.encoder.send(E.PostcopyAdvise(summary, PAGE))

    # -- return path (return-path thread) ------------------------------------------------------

    def on_pong(self, value: int) -> None:
        """A PONG from the return-path thread."""
        if value == LISTENING_PING:
            self._listening.set()
            self.mig._wake.set()
        elif value & PIPE_PING_FLAG:
            pings = self._pipe_pings
            # PONGs come in order: an older PING not answered was lost with a recovery
            while pings and pings[0][0] != value:
                pings.popleft()
            if pings:
                self._pipe_read = pings.popleft()[1]
                self.mig._wake.set()

    def on_rp(self, msg: Any) -> None:
        if isinstance(msg, RP.ReqPages):
            self.on_page_request(msg.block, msg.start, msg.length)
        elif isinstance(msg, RP.RecvBitmapReply):
            self._bitmaps[msg.block] = msg.bitmap
            self._bitmap_event.set()
        elif isinstance(msg, RP.ResumeAck):
            if msg.value != 1:
                self.mig._rp_error = f"RESUME_ACK with value {msg.value}, expected 1"
            self._acked.set()

    @functools.cached_property
    def _blocks(self) -> dict[str, Any]:
        """The RAM blocks being sent, by idstr (the request path's lookup)."""
        return {b.idstr: b for b in self.mig.ram.blocks}

    def on_page_request(self, block: str | None, start: int, length: int) -> None:
        """REQ_PAGES(_ID) from the return-path thread (``ReturnPathDecoder.page_request`` or a
        decoded ``ReqPages``)."""
        b = self._blocks.get(block)  # type: ignore[arg-type]
        if b is None or start % PAGE or length % PAGE or start + length > b.size:
            self.mig._rp_error = (
                f"bad page request: block {block!r} start {start:#x} length {length:#x}"
            )
            self.mig._wake.set()
            return
        self.requests += length // PAGE
        if not self._rp_boosted:
            self._rp_boosted = True
            boost_thread(realtime=True, priority=RT_REQUEST_PRIORITY)
        if self.active:
            # Served here, on the return-path thread, rather than queued for the migration
            # thread: no hand-over to another thread on the request path. With preempt the page
            # goes on its own channel; otherwise as a PART of its own on the main channel
            # between two background PARTs (the lock keeps sections whole).
            preempt = self.preempt and self.preempt_channel is not None
            try:
                if (preempt and self._send_requested(self.preempt_channel, self.preempt_encoder,
                                                      b, start, length, "postcopy")) \
                        or self._serve_main(b, start, length):  # fmt: skip
                    self._note_request(b, start, length)
                    return
            except (ChannelError, OSError) as exc:
                # The page went back into the bitmap; queue it for the migration thread too,
                # which finds the link broken (or, for preempt, sends it on main).
                log.warning("%s channel: %s", "preempt" if preempt else "main", exc)
        self.queue.append((block, start))
        self.mig._wake.set()

    def _note_request(self, b: Any, start: int, length: int) -> None:
        """After a request is served: when it continues a sequential stream, send the first
        ``READAHEAD_HEAD`` pages of the stream's readahead window here as a PART on the main
        channel, and queue the rest for the push."""
        if self.readahead is None:
            return
        with self.lock:
            d = self.mig.ram.dirty[b.idstr]
            r = self.readahead.on_request(b.idstr, start // PAGE, length // PAGE,
                                          lambda a, z: not d[a:z].any())  # fmt: skip
            if r is None:
                return
            first, end = r[0], min(r[1], b.npages)
            if first >= end:
                return
            head = min(end, first + READAHEAD_HEAD)
            if head < end:
                for rng in self._ra:
                    if rng[0] == b.idstr and rng[1] <= end and head <= rng[2]:
                        rng[1], rng[2] = min(rng[1], head), max(rng[2], end)  # the same stream
                        break
                else:
                    self._ra.append([b.idstr, head, end])
                    if len(self._ra) > READAHEAD_RANGES:
                        self._ra.popleft()
                self.mig._wake.set()
        # The guest is blocked on, or about to reach, these pages: the return-path thread sends
        # them at once, where the migration thread (not real-time) could wait for a time slice.
        if head == first:
            return
        before = self.requested_sent
        if self.preempt and self.preempt_channel is not None and \
                self._send_lead(b, first, min(head, first + PREEMPT_LEAD)):  # fmt: skip
            first = min(head, first + PREEMPT_LEAD)
        if first >= head or \
                self._serve_main(b, first * PAGE, (head - first) * PAGE, lead=READAHEAD_LEAD):  # fmt: skip
            sent = self.requested_sent - before
            self.requested_sent -= sent
            self.readahead_sent += sent
            self.mig.rate.account(sent * PAGE)  # as the push's windows: the walk yields it

    def _send_lead(self, b: Any, first: int, end: int) -> bool:
        """With preempt: a readahead head's first pages ``first:end`` on the preempt channel.

        A sweeping guest faults on the very next page as soon as the requested one is in. On
        the main channel that page waited behind up to 512 KiB of background PARTs the
        destination had not installed yet, and behind this thread sending the rest of the
        head: 0.4-1.2 ms, the slowest requests of a run (traced, ``bench postcopy --smp 1
        --rate 1024``). Only the first ``PREEMPT_LEAD`` pages: the destination's preempt
        thread installs them in runs (``PostcopyIncoming.install_run``) while the guest
        follows, and a longer head there delays the next request's page behind it (the whole
        head, 128 pages: p99 above 1 ms in 2 of 8 runs, 32: in none of 8, interleaved). False when
        post-copy is not running or the channel failed: then they go on main with the rest."""

        def take() -> np.ndarray:
            d = self.mig.ram.dirty[b.idstr]
            idx = first + np.flatnonzero(d[first:end])
            d[idx] = False
            return idx

        try:
            return self._send_batch(self.preempt_channel, self.preempt_encoder, b, take,
                                    "postcopy")  # fmt: skip
        except (ChannelError, OSError) as exc:
            log.warning("preempt channel: %s", exc)
            return False

    def _take_readahead(self, n: int) -> list:
        """Up to ``n`` dirty pages from the readahead windows, oldest window first, their bits
        cleared (under ``lock``)."""
        out = []
        while n > 0 and self._ra:
            rng = self._ra[0]
            idstr, first, end = rng
            d = self.mig.ram.dirty[idstr]
            nz = np.flatnonzero(d[first:end])
            idx = nz[:n] + first
            if len(nz) > n:
                rng[1] = int(idx[-1]) + 1
            else:
                self._ra.popleft()
            if len(idx):
                d[idx] = False
                out.append(self.mig.ram.split_zero(self._blocks[idstr], idx))
                n -= len(idx)
        return out

    def _serve_main(self, b: Any, start: int, length: int, lead: int = 0) -> bool:
        """Send a requested page (and its prefetch window) as a PART on the main channel from
        the return-path thread; False when post-copy is not running (queued instead). With
        ``lead``, only the first ``lead`` pages asked for go in the first PART."""
        mig = self.mig
        self._rp_want += 1
        try:
            with self.lock:
                if not self.active:
                    return False
                idx = self._take_requested(b, start, length)
                if len(idx) == 0:
                    return True  # already sent: it is on its way
                # The asked-for pages in a PART of their own ahead of the prefetch window: the
                # destination installs (and wakes the vCPU) before it decodes the window.
                end = (start + length) // PAGE
                if lead:
                    end = min(end, start // PAGE + lead)
                parts = [p for p in (idx[idx < end], idx[idx >= end]) if len(p)]
                batches = [mig.ram.split_zero(b, p) for p in parts]
                self.main_lock.acquire()

            def build() -> tuple[list, int, int]:
                parts = [self._part([batch]) for batch in batches]
                return ([x for bufs, _, _ in parts for x in bufs], sum(p[1] for p in parts),
                        sum(p[2] for p in parts))  # fmt: skip

            n, normal, zero = self._send_holding(self.main_lock, mig.channel, build,
                                                 functools.partial(self._requeue, batches))  # fmt: skip
            self.requested_sent += len(idx)
            mig.stats.account(n, normal, zero, "postcopy")
            return True
        finally:
            self._rp_done += 1
            self._rp_served.set()

    def _yield_to_rp(self) -> None:
        """Between two PARTs: let a waiting return-path send take the lock first."""
        if self._rp_want != self._rp_done:
            self._rp_served.clear()
            if self._rp_want != self._rp_done:
                self._rp_served.wait(RP_YIELD_WAIT)

    def _take_requested(self, b: Any, start: int, length: int) -> np.ndarray:
        """Dirty pages of the request plus the prefetch window, their bits cleared."""
        d = self.mig.ram.dirty[b.idstr]
        first = start // PAGE
        last = min(b.npages, first + length // PAGE + self.prefetch)
        idx = first + np.flatnonzero(d[first:last])
        d[idx] = False
        if self.follow:
            self.mig.ram.seek(b.idstr, last)
        return idx

    def _send_requested(
        self, ch: Channel, enc: Any, b: Any, start: int, length: int, phase: str
    ) -> bool:
        """Send a requested page (and its prefetch window) on the preempt channel; False when
        post-copy is not running (the caller queues it)."""
        if length == PAGE and self.prefetch == 0 and not self.follow:
            return self._send_one(ch, enc, b, start // PAGE, phase)
        return self._send_batch(ch, enc, b, lambda: self._take_requested(b, start, length),
                                phase)  # fmt: skip

    def _send_batch(self, ch: Channel, enc: Any, b: Any, take: Callable[[], np.ndarray],
                    phase: str) -> bool:  # fmt: skip
        """Send the pages that ``take()`` (under ``lock``) clears from the bitmap as records
        on the preempt channel; False when post-copy is not running."""
        with self.lock:
            if not self.active:
                return False
            idx = take()
            if len(idx) == 0:
                return True  # already sent: it is on its way
            batch = self.mig.ram.split_zero(b, idx)
            self.preempt_lock.acquire()

        def build() -> tuple[list, int, int]:
            unit = CK.Unit() if self.mig.checks is not None else None
            out, normal, zero = self._encode(enc, [batch], unit)
            return [*out, *self._preempt_checksum(unit)], normal, zero

        n, normal, zero = self._send_holding(self.preempt_lock, ch, build,
                                             functools.partial(self._requeue, [batch]))  # fmt: skip
        self.requested_sent += len(idx)
        self.mig.stats.account(n, normal, zero, phase)
        return True

    def _send_one(self, ch: Channel, enc: Any, b: Any, i: int, phase: str) -> bool:
        """``_send_requested`` for one page and no prefetch window: plain ints and one record,
        no arrays (the request path's cost is mostly per-call overhead)."""
        with self.lock:
            if not self.active:
                return False
            d = self.mig.ram.dirty[b.idstr]
            if not d[i]:
                return True  # already sent: it is on its way
            d[i] = False
            self.preempt_lock.acquire()

        def build() -> tuple[list, int, int]:
            page = b.view[i * PAGE : (i + 1) * PAGE]
            # memcmp against a zero page: 40x cheaper than a numpy reduction set up for one
            # page (1.8 us hot, several times that on the cold caches of a request)
            if page != _ZERO_PAGE:
                out, normal, zero = enc.encode_page(b.idstr, i * PAGE, page), 1, 0
            else:
                out, normal, zero = enc.encode_zero_page(b.idstr, i * PAGE), 0, 1
            if self.mig.checks is not None:
                unit = CK.Unit()
                unit.add(b.idstr, CK.KIND_DATA if normal else CK.KIND_ZERO, np.array([i]))
                out = [*out, *self._preempt_checksum(unit)]
            return out, normal, zero

        def undo() -> None:
            d[i] = True  # back in the bitmap, as ``requeue`` does for a batch

        n, normal, zero = self._send_holding(self.preempt_lock, ch, build, undo, hold_gil=True)
        self.requested_sent += 1
        self.mig.stats.account(n, normal, zero, phase)
        return True

    def _send_holding(self, lock: threading.Lock, ch: Channel,
                      build: Callable[[], tuple[list, int, int]],
                      undo: Callable[[], None],
                      hold_gil: bool = False) -> tuple[int, int, int]:  # fmt: skip
        """Build and send the records with ``lock``, the channel's send lock that the caller
        took while holding ``self.lock``, and release it. When the send fails, ``undo()``
        (under ``self.lock``) puts the pages back into the bitmap. Returns (bytes, normal
        pages, zero pages)."""
        try:
            bufs, normal, zero = build()
            n = ch.sendv(bufs, hold_gil=hold_gil)
        except BaseException:
            lock.release()
            with self.lock:
                undo()
            raise
        lock.release()
        return n, normal, zero

    def _requeue(self, batches: list) -> None:
        for batch in batches:
            self.mig.ram.requeue(batch)

    def _part(self, batches: list) -> tuple[list, int, int]:
        """One RAM PART section on the main channel holding ``batches`` (and, with
        x-checksums, its checksum: the destination installs none of its pages before)."""
        mig = self.mig
        enc = mig.encoder
        sid = mig._ram_sid
        unit = CK.Unit() if mig.checks is not None else None
        out, normal, zero = self._encode(enc, batches, unit)
        tail = mig._checksum(unit) if unit else []
        return ([*enc.send(E.SectionPart(sid)), *out, *enc.send(E.RamEos()),
                 *enc.send(E.SectionFooter(sid)), *tail], normal, zero)  # fmt: skip

    @staticmethod
    def _encode(enc: Any, batches: list, unit: Any = None) -> tuple[list, int, int]:
        out: list = []
        normal = zero = 0
        for b in batches:
            if len(b.zero):
                out += enc.encode_zero_pages(b.idstr, b.zero.astype(np.uint64) << 12)
                zero += len(b.zero)
                if unit is not None:
                    unit.add(b.idstr, CK.KIND_ZERO, b.zero)
            if len(b.normal):
                out += enc.encode_pages(b.idstr, b.normal.astype(np.uint64) << 12, b.block.view)
                normal += len(b.normal)
                if unit is not None:
                    unit.add(b.idstr, CK.KIND_DATA, b.normal)
        return out, normal, zero

    def _preempt_checksum(self, unit: Any) -> list:
        """x-checksums on the preempt channel (raw records, no sections): after the records of
        one request, the word 0x200 then ``be32 records, be64 digest`` (livemig only)."""
        if unit is None or not unit:
            return []
        digest = self.mig.checks.close(unit)[0]
        return [CK.PREEMPT_CHECKSUM.pack(CK.PREEMPT_CHECKSUM_WORD, unit.records, digest)]

    # -- the switch (migration thread) -----------------------------------------------------------

    def run(self) -> None:
        """Switch to post-copy and run it to completion (or raise for the thread to fail)."""
        mig = self.mig
        # Before the downtime starts, as QEMU's postcopy_start establishes the preempt channel
        # and takes the BQL before ``migration_downtime_start``: none of this needs the guest
        # stopped, and inside the window it cost 0.1-0.7 ms (the preempt connection more).
        preempt_ready = self._connect_preempt(mig.config.uri) if self.preempt else None
        # Both threads that send pages get their priority before the guest can fault: the
        # return-path thread raised its own at the first request, which came at a nice value
        # while the switch was still busy (the first request took 11-19 ms, every run's p99
        # when readahead leaves 30-60 requests in all). This one is real-time for the
        # blackout and takes its own post-copy priority once the package is out.
        self._boost_rp_thread()
        mig.begin_blackout_priority()
        # The device sections' entries (how to read each state, once stopped) need nothing
        # stopped to be listed: 30 us less in the window.
        entries = machine_entries(mig.machine)
        # QMP events raised in the downtime go out at its end (QEMU's BQL holds them too)
        with collector_held(), mig.events_held():
            t_run = self._switch(entries)
        # Requests are served from here on (the first comes as soon as the guest runs), not
        # queued until the bookkeeping below is done.
        mig.rate.rate = self.rate_limit  # 0: unlimited, QEMU's default in post-copy
        self._pipe_reset()
        self.active = True
        t_stop = mig._t_stop
        mig.stats.set_downtime(t_stop, t_run)
        # the parts add up to the downtime: x-verify's adding up of RAM apart, as pre-copy's
        mig.stats.downtime_breakdown = {"postcopy-switch": t_run - t_stop - mig.verify_time}
        if mig.config.verify:
            mig.stats.downtime_breakdown["verify-hashing"] = mig.verify_time
        mig.state.move(MigrationStatus.POSTCOPY_ACTIVE)
        if preempt_ready is not None:
            preempt_ready()  # the destination accepts it at POSTCOPY_LISTEN
        with self.lock:
            mig.stats.remaining = mig.ram.pending_pages() * PAGE
        self.switched.set()
        saved = self._postcopy_priority()
        try:
            self._loop()
        finally:
            restore_threads(saved)

    def _switch(self, entries: list) -> float:
        """The downtime: stop the guest, last sync, discards, the package; returns when the
        package is sent (monotonic), the downtime's end."""
        mig = self.mig
        enc = mig.encoder
        mig.stop_guest()  # the downtime starts (mig._t_stop)
        # QEMU 10.0's postcopy_start: "device" while the switch is made, "postcopy-active"
        # once the package is out
        mig.state.move(MigrationStatus.DEVICE)
        if mig.multifd is not None:
            # Every page the channels still hold lands before the discards: one landing after
            # them filled a page the destination was told it needs, so the fresh copy sent
            # later could not be installed (EEXIST) and the guest kept the older one. Found
            # by x-checksums, whose check of that job then read the discarded page. (And the
            # channels' jobs are checked against what the tracker saw before this sync.)
            from livemig.migration import multifd

            multifd.source_flush(mig, "downtime")
        # the last sync: the guest never runs here again (a failed switch fails the migration)
        new = mig.ram.merge(mig.tracker.final_sync())
        mig._frozen = True  # x-checksums: the pages sent from here are the pages hashed
        mig.stats.note_sync(new)
        mig.emit("MIGRATION_PASS", {"pass": mig.stats.dirty_sync_count})
        # the pages still to send, but those discarded already while the guest ran (_drain)
        pre = mig.prediscarded
        bufs = discard_bufs(mig, {b.idstr: mig.ram.dirty[b.idstr] & ~pre[b.idstr] if b.idstr in pre
                                  else mig.ram.dirty[b.idstr] for b in mig.ram.blocks})  # fmt: skip
        # The discards go at once, so that the destination drops those pages while the package
        # is built; PING 2 follows them on the wire but leaves with the package, so that its
        # PONG does not wake the return-path thread (real-time, above this one) to take the
        # interpreter lock while the package is built.
        mig._send(bufs, "downtime")
        package = self._package(entries)
        # From here the destination may run the guest: this side must never restart it.
        mig._stopped_guest = False
        try:
            mig._send([*enc.send(E.Ping(2)), *enc.send(E.Packaged(package)),
                       *enc.send(E.Ping(4))], "downtime")  # fmt: skip
        except (ChannelError, OSError, MigrationError):
            # unless it said it never did: a destination that refused the pre-copy stream
            # closes the link, so the package is what fails to go; the guest was left stopped
            if not mig._cancel.is_set():
                self._refused_before_run()
            raise
        # The downtime ends with the package sent, as QEMU's (``migration_downtime_end``
        # right after ``qemu_savevm_send_packaged``): the destination has all it needs to
        # run the guest. What follows is this side's bookkeeping, which QEMU 10.0 also does
        # after (the move to postcopy-active included), and so is the record of the last
        # pass (nothing sent since changed its dirty pages).
        end = time.monotonic()
        mig._record_pass("post-copy switch: last sync with the guest stopped")
        # Post-copy pages never go by multifd: the page walk finds the zero pages again, as
        # QEMU's migration thread does after the switch (unless zero-page-detection is none).
        mig.ram.find_zero = self.params.get("zero-page-detection") != "none"
        self.rate_limit = self.params.get("max-postcopy-bandwidth", 0)
        return end

    def _postcopy_priority(self) -> list:
        """The priorities of the post-copy phase, from the migration thread once the package
        is out; what ``restore_threads`` undoes at its end.

        The return-path thread serves the requests, real-time, but it needs the interpreter
        lock: whichever thread holds it must not wait for a CPU. The migration thread, which
        holds it between its sends, stays real-time (``stop_guest`` made it so for the
        blackout); at nice -10 it was descheduled on a loaded host with the lock held and the
        request waited 4-6 ms (traced with ``perf sched``). The process's other threads (QMP,
        the stopped vCPUs) are made real-time too for the same reason: a QMP thread
        answering ``query-migrate`` kept a request waiting 1.4 ms while a kernel thread had
        its CPU. Neither spins: the migration thread waits on the socket, the rate limit and
        the destination's PONGs, the others on their sockets."""
        mig = self.mig
        if getattr(mig, "_blackout_prio", None) is None:
            # not real-time for the blackout (not permitted, or LIVEMIG_NO_RT): nice -10
            boost_thread()
        return boost_process_threads()

    def _boost_rp_thread(self) -> None:
        """The return-path thread real-time, from this thread, before requests come."""
        t = self.mig._rp_thread
        if t is not None and t.native_id is not None:
            boost_thread(realtime=True, priority=RT_REQUEST_PRIORITY, tid=t.native_id)
            self._rp_boosted = True

    def _package(self, entries: list) -> bytes:
        """LISTEN, the device sections of ``entries`` (``machine_entries``), PING 3 and RUN:
        what goes in the PACKAGED command."""
        mig = self.mig
        enc = mig.encoder
        out: list = []
        sid = 3
        if mig.config.verify:
            # Before LISTEN: the destination adds up its present pages before registering them.
            from livemig.memtrack import present_pages

            t0 = time.monotonic()
            sums = {b.idstr: block_checksum(b, present_pages(b.host_addr, b.size))
                    for b in mig.machine.ram_blocks}  # fmt: skip
            # inside the downtime, as pre-copy's hashes: query-migrate's x-verify-ms says how much
            mig.verify_time = time.monotonic() - t0
            self.source_checksums = sums
            vmsd = checksum_vmsd(mig.machine.ram_blocks)
            enc.devices[CHECKSUM_IDSTR] = vmsd
            out += enc.send(E.SectionFull(sid, CHECKSUM_IDSTR, 0, 1, sums))
            sid += 1
        out += enc.send(E.PostcopyListen())
        saved = []
        for e in entries:
            enc.devices[e.idstr] = e.vmsd
            values = e.save()
            saved.append((e, values))
            out += enc.send(E.SectionFull(sid, e.idstr, e.instance_id, e.vmsd.version_id,
                                          values))  # fmt: skip
            sid += 1
        if mig.config.verify:
            # After the device sections: the destination checks what it loaded before RUN.
            vmsd = state_vmsd(entries)
            enc.devices[STATE_IDSTR] = vmsd
            out += enc.send(E.SectionFull(sid, STATE_IDSTR, 0, 1, state_digests(saved)))
            sid += 1
        gs = encode_globalstate("running" if mig._was_running else "paused")
        enc.devices["globalstate"] = GLOBALSTATE_VMSD
        out += enc.send(E.SectionFull(sid, "globalstate", 0, GLOBALSTATE_VMSD.version_id, gs))
        if mig.checks is not None:
            out += mig._checksum(mig._device_unit)  # checked before RUN starts the guest
        out += enc.send(E.Ping(3))
        out += enc.send(E.PostcopyRun())
        return b"".join(bytes(x) for x in out)

    def _connect_preempt(self, uri: str) -> Callable[[], None]:
        """Open the preempt channel; returns what to call once the destination has been told
        to accept it (POSTCOPY_LISTEN in the package, or POSTCOPY_RESUME).

        A plain connection completes here (the kernel queues it until the destination
        accepts), so a refused one fails the switch before the package, while this side can
        still restart the guest. A TLS client also waits for the server's half of the
        handshake, which the destination does only once it has read that command: such a
        connection is made in a thread and waited for after the command is sent. Made here,
        it hung the switch-over until the handshake's time-out (QEMU connects it
        asynchronously too). Its failure then comes after the package, too late for this
        side to run the guest again; the main channel's handshake with the same credentials
        has succeeded by then, so what is left to fail is the link itself.
        """
        from livemig.transport.tls import TLSChannel
        from livemig.wire.encoder import Encoder

        timeout = self.params["x-io-timeout"] / 1000
        self.preempt_encoder = Encoder()
        if not isinstance(self.mig.channel, TLSChannel):
            self.preempt_channel = connect(uri, timeout=timeout)
            return lambda: None
        made: list[Channel] = []
        failed: list[BaseException] = []

        def run() -> None:
            try:
                made.append(connect(uri, timeout=timeout, name="postcopy preempt"))
            except BaseException as exc:
                failed.append(exc)

        t = threads.Thread(target=run, name="postcopy/preempt-connect", daemon=True)
        t.start()

        def wait() -> None:
            t.join(timeout + 1)
            if failed:
                raise failed[0]
            if not made:
                raise MigrationError(f"postcopy preempt channel: not connected within "
                                     f"{timeout:g} s")  # fmt: skip
            self.preempt_channel = made[0]

        return wait

    # -- the post-copy phase ---------------------------------------------------------------------

    def _loop(self) -> None:
        mig = self.mig
        first = True
        while True:
            try:
                if first:
                    first = False
                    self._await_listening()
                if self._push():
                    self._finish()
                    return
            except (ChannelError, OSError, MigrationError) as exc:
                if mig._cancel.is_set():
                    raise
                self._refused_before_run()
                self._paused(str(exc))
                self._recover()

    def _await_listening(self) -> None:
        """Hold the push until the destination answers PING 4, the first thing after the
        package on the main channel: until then its incoming thread is busy loading the
        package and starting the guest, and reads nothing.

        Pages pushed meanwhile only filled the socket buffers (10-14 MB on loopback), and the
        guest's first faults, answered at once by the return-path thread, then waited behind
        all of them: 14-22 ms, every run's slowest request (traced). Requests are served
        while this waits; the push's pages can only arrive after them anyway. A destination
        that never answers (none does so knowingly: QEMU answers every PING) costs
        ``x-io-timeout`` of push, never a failure."""
        mig = self.mig
        deadline = time.monotonic() + self.params.get("x-io-timeout", 30000) / 1000
        while not self._listening.is_set() and time.monotonic() < deadline:
            mig._check_cancel()
            mig._check_rp()
            if self.pause_requested.is_set():
                raise MigrationError("paused by migrate-pause")
            self._listening.wait(0.05)

    def _pushed_part(self, batches: list) -> tuple[list, int, int]:
        """``_part`` for the push (``main_lock`` held), followed by a pipe PING when
        ``PIPE_PING_EVERY`` bytes went since the last."""
        bufs, normal, zero = self._part(batches)
        if self._pipe_off:
            return bufs, normal, zero
        ch = self.mig.channel
        if ch.bytes_sent - self._pipe_pinged >= PIPE_PING_EVERY:
            self._pipe_seq = (self._pipe_seq + 1) & 0x7FFF_FFFF
            value = PIPE_PING_FLAG | self._pipe_seq
            ping = self.mig.encoder.send(E.Ping(value))
            # recorded before the send: the PONG may come back before ``sendv`` returns
            self._pipe_pinged = ch.bytes_sent + _nbytes(bufs) + _nbytes(ping)
            self._pipe_pings.append((value, self._pipe_pinged, time.monotonic()))
            bufs = [*bufs, *ping]
        return bufs, normal, zero

    def _pipe_full(self) -> bool:
        """Whether the RAM-order walk must wait: more than ``PIPE_LIMIT`` bytes of the main
        channel sent and not yet read by the destination, as far as its PONGs tell.

        A page sent on the main channel at a request (no preempt channel, or a readahead
        head) waits behind everything sent before it and not yet read: the socket buffers
        hold megabytes (autotuned on loopback) and the destination's listen thread installs
        ~1.5 ms of them a MiB, so a walk that ran ahead of it (the burst at the start of a
        rate window, or of post-copy) put 4-11 ms in front of a request (traced). Only the
        walk waits: readahead windows and queued requests are the pages the guest wants
        next. Smaller socket buffers bound the pipe too, but the kernel then opened its window
        late (a delayed ACK) and the push stalled for milliseconds now and then (more
        requests and blocktime, measured). A PING unanswered for ``PIPE_SILENT`` seconds
        turns the limit off: never a stalled push (a destination that reads on answers
        every PING, QEMU too)."""
        if self._pipe_off or not self._pipe_pings:
            return False
        if self.mig.channel.bytes_sent - self._pipe_read <= PIPE_LIMIT:
            return False
        if time.monotonic() - self._pipe_pings[0][2] > PIPE_SILENT:
            log.warning("post-copy: the destination answered no PING for %.1f s: the push "
                        "no longer waits for it", PIPE_SILENT)  # fmt: skip
            self._pipe_off = True
            return False
        return True

    def _pipe_reset(self) -> None:
        """A new main channel (the switch, a recovery): nothing in the pipe yet."""
        self._pipe_pings.clear()
        self._pipe_read = self._pipe_pinged = self.mig.channel.bytes_sent

    def _push(self) -> bool:
        """Send until nothing is dirty (True) or the link breaks (raises)."""
        mig = self.mig
        t_remaining = 0.0
        while True:
            mig._check_cancel()
            mig._check_rp()
            if self.pause_requested.is_set():
                raise MigrationError("paused by migrate-pause")
            batches = []
            walk_held = False
            with self.lock:
                while self.queue and len(batches) < 64:
                    block, start = self.queue.popleft()
                    b = self._blocks[block]
                    idx = self._take_requested(b, start, PAGE)
                    if len(idx):
                        batches.append(mig.ram.split_zero(b, idx))
                        self.requested_sent += len(idx)
                urgent = bool(batches)
                if not batches and self._ra:
                    # A stream's window goes ahead of the RAM-order walk and is not held back
                    # by max-postcopy-bandwidth (the guest is about to fault on it, as on a
                    # requested page), but counts against it: the walk yields the bytes.
                    batches = self._take_readahead(BACKGROUND_PAGES)
                    self.readahead_sent += sum(len(b.normal) + len(b.zero) for b in batches)
                if not batches and self._pipe_full():
                    walk_held = True
                elif not batches:
                    budget = mig.rate.budget_left()
                    if budget > 0:
                        batches = mig.ram.take(max(1, min(BACKGROUND_PAGES, budget // PAGE)))
                        self.pushed += sum(len(b.normal) + len(b.zero) for b in batches)
                if not batches and not walk_held and not self.queue \
                        and mig.ram.pending_pages() == 0:  # fmt: skip
                    return True
                if batches:
                    self.main_lock.acquire()
            if batches:
                _yield_gil()
                n, normal, zero = self._send_holding(
                    self.main_lock, mig.channel, functools.partial(self._pushed_part, batches),
                    functools.partial(self._requeue, batches))  # fmt: skip
                mig.stats.account(n, normal, zero, "postcopy")
                if not urgent:
                    mig.rate.account(n)
                now = time.monotonic()
                if now - t_remaining >= REMAINING_PERIOD:
                    # counting a large bitmap per PART would cost more than the PART
                    t_remaining = now
                    with self.lock:
                        mig.stats.remaining = mig.ram.pending_pages() * PAGE
            if walk_held:
                # until a PONG, a readahead window or a request (each sets ``_wake``)
                mig._wake.wait(0.05)
                mig._wake.clear()
            elif not batches:
                mig.rate.wait(mig._wake)
                mig._wake.clear()
            else:
                self._yield_to_rp()
            mig.stats.update_window(self.params["downtime-limit"])

    def _finish(self) -> None:
        mig = self.mig
        enc = mig.encoder
        sid = mig._ram_sid
        with self.lock:
            # From here the return-path thread sends nothing more (every page is out anyway).
            self.active = False
        # A send still running took its pages before ``active`` fell: wait for it (the send
        # locks), so that EOS and EOF follow every page.
        with self.preempt_lock:
            if self.preempt_channel is not None:
                self.preempt_channel.sendv(self.preempt_encoder.send(E.RamEos()))
        with self.main_lock:
            pass
        mig._send([*enc.send(E.SectionEnd(sid)), *enc.send(E.RamEos()),
                   *enc.send(E.SectionFooter(sid)), *enc.send(E.Eof())], "postcopy")  # fmt: skip
        mig._await_shut()
        s = mig.stats
        s.remaining = 0
        s.total_time = time.monotonic() - s.start
        active = s.total_time - (s.setup_time or 0)
        if active > 0:
            s.mbps = s.transferred * 8 / 1e6 / active
        if mig.config.verify:
            mig.verified = mig._rp_shut == 0
        mig.machine.set_runstate(RunState.POSTMIGRATE)
        mig.state.move(MigrationStatus.COMPLETED)

    # -- recovery ---------------------------------------------------------------------------------

    def _refused_before_run(self) -> None:
        """A livemig destination that failed before POSTCOPY_RUN says so (XError): the guest
        never ran there and every page is still here, so this side takes it back (fails and
        runs it again) instead of waiting in postcopy-paused for a recovery that cannot come."""
        mig = self.mig
        if mig._rp_thread is not None and mig._rp_shut is None:
            mig._rp_event.wait(0.5)  # the XError and SHUT may still be on their way
        if mig._rp_reason is not None and mig._rp_not_started:
            mig._stopped_guest = True
            raise MigrationError(mig._refused())

    def _paused(self, reason: str) -> None:
        mig = self.mig
        log.warning("post-copy link broken: %s", reason)
        self.active = False
        self._break_link()
        if mig._rp_thread is not None:
            mig._rp_thread.join(5)
        for ch in (mig.channel, self.preempt_channel):
            if ch is not None:
                ch.close()
        self.preempt_channel = None
        st = mig.state
        if st.status in (MigrationStatus.POSTCOPY_ACTIVE, MigrationStatus.POSTCOPY_RECOVER,
                         MigrationStatus.POSTCOPY_RECOVER_SETUP):  # fmt: skip
            st.move(MigrationStatus.POSTCOPY_PAUSED, error=reason)
        self.pause_requested.clear()

    def _recover(self) -> None:
        """Wait in postcopy-paused for a resume (or auto-retry), then do the handshake."""
        mig = self.mig
        retries = int(self.params.get("x-postcopy-auto-recover", 0))
        attempt = 0
        while True:
            mig._check_cancel()
            uri: str | None = None
            if self._resume.wait(RESUME_WAIT):
                self._resume.clear()
                uri = self.resume_uri
            elif retries and attempt < retries:
                attempt += 1
                time.sleep(min(2.0, 0.1 * 2**attempt))
                uri = mig.config.uri
                log.info("post-copy auto-recover: attempt %d of %d", attempt, retries)
            elif retries and attempt >= retries:
                raise MigrationError(
                    f"post-copy link lost and {retries} automatic recovery attempts failed"
                )
            if uri is None:
                continue
            if mig.state.status == MigrationStatus.POSTCOPY_PAUSED:  # an automatic attempt
                mig.state.move(MigrationStatus.POSTCOPY_RECOVER_SETUP)
            try:
                mig.channel = connect(uri, timeout=self.params["x-io-timeout"] / 1000)
            except ChannelError as exc:
                if mig._cancel.is_set():
                    raise
                log.warning("post-copy recovery via %s failed: %s", uri, exc)
                self._paused(str(exc))  # QEMU's words: "Failed to connect to '...': ..."
                continue
            try:
                self._handshake(uri)
                self.recoveries += 1
                return
            except (ChannelError, OSError, MigrationError) as exc:
                if mig._cancel.is_set():
                    raise
                log.warning("post-copy recovery via %s failed: %s", uri, exc)
                self._paused(f"recovery failed: {exc}")

    def _handshake(self, uri: str) -> None:
        """On the new channel (to ``uri``, where a preempt channel goes too): RECV_BITMAP for
        every block, the bitmaps back, then resume."""
        mig = self.mig
        timeout = self.params["x-io-timeout"] / 1000
        mig._rp_error = None
        mig._rp_shut = None
        mig._rp_event.clear()
        self._acked.clear()
        self._bitmaps.clear()
        self._bitmap_event.clear()
        mig._start_return_path()
        self._boost_rp_thread()  # a new thread: the old one's priority went with it
        mig.state.move(MigrationStatus.POSTCOPY_RECOVER)
        enc = mig.encoder
        enc.reset_block()
        bufs: list = []
        for b in mig.ram.blocks:
            bufs += enc.send(E.RecvBitmap(b.idstr))
        mig._send(bufs, "postcopy")
        deadline = time.monotonic() + timeout
        names = {b.idstr for b in mig.ram.blocks}
        while not names <= set(self._bitmaps):
            mig._check_cancel()
            mig._check_rp()
            if time.monotonic() > deadline:
                raise MigrationError("destination did not send its received bitmaps")
            self._bitmap_event.wait(0.05)
            self._bitmap_event.clear()
        with self.lock:
            for b in mig.ram.blocks:
                raw = np.frombuffer(self._bitmaps[b.idstr], dtype="<u8")
                bits = np.unpackbits(raw.view(np.uint8), bitorder="little")[: b.npages]
                if len(bits) < b.npages:
                    raise MigrationError(f"received bitmap of {b.idstr!r} is too short")
                mig.ram.dirty[b.idstr][:] = bits == 0
            self.queue.clear()
            self._ra.clear()
            self._pipe_reset()
            if self.readahead is not None:
                self.readahead.clear()
            mig.stats.remaining = mig.ram.pending_pages() * PAGE
        preempt_ready = self._connect_preempt(uri) if self.preempt else None
        mig._send(enc.send(E.PostcopyResume()), "postcopy")
        if preempt_ready is not None:
            preempt_ready()  # the destination accepts it at POSTCOPY_RESUME
        while not self._acked.wait(0.05):
            mig._check_cancel()
            mig._check_rp()
            if time.monotonic() > deadline:
                raise MigrationError("destination did not answer POSTCOPY_RESUME")
        mig._check_rp()
        self.active = True
        mig.state.move(MigrationStatus.POSTCOPY_ACTIVE)

    # -- reporting ------------------------------------------------------------------------------

    def query(self) -> dict[str, Any]:
        return {
            "x-postcopy": {
                "requests": self.requests,
                "requested-pages-sent": self.requested_sent,
                "pushed-pages": self.pushed,
                "readahead-pages": self.readahead_sent,
                "preempt": self.preempt,
                "prefetch": self.prefetch,
                "readahead": self.readahead.limit if self.readahead is not None else 0,
                "recoveries": self.recoveries,
                # discarded on the destination before the guest stopped (source.py, _drain)
                "prediscarded-pages": int(
                    sum(np.count_nonzero(v) for v in self.mig.prediscarded.values())
                ),
            }
        }


# -- QMP commands ------------------------------------------------------------------------------


def resume_outgoing(manager: Any, uri: str) -> None:
    """``migrate`` with ``resume: true``: only a paused post-copy can be resumed."""
    from livemig.errors import UsageError
    from livemig.transport import parse_uri

    mig = manager.outgoing
    if (mig is None or mig.postcopy is None
            or manager.source.status != MigrationStatus.POSTCOPY_PAUSED):  # fmt: skip
        raise UsageError("Cannot resume if there is no paused migration")
    parse_uri(uri)
    mig.postcopy.resume(uri)


def start_postcopy(manager: Any) -> None:
    """``migrate-start-postcopy``: switch at the next iteration."""
    from livemig.errors import UsageError

    if "postcopy-ram" not in manager.caps:
        raise UsageError("Enable postcopy with migrate_set_capability before the start of "
                         "migration")  # fmt: skip
    mig = manager.outgoing
    if mig is None or manager.source.status == MigrationStatus.NONE:
        raise UsageError("Postcopy must be started after migration has been started")
    if manager.source.status not in (MigrationStatus.SETUP, MigrationStatus.ACTIVE):
        # QEMU does not fail once the migration is past pre-copy (finished, or switching
        # over): "that would be racy with issuing this command". A client that saw "active"
        # a moment ago must not get an error because pre-copy converged meanwhile.
        return
    if mig.postcopy is None:
        # still in setup: PostcopySource appears once the channel is up; keep the request
        deadline = time.monotonic() + 5
        while mig.postcopy is None and mig.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if mig.postcopy is None:
            raise UsageError("Postcopy must be started after migration has been started")
    mig.postcopy.start_postcopy()


def migrate_pause(manager: Any) -> None:
    """``migrate-pause``: break the post-copy link on this side (postcopy-active only)."""
    from livemig.errors import UsageError

    mig, inc = manager.outgoing, manager.incoming
    if mig is not None and mig.postcopy is not None and \
            manager.source.status == MigrationStatus.POSTCOPY_ACTIVE:  # fmt: skip
        mig.postcopy.pause()
        return
    if inc is not None and inc.postcopy is not None and \
            manager.dest.status == MigrationStatus.POSTCOPY_ACTIVE:  # fmt: skip
        inc.postcopy.pause()
        return
    # QEMU's words; livemig pauses in postcopy-active only (a recovery under way is not broken
    # off: docs/qmp-conformance.md)
    raise UsageError("migrate-pause is currently only supported during postcopy-active or "
                     "postcopy-recover state")  # fmt: skip


def migrate_recover(manager: Any, uri: str) -> None:
    """``migrate-recover URI`` on the destination (postcopy-paused only)."""
    from livemig.errors import UsageError
    from livemig.transport import parse_uri

    inc = manager.incoming
    if inc is None or inc.postcopy is None or \
            manager.dest.status != MigrationStatus.POSTCOPY_PAUSED:  # fmt: skip
        raise UsageError("Migrate recover can only be run when postcopy is paused.")
    parse_uri(uri)
    inc.postcopy.recover(uri)


def register_postcopy_commands(registry: Any, manager: Any, wrap: Any) -> None:
    """Add migrate-start-postcopy, migrate-pause and migrate-recover to a QMP registry."""
    from livemig.qmp import EMPTY, Arg

    registry.add("migrate-start-postcopy", wrap(lambda: start_postcopy(manager)), returns=EMPTY)
    # QEMU lets both run out of band (exec-oob): post-copy recovery must not wait behind an
    # in-band command stuck on the very link that broke
    registry.add("migrate-pause", wrap(lambda: migrate_pause(manager)), allow_oob=True,
                 returns=EMPTY)  # fmt: skip
    registry.add("migrate-recover", wrap(lambda uri: migrate_recover(manager, uri)),
                 args={"uri": Arg(str)}, allow_oob=True, returns=EMPTY)  # fmt: skip
