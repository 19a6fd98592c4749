"""Post-copy on the destination: userfaultfd, the fault thread, page placement, recovery.

Theory of operation (QEMU: ``postcopy_ram_incoming_setup``, ``postcopy_ram_fault_thread``,
``postcopy_place_page``, ``loadvm_postcopy_handle_*``; reference §7.2-§7.4):

* ``ADVISE`` checks page sizes and that the kernel offers missing-mode userfaultfd on shmem
  (guest RAM is a shared mapping of a memfd). ``POSTCOPY_RAM_DISCARD`` ranges are marked
  *needed* (those pages, and only those, must come from the source) and dropped so that the
  guest faults on them. The discard is inside the blackout and was most of it with a dirtying
  guest, so where the kernel offers minor faults on shmem (``x-postcopy-minor-faults``, on by
  default) it is ``MADV_DONTNEED``, which on shmem only unmaps the pages and keeps them in the
  page cache (2.3 against 7.4 ms per 64 MiB here); the next access is then a MINOR fault.
  Otherwise (an older kernel, RAM without a memfd, the parameter off) it is ``MADV_REMOVE``,
  which frees them, and the next access a MISSING fault. Either way the system calls are made
  by a thread of their own while this one goes on with the package, and RUN waits for them
  (``migration/postcopy_discard.py``). A livemig source sends most discards before it stops
  its guest, then a PING (``X_DRAIN_PING``) answered once they are dropped (``drained``), so
  that they are not in the blackout (``OutgoingMigration._drain``).
* The ``PACKAGED`` stream is parsed here: ``LISTEN`` registers every RAMBlock in MISSING mode
  (and MINOR mode after a ``MADV_DONTNEED`` discard: a page never populated here still takes a
  MISSING fault) and starts the fault thread (->postcopy-active), the FULL sections load the
  vCPUs and
  devices, ``PING 3`` is answered, ``RUN`` starts the guest. From then on the incoming thread is
  QEMU's "listen thread": it reads the main channel and places pages.
* Fault thread: a fault on a needed page becomes REQ_PAGES(_ID) on the return path (once per
  page; all the faults of one read in one write); a fault on a page that is not needed is a page the destination already knows to be
  zero (received as a zero record, or never sent because never populated) and is resolved on
  the spot with UFFDIO_ZEROPAGE (a MINOR fault on such a page, one the kernel unmapped, with
  UFFDIO_CONTINUE: its bytes in the page cache are right). Per-vCPU blocked time is measured from the fault to the page's
  installation (``UFFD_FEATURE_THREAD_ID`` names the thread).
* Placement: page bytes are copied into a contiguous staging buffer and installed with
  UFFDIO_COPY, one ioctl per run of consecutive pages (ZERO records: UFFDIO_ZEROPAGE). With
  minor faults the page is still in the page cache (UFFDIO_COPY would find it there), so its
  bytes are written into the cache with ``pwrite`` on the block's memfd, which does not map it,
  and UFFDIO_CONTINUE maps the run and wakes its waiters (MISSING ones too). Nothing is ever
  received straight into guest memory. The preempt thread installs the first page of each
  read on its own (``install_one``: a vCPU waits for it) and consecutive pages after it (a
  readahead head's lead, a prefetch window) in runs of ``RUN_PAGES`` (``install_run``).
* The GIL rule (see ``livemig.memtrack.uffd``): a Python thread that faults on registered memory
  holds the GIL and deadlocks the fault thread. So no Python code here reads or writes guest
  RAM while it is registered, except pages known present; hashing and checks happen only after
  the end, once every range is unregistered. vCPUs fault inside ``emu_start`` without the GIL.
* Time-outs: the main channel may be quiet for long in a healthy post-copy (a small
  ``max-postcopy-bandwidth``, a guest that does not fault, requests answered on the preempt
  channel), so ``x-io-timeout`` there only counts while the guest waits for a page: the link
  is declared lost (->postcopy-paused) when a request has gone unanswered, and nothing at all
  came from the source, for ``x-io-timeout``. Errors and EOF pause at once.
* End: ``EOF`` with no page still needed -> unregister, ->completed, SHUT(0). A link error in
  postcopy-active -> postcopy-paused: faults are recorded, not sent; ``migrate-recover URI`` (or
  the original listener, with ``x-postcopy-auto-recover``) accepts a new headerless main
  channel, answers RECV_BITMAP with "not needed" bits, and on POSTCOPY_RESUME goes back to
  postcopy-active, sends RESUME_ACK(1) and re-sends the outstanding requests.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
from typing import Any

import numpy as np

from livemig import held, threads
from livemig.errors import MigrationError, StreamError
from livemig.machine.runstate import RunState
from livemig.memtrack import uffd as U
from livemig.memtrack._sys import MADV_DONTNEED, MADV_REMOVE, buffer_address, madvise
from livemig.migration.postcopy_discard import Discarder
from livemig.migration.postcopy_source import (
    CHECKSUM_IDSTR,
    PAGE,
    PAGE_WORDS,
    RT_REQUEST_PRIORITY,
    block_checksum,
    boost_thread,
    checksum_vmsd,
    page_checksums,
)
from livemig.migration.priority import blackout_priority, boost_process_threads, restore_threads
from livemig.migration.state import MigrationStatus
from livemig.migration.state_verify import STATE_IDSTR, state_vmsd
from livemig.savevm import checksum as CK
from livemig.savevm.devices import decode_globalstate, descriptions
from livemig.savevm.ram import page_runs
from livemig.transport import Channel, ChannelError, ChannelTimeout, Listener
from livemig.wire import events as E
from livemig.wire import returnpath as RP
from livemig.wire.decoder import Decoder

log = logging.getLogger(__name__)

RECV_CHUNK = 1 << 20
STAGING_PAGES = 1024
RUN_PAGES = 16  # consecutive preempt-channel pages installed at once (install_run)
UFFD_FEATURES = U.UFFD_FEATURE_MISSING_SHMEM | U.UFFD_FEATURE_THREAD_ID
_BE64 = struct.Struct(">Q")


def dispatch(inc: Any, ev: Any, dec: Decoder) -> bool:
    """The hook in ``IncomingMigration._handle``: True when the event was post-copy's."""
    pc: PostcopyIncoming | None = getattr(inc, "postcopy", None)
    if pc is None:
        if not isinstance(ev, E.PostcopyAdvise):
            return False
        pc = inc.postcopy = PostcopyIncoming(inc)
    return pc.handle(ev, dec)


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p90/p99/max of latencies in seconds, reported in microseconds."""
    if not samples:
        return {"count": 0}
    a = np.asarray(samples) * 1e6
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"count": len(a), "p50-us": round(float(p50), 1), "p90-us": round(float(p90), 1),
            "p99-us": round(float(p99), 1), "max-us": round(float(a.max()), 1)}  # fmt: skip


class PreemptParser:
    """Raw page records of the preempt channel (§7.4): no sections, EOS at the end."""

    def __init__(self, checked: bool = False) -> None:
        self._buf = bytearray()  # the start of a record cut at the end of the last read
        self.last_block: str | None = None
        self.eos = False
        # x-checksums: a 0x200 word then be32 records, be64 digest close a request's records,
        # yielded as (None, records, digest)
        self.checked = checked

    def feed(self, data: bytes | memoryview) -> list[tuple[str, int, bytes | memoryview | None]]:
        """(block, offset, page or None for a zero page) of each complete record.

        A read normally holds whole records: then the pages are views into ``data``, valid
        until the caller reuses that buffer (the preempt thread installs them first), not
        copies (two copies of every requested page before, on the request path). Only a record
        cut by the end of a read is buffered, and the pages parsed out of that buffer are
        copied."""
        joined = bool(self._buf)
        if joined:
            self._buf += data
            buf: bytearray | memoryview = self._buf
        else:
            buf = memoryview(data)
        out: list[tuple[str, int, bytes | memoryview | None]] = []
        p = 0
        while not self.eos and len(buf) - p >= 8:
            word = _BE64.unpack_from(buf, p)[0]
            flags = word & 0xFFF
            offset = word & ~0xFFF
            if flags == 0x10:
                self.eos = True
                p += 8
                break
            if self.checked and word == CK.PREEMPT_CHECKSUM_WORD:
                if len(buf) - p < CK.PREEMPT_CHECKSUM.size:
                    break
                _w, records, digest = CK.PREEMPT_CHECKSUM.unpack_from(buf, p)
                out.append((None, records, digest))  # type: ignore[arg-type]
                p += CK.PREEMPT_CHECKSUM.size
                continue
            kind = flags & ~0x20
            at = p + 8
            if flags & 0x20:
                if self.last_block is None:
                    raise StreamError("preempt channel: CONTINUE before any block was named")
                block = self.last_block
            else:
                if len(buf) <= at:
                    break
                n = buf[at]
                if len(buf) < at + 1 + n:
                    break
                block = bytes(buf[at + 1 : at + 1 + n]).decode()
                at += 1 + n
            if kind == 0x08:
                if len(buf) < at + PAGE:
                    break
                page = buf[at : at + PAGE]
                out.append((block, offset, bytes(page) if joined else page))
                at += PAGE
            elif kind == 0x02:
                if len(buf) < at + 1:
                    break
                out.append((block, offset, None))
                at += 1
            else:
                raise StreamError(f"preempt channel: unexpected record flags 0x{flags:x}")
            self.last_block = block
            p = at
        if joined:
            del self._buf[:p]
        else:
            self._buf += buf[p:]
        return out


class PostcopyIncoming:
    """The post-copy part of one ``IncomingMigration`` (``inc``)."""

    def __init__(self, inc: Any) -> None:
        self.inc = inc
        self.machine = inc.machine
        self.blocks = {b.idstr: b for b in inc.machine.ram_blocks}
        self.need = {n: np.zeros(b.npages, dtype=bool) for n, b in self.blocks.items()}
        self.requested = {n: np.zeros(b.npages, dtype=bool) for n, b in self.blocks.items()}
        caps = getattr(inc, "capabilities", frozenset())
        self.preempt = "postcopy-preempt" in caps
        self.blocktime_on = "postcopy-blocktime" in caps
        self.auto_recover = int(inc.params.get("x-postcopy-auto-recover", 0))
        self.lock = threading.Lock()
        self.uffd: U.Userfaultfd | None = None
        self._ranges: list[tuple[int, int, str]] = []
        self._local = threading.local()  # a staging buffer per installing thread
        self._inflight = {n: np.zeros(b.npages, dtype=bool) for n, b in self.blocks.items()}
        self._one = bytearray(PAGE)  # install_one's staging page (under ``lock``)
        self._one_addr = buffer_address(memoryview(self._one))
        self._run_buf = bytearray(RUN_PAGES * PAGE)  # install_run's, preempt thread only
        self._run_addr = buffer_address(memoryview(self._run_buf))
        self._stop = threading.Event()
        self._fault_thread: threading.Thread | None = None
        self._preempt_thread: threading.Thread | None = None
        self._preempt_ch: Channel | None = None
        self._preempt_eos = threading.Event()
        self.listening = False
        self.finished = False
        self.linked = False  # the return path can carry requests
        self._recover_uri: str | None = None
        self._recover_listener: Listener | None = None
        self._recover_event = threading.Event()
        self._pause_event = threading.Event()
        # statistics
        self.faults = 0
        self.zero_faults = 0
        self.requests = 0
        self.pages_placed = 0
        self._req_time: dict[tuple[str, int], float] = {}
        self.latencies: list[float] = []
        self._waiting: dict[tuple[str, int], list[tuple[int, float]]] = {}
        self._blocked: dict[int, float] = {}  # tid -> fault time
        self._vcpu_block = {v.thread_id: 0.0 for v in self.machine.vcpus}
        self._all_since: float | None = None
        self.blocktime = 0.0
        self.checksums: dict[str, int] = {}
        self.source_checksums: dict[str, int] | None = None
        self.verified: bool | None = None
        self.t_run: float | None = None
        self._last_rx = time.monotonic()  # last byte from the source on any channel
        self._crash: str | None = None  # a helper thread's internal error: the migration fails
        self._held: list[Any] = []  # x-checksums: pages of a PART waiting for its checksum
        self._corrupt: str | None = None  # a checksum failed on the preempt channel
        self._preempt_lost: str | None = None  # the preempt channel broke (a link failure)
        self._fatal: str | None = None  # unchecked garbage on the preempt channel
        self._must_check = False
        self._switch_started = False
        self.minor, self.discard_why = self._discard_mode()
        self._zeros: np.ndarray | None = None  # zero pages to pwrite (minor faults)
        self._discarder = Discarder(MADV_DONTNEED if self.minor else MADV_REMOVE)

    # -- events of the main stream -------------------------------------------------------------

    def handle(self, ev: Any, dec: Decoder) -> bool:
        if isinstance(ev, E.PostcopyAdvise):
            self._advise(ev, dec)
        elif isinstance(ev, E.PostcopyRamDiscard):
            self._switching()
            self._discard(ev, dec)
        elif isinstance(ev, E.Packaged):
            self._switching()
            self._package(ev, dec)
            self._listen_loop(dec)
        else:
            return False
        return True

    def _switching(self) -> None:
        """The switch has begun (the source's guest is stopped): this thread, which carries it
        to RUN and then becomes the listen thread, is real-time from here (migration/priority.py);
        the listen loop then sets the priority it keeps."""
        if not self._switch_started:
            self._switch_started = True
            blackout_priority()

    def drained(self) -> None:
        """The source's drain PING (``X_DRAIN_PING``), sent after discards made while its guest
        still runs: answered once they are dropped, so that only the pages dirtied since are
        left for the blackout (``migration/source.py``, ``_drain``)."""
        self._discarder.flush(self.inc.timeout)

    def _advise(self, ev: E.PostcopyAdvise, dec: Decoder) -> None:
        caps = getattr(self.inc, "capabilities", frozenset())
        if "postcopy-ram" not in caps:
            raise StreamError("POSTCOPY_ADVISE but capability postcopy-ram is off on the "
                              "destination (enable it before the migration starts)",
                              dec.offset)  # fmt: skip
        if ev.page_size_summary not in (None, PAGE) or ev.target_page_size not in (None, PAGE):
            raise StreamError(f"POSTCOPY_ADVISE page sizes {ev.page_size_summary:#x}/"
                              f"{ev.target_page_size:#x}, this host uses {PAGE:#x}",
                              dec.offset)  # fmt: skip
        missing = UFFD_FEATURES & ~U.supported_features()
        if missing:
            raise StreamError(f"post-copy needs userfaultfd features 0x{missing:x} this kernel "
                              "lacks", dec.offset)  # fmt: skip
        # This thread installs post-copy's background pages later: its staging buffer is
        # faulted in now rather than by the first PART after the switch, which the guest's
        # first requests then waited behind (0.3-0.5 ms traced).
        self._staging().fill(0)

    def _discard_mode(self) -> tuple[bool, str]:
        """Minor faults (True) or MADV_REMOVE, and why not minor faults."""
        if not self.inc.params.get("x-postcopy-minor-faults", True):
            return False, "x-postcopy-minor-faults is off"
        if not U.supported_features() & U.UFFD_FEATURE_MINOR_SHMEM:
            why = "this kernel lacks userfaultfd minor faults on shmem (UFFD_FEATURE_MINOR_SHMEM)"
        elif any(b.fd is None for b in self.blocks.values()):
            why = "guest RAM is not a memfd (memfd_create was refused)"
        else:
            return True, ""
        log.info("post-copy discards with MADV_REMOVE: %s", why)
        return False, why

    def _discard(self, ev: E.PostcopyRamDiscard, dec: Decoder) -> None:
        b = self.blocks.get(ev.block)
        if b is None:
            raise StreamError(f"discard for unknown RAM block {ev.block!r}", dec.offset)
        loader = self.inc.loader
        for start, length in ev.ranges:
            if start % PAGE or length % PAGE or start + length > b.size:
                raise StreamError(f"discard range {start:#x}+{length:#x} of {ev.block!r} is "
                                  "not page aligned or outside the block", dec.offset)  # fmt: skip
        for start, length in ev.ranges:
            # needed now (the fault thread goes by it), dropped by the discard thread before
            # RUN, while this one goes on with the package (migration/postcopy_discard.py)
            sl = slice(start // PAGE, (start + length) // PAGE)
            self.need[ev.block][sl] = True
            loader.received[ev.block][sl] = False
            loader.touched[ev.block][sl] = False
            self._discarder.add(b.host_addr + start, length)

    def _package(self, ev: E.Packaged, outer: Decoder) -> None:
        inc = self.inc
        devices = {**descriptions(inc.entries), CK.IDSTR: CK.vmsd(), CHECKSUM_IDSTR: checksum_vmsd(
            list(self.blocks.values())), STATE_IDSTR: state_vmsd(inc.entries)}  # fmt: skip
        dec = Decoder(with_header=False, devices=devices, block_sizes=inc.loader.block_sizes())
        dec.receive_data(bytes(ev.data))
        dec.receive_data(b"")
        runstate = "running"
        checks = inc.checks if inc.checked else None
        vmsds = devices
        for pev in iter(dec.next_event, E.NEED_DATA):
            if checks is not None and isinstance(pev, E.SectionFull):
                if pev.idstr == CK.IDSTR:
                    st = pev.state
                    checks.verify(st["records"], st["digest"], st["excluded"], outer.offset,
                                  " (the post-copy package's device state)")  # fmt: skip
                    continue
                checks.unit.add_device(pev.idstr, pev.instance_id, pev.version_id,
                                       vmsds[pev.idstr].encode(pev.state))  # fmt: skip
            if isinstance(pev, E.PostcopyListen):
                if checks is not None:
                    checks.check_nothing_pending(outer.offset, "before the switch to post-copy")
                self._listen()
            elif isinstance(pev, E.SectionFull):
                if pev.idstr == "globalstate":
                    runstate = decode_globalstate(pev.state)
                elif pev.idstr == CHECKSUM_IDSTR:
                    self.source_checksums = {k: int(v) for k, v in pev.state.items()}
                elif pev.idstr == STATE_IDSTR:
                    inc.source_state = dict(pev.state)
                else:
                    entry = inc._by_key.get((pev.idstr, pev.instance_id))
                    if entry is None:
                        raise StreamError(f"section {pev.idstr!r} instance {pev.instance_id} "
                                          "has no device here", dec.offset)  # fmt: skip
                    try:
                        entry.load(pev.state)
                    except (KeyError, ValueError, TypeError) as exc:
                        raise StreamError(f"section {pev.idstr!r}: state does not load: "
                                          f"{exc}") from exc  # fmt: skip
            elif isinstance(pev, E.Ping):
                self._pong(pev.value)
            elif isinstance(pev, E.PostcopyRun):
                if not self.listening:
                    raise StreamError("POSTCOPY_RUN before POSTCOPY_LISTEN", outer.offset)
                if checks is not None:
                    checks.require_checked(outer.offset, "when POSTCOPY_RUN would start the guest")
                inc.check_state()  # x-verify: registers and devices as sent, before they run
                self._run(runstate)
                return
            else:
                raise StreamError(f"{type(pev).__name__} inside the post-copy package",
                                  outer.offset)  # fmt: skip
        raise StreamError("post-copy package without POSTCOPY_RUN", outer.offset)

    def _listen(self) -> None:
        inc = self.inc
        if self.source_checksums is not None:
            # x-verify: pages present now are final (not needed); add them up before
            # registering, while reading them cannot fault.
            from livemig.memtrack import present_pages

            for n, b in self.blocks.items():
                present = present_pages(b.host_addr, b.size) & ~self.need[n]
                self.checksums[n] = block_checksum(b, present)
        features, mode = UFFD_FEATURES, U.UFFDIO_REGISTER_MODE_MISSING
        if self.minor:
            features |= U.UFFD_FEATURE_MINOR_SHMEM
            mode |= U.UFFDIO_REGISTER_MODE_MINOR
        self.uffd = U.Userfaultfd(features)
        for n, b in self.blocks.items():
            self.uffd.register(b.host_addr, b.size, mode)
            self._ranges.append((b.host_addr, b.host_addr + b.size, n))
        self.listening = True
        self.linked = True
        if self.preempt:
            self._accept_preempt(inc.listener)
        self._fault_thread = threads.Thread(target=self._fault_loop, name="mig/dst/fault",
                                            daemon=True)  # fmt: skip
        self._fault_thread.start()
        inc.state.move(MigrationStatus.POSTCOPY_ACTIVE)

    def _run(self, runstate: str) -> None:
        m = self.machine
        self._discarder.wait(self.inc.timeout)
        m.invalidate_translations()
        self.inc.guest_started = True  # from here the source must never run its copy again
        self.t_run = time.monotonic()
        self.inc.timeline["postcopy-run"] = self.t_run
        if runstate == "running" and self.inc._autostart():
            m.set_runstate(RunState.RUNNING)
        else:
            m.set_runstate(RunState.PAUSED)
        self._vcpu_block = {v.thread_id: 0.0 for v in m.vcpus}

    # -- the fault thread ------------------------------------------------------------------------

    def _locate(self, addr: int) -> tuple[str, int] | None:
        for start, end, name in self._ranges:
            if start <= addr < end:
                return name, (addr - start) // PAGE
        return None

    def _fault_loop(self) -> None:
        uffd = self.uffd
        assert uffd is not None
        boost_thread(realtime=True, priority=RT_REQUEST_PRIORITY)
        try:
            while not self._stop.is_set():
                if not uffd.wait(0.1):
                    continue
                # Every fault read at once becomes one return-path write.
                reqs = [r for ev in uffd.read_events(hold_gil=True) if ev.is_pagefault
                        for r in (self._on_fault(ev.address, ev.ptid, ev.is_minor),)
                        if r is not None]  # fmt: skip
                if reqs:
                    self._request_many(reqs)
        except (U.UffdError, ChannelError, OSError) as exc:
            if not self._stop.is_set():
                log.error("post-copy fault thread stopped: %s", exc)
        except BaseException as exc:
            if not self._stop.is_set():
                self._crashed("fault thread", exc)

    def _on_fault(self, addr: int, tid: int, minor: bool = False) -> tuple[str, int] | None:
        """Resolve a fault on a page known locally; the page to request otherwise (or None).
        ``minor``: the page is in the page cache, only unmapped."""
        where = self._locate(addr)
        if where is None:
            return None
        name, idx = where
        b = self.blocks[name]
        now = time.monotonic()
        with self.lock:
            self.faults += 1
            if not self.need[name][idx]:
                if self._inflight[name][idx]:
                    return None  # being copied right now: UFFDIO_COPY wakes the vCPU
                assert self.uffd is not None
                if minor:
                    # final bytes the kernel unmapped (reclaim): map them again
                    self.uffd.continue_(b.host_addr + idx * PAGE, PAGE, exist_ok=True)
                    return None
                # Known locally: a zero page (received as such, or never populated anywhere).
                self.uffd.zeropage(b.host_addr + idx * PAGE, PAGE, exist_ok=True)
                self.zero_faults += 1
                return None
            self._block(tid, now, (name, idx))
            if not self.requested[name][idx]:
                self.requested[name][idx] = True
                self._req_time[(name, idx)] = now
                self.requests += 1
                if self.linked:
                    return name, idx
        return None

    def _pong(self, value: int) -> None:
        # In post-copy a broken return path is not fatal: the listen loop notices the broken
        # channel and pauses; the PONG is simply lost.
        try:
            self.inc._send_rp(RP.Pong(value))
        except ChannelError as exc:
            log.info("PONG %d not sent: %s", value, exc)

    def _request(self, name: str, idx: int) -> None:
        self._request_many([(name, idx)])

    def _request_many(self, pages: list[tuple[str, int]]) -> None:
        inc = self.inc
        try:
            with inc._rp_lock:
                ch = inc.channel
                if ch is None:
                    raise ChannelError("no main channel")
                enc = inc._rp_encoder
                ch.sendv([enc.page_request(n, i * PAGE, PAGE) for n, i in pages], hold_gil=True)
        except ChannelError as exc:
            # The listen thread sees the broken link too and pauses; the requests are re-sent
            # after recovery.
            log.info("page requests not sent (link down): %s", exc)

    def _block(self, tid: int, now: float, page: tuple[str, int]) -> None:
        if tid in self._blocked:
            return
        self._blocked[tid] = now
        self._waiting.setdefault(page, []).append((tid, now))
        if len(self._blocked) >= len(self._vcpu_block) and self._all_since is None:
            self._all_since = now

    def _unblock(self, page: tuple[str, int], now: float) -> None:
        waiters = self._waiting.pop(page, None)
        if not waiters:
            return
        if self._all_since is not None:
            self.blocktime += now - self._all_since
            self._all_since = None
        for tid, t in waiters:
            self._blocked.pop(tid, None)
            if tid in self._vcpu_block:
                self._vcpu_block[tid] += now - t

    # -- placement (listen thread, preempt thread) ----------------------------------------------

    def install(self, name: str, idx: np.ndarray, data: np.ndarray | None) -> int:
        """Install pages ``idx`` of ``name`` (``data`` (n, 4096) or None for zero pages) that
        are still needed; returns how many were."""
        b = self.blocks[name]
        uffd = self._listening_uffd()
        # The pages are taken under the lock (no longer needed, in flight) and copied outside
        # it: a batch of background pages took the lock for up to a millisecond, and the fault
        # and preempt threads waited behind it on every request.
        with self.lock:
            need = self.need[name]
            mask = need[idx]
            if not mask.any():
                return 0
            idx = idx[mask]
            if data is not None:
                data = data[mask]
            need[idx] = False
            inflight = self._inflight[name]
            inflight[idx] = True
        checksum = 0
        try:
            for s in range(0, len(idx), STAGING_PAGES):
                part = idx[s : s + STAGING_PAGES]
                if self.minor:
                    rows = None if data is None else np.ascontiguousarray(data[s : s + len(part)])
                    if rows is not None and self.source_checksums is not None:
                        checksum += page_checksums(rows.view(np.uint64).reshape(-1, PAGE_WORDS),
                                                   part)  # fmt: skip
                    self._fill(b, part, rows)
                elif data is None:
                    for first, count in page_runs(part):
                        uffd.zeropage(b.host_addr + first * PAGE, count * PAGE, exist_ok=True)
                else:
                    staging = self._staging()
                    base = buffer_address(memoryview(staging))
                    stage = staging[: len(part)]
                    stage[:] = data[s : s + STAGING_PAGES]
                    if self.source_checksums is not None:
                        checksum += page_checksums(stage.view(np.uint64).reshape(-1, PAGE_WORDS),
                                                   part)  # fmt: skip
                    pos = 0
                    for first, count in page_runs(part):
                        self._copy(b.host_addr + first * PAGE, base + pos * PAGE, count)
                        pos += count
        finally:
            with self.lock:
                inflight[idx] = False
        with self.lock:
            if checksum:
                self.checksums[name] = (self.checksums.get(name, 0) + checksum) & ((1 << 64) - 1)
            self.inc.loader.received[name][idx] = True
            self.pages_placed += len(idx)
            now = time.monotonic()
            req = self.requested[name]
            for i in idx[req[idx]].tolist():
                self._answered(name, i, now)
        return len(idx)

    def _answered(self, name: str, i: int, now: float) -> None:
        """A requested page is in (under ``lock``): its latency, and its waiters unblocked."""
        self.requested[name][i] = False
        t = self._req_time.pop((name, i), None)
        if t is not None:
            self.latencies.append(now - t)
        self._unblock((name, i), now)

    def _listening_uffd(self) -> U.Userfaultfd:
        if self.uffd is None:
            raise MigrationError("post-copy page before POSTCOPY_LISTEN")
        return self.uffd

    def _staging(self) -> np.ndarray:
        stage = getattr(self._local, "staging", None)
        if stage is None:
            stage = self._local.staging = np.zeros((STAGING_PAGES, PAGE), dtype=np.uint8)
        return stage

    def install_one(self, name: str, i: int, page: bytes | memoryview | None) -> None:
        """``install`` for one page (the preempt channel's requested pages): plain ints, no
        array work. Half of a request's round trip was the ~100 us that ``install`` spends on
        numpy calls sized for a batch."""
        b = self.blocks[name]
        uffd = self._listening_uffd()
        checksum = 0
        if self.source_checksums is not None and page is not None:
            # x-verify: one page's checksum, not ``install``'s batch path (~100 us a page)
            checksum = page_checksums(np.frombuffer(page, np.uint64).reshape(1, PAGE_WORDS),
                                      np.array([i], dtype=np.int64))  # fmt: skip
        with self.lock:
            need = self.need[name]
            if not need[i]:
                return
            if self.minor:
                if page is not None:
                    self._one[:] = page
                self._fill_one(b, i, page is None)
            elif page is None:
                uffd.zeropage(b.host_addr + i * PAGE, PAGE, exist_ok=True)
            else:
                self._one[:] = page
                self._copy(b.host_addr + i * PAGE, self._one_addr, 1, hold_gil=True)
            if checksum:
                self.checksums[name] = (self.checksums.get(name, 0) + checksum) & ((1 << 64) - 1)
            need[i] = False
            self.inc.loader.received[name][i] = True
            self.pages_placed += 1
            if self.requested[name][i]:
                self._answered(name, i, time.monotonic())

    def install_run(self, name: str, first: int, pages: list) -> None:
        """``install_one`` for consecutive pages ``first``... of ``name`` (at most
        ``RUN_PAGES``, none zero): copied into one staging run, then one ``pwrite`` and
        UFFDIO_CONTINUE (minor faults) or one UFFDIO_COPY per stretch still needed. Only the
        preempt thread calls it, so the staging run is filled before ``lock`` is taken; the
        install is under it, as ``install_one``'s: a few tens of microseconds."""
        b = self.blocks[name]
        self._listening_uffd()
        run = self._run_buf
        for k, page in enumerate(pages):
            run[k * PAGE : (k + 1) * PAGE] = page
        count = len(pages)
        with self.lock:
            need = self.need[name]
            todo = [first + k for k in range(count) if need[first + k]]
            if not todo:
                return
            k = 0
            while k < len(todo):  # stretches of pages still needed
                e = k + 1
                while e < len(todo) and todo[e] == todo[e - 1] + 1:
                    e += 1
                start, cnt = todo[k], e - k
                src = self._run_addr + (start - first) * PAGE
                if self.minor:
                    done = 0
                    while done < cnt * PAGE:
                        done += held.pwrite(b.fd, src + done, cnt * PAGE - done,
                                            start * PAGE + done)  # fmt: skip
                    self._continue(b.host_addr + start * PAGE, cnt, hold_gil=True)
                else:
                    self._copy(b.host_addr + start * PAGE, src, cnt, hold_gil=True)
                k = e
            if self.source_checksums is not None:
                words = np.frombuffer(run, np.uint64, count * PAGE_WORDS).reshape(count, -1)
                idx = np.asarray(todo, dtype=np.int64)
                checksum = page_checksums(words[idx - first], idx)
                self.checksums[name] = (self.checksums.get(name, 0) + checksum) & ((1 << 64) - 1)
            need[todo] = False
            self.inc.loader.received[name][todo] = True
            self.pages_placed += len(todo)
            req = self.requested[name]
            now = time.monotonic()
            for i in todo:
                if req[i]:
                    self._answered(name, i, now)

    def _copy(self, dst: int, src: int, count: int, hold_gil: bool = False) -> None:
        assert self.uffd is not None
        done = self.uffd.copy(dst, src, count * PAGE, exist_ok=True, hold_gil=hold_gil)
        if done < count * PAGE:
            # EEXIST in the middle of a run: page by page for the rest (a page cannot be
            # there already unless installed as zero by a racing fault, which is a bug).
            for k in range(done // PAGE, count):
                try:
                    self.uffd.copy(dst + k * PAGE, src + k * PAGE, PAGE)
                except U.UffdError as exc:
                    if exc.errno != errno.EEXIST:
                        raise
                    log.error("page at 0x%x was already present", dst + k * PAGE)

    def _zero_pages(self) -> np.ndarray:
        if self._zeros is None:  # untouched: the kernel copies from its zero page
            self._zeros = np.zeros((STAGING_PAGES, PAGE), dtype=np.uint8)
        return self._zeros

    def _fill(self, b: Any, idx: np.ndarray, rows: np.ndarray | None) -> None:
        """Minor faults: write pages ``idx`` of ``b`` (``rows``, or zeros) into the page cache
        through the memfd, then map each run and wake its waiters."""
        assert self.uffd is not None
        pos = 0
        for first, count in page_runs(idx):
            src = self._zero_pages()[:count] if rows is None else rows[pos : pos + count]
            view, off = memoryview(src).cast("B"), first * PAGE
            while view:
                n = os.pwrite(b.fd, view, off)
                view, off = view[n:], off + n
            self._continue(b.host_addr + first * PAGE, count)
            pos += count

    def _fill_one(self, b: Any, i: int, zero: bool) -> None:
        """``_fill`` of one page from ``self._one`` (or a zero page), on the request path: the
        system calls keep the GIL (``livemig/held.py``). Under ``lock``."""
        addr = buffer_address(memoryview(self._zero_pages()[0])) if zero else self._one_addr
        done = 0
        while done < PAGE:
            done += held.pwrite(b.fd, addr + done, PAGE - done, i * PAGE + done)
        self._continue(b.host_addr + i * PAGE, 1, hold_gil=True)

    def _continue(self, addr: int, count: int, hold_gil: bool = False) -> None:
        assert self.uffd is not None
        done = self.uffd.continue_(addr, count * PAGE, exist_ok=True, hold_gil=hold_gil)
        if done < count * PAGE:
            # mapped already: only a racing zero fault could have, which would be a bug
            log.error("page at 0x%x was already mapped", addr + done)
            rest = count * PAGE - done - PAGE
            if rest > 0:
                self._continue(addr + done + PAGE, rest // PAGE, hold_gil)

    def _drop_needed(self) -> None:
        """The migration failed with pages still needed: with minor faults their stale bytes
        are still in the page cache; free them, so that they read as zero once the
        userfaultfd is closed, as after a MADV_REMOVE discard."""
        for n, need in self.need.items():
            b = self.blocks[n]
            for first, count in page_runs(np.flatnonzero(need)):
                madvise(b.host_addr + first * PAGE, count * PAGE, MADV_REMOVE)

    def _on_pages(self, ev: Any) -> None:
        name = ev.block
        idx = (ev.offsets >> np.uint64(12)).astype(np.int64)
        if isinstance(ev, E.RamPages):
            self.install(name, idx, ev.data)
        elif ev.fill == 0:
            self.install(name, idx, None)
        else:
            data = np.full((len(idx), PAGE), ev.fill, dtype=np.uint8)
            self.install(name, idx, data)

    # -- the listen loop (incoming thread) ------------------------------------------------------

    def _listen_loop(self, dec: Decoder) -> None:
        inc = self.inc
        ch = inc.channel
        # Without preempt the requested pages come this way, behind background PARTs: at a
        # nice value this thread waited for a vCPU's time slice now and then (p99 3-4 ms in
        # ``bench postcopy``, 2 busy vCPUs on 2 cores); real-time, below the fault thread, p99
        # went to 1.0-1.3 ms in loaded rounds (2-4 ms in some quiet ones, p50 ~50 us more:
        # benchmarks/README.md). With preempt too: a livemig source's readahead windows come
        # this way, the pages a sweeping guest is blocked on next (blocktime 17/48/55/27 ms
        # against 40/60/110/62 at a nice value, interleaved, session 11). The source's rate
        # limit and the guest's own faults bound what it takes from the vCPUs (and the
        # kernel's RT throttling leaves them 5% of a core whatever comes).
        boost_thread(realtime=True)
        # The fault and preempt threads need the interpreter lock too: no other thread may
        # hold it while waiting for a CPU (``boost_process_threads``), but the vCPUs, which
        # mostly run without it, stay normal threads.
        saved = boost_process_threads(frozenset(v.thread_id for v in self.machine.vcpus
                                                if v.thread_id is not None))  # fmt: skip
        try:
            self._listen_pump(ch, dec)
        finally:
            restore_threads(saved)

    def _listen_pump(self, ch: Channel, dec: Decoder) -> None:
        inc = self.inc
        while True:
            try:
                self._pump(ch, dec)
                self._complete()
                return
            except (ChannelError, OSError, StreamError) as exc:
                if inc._cancel.is_set():
                    raise
                if self._crash is not None:
                    raise MigrationError(self._crash) from None
                if self._fatal is not None:
                    raise MigrationError(self._fatal) from None
                if isinstance(exc, StreamError) and not isinstance(exc, CK.ChecksumError) \
                        and not inc.checked:  # fmt: skip
                    # unchecked bytes that do not parse: what came before them may be damaged
                    # too and may be in the guest already; no recovery can vouch for it
                    raise
                reason = str(exc) or type(exc).__name__
                if isinstance(exc, CK.ChecksumError) or self._corrupt is not None:
                    # a page damaged on the way never reaches the guest: like a broken link,
                    # the source sends it again after a recovery (its bitmap says so)
                    reason = f"a checksum failed, the link is dropped: {self._corrupt or reason}"
                    self._paused(reason)
                elif isinstance(exc, StreamError):
                    # Damaged bytes that do not even parse (a zeroed record header, say). The
                    # stream is checksummed: every page and device state that reached the
                    # guest was checked, the damaged unit's pages were held and are dropped,
                    # so this is a broken link like any other and a recovery re-sends what is
                    # missing. Failing instead lost the guest (the source no longer runs it).
                    self._paused(f"the stream is damaged, the link is dropped: {reason}")
                elif self._preempt_lost is not None:
                    self._paused(f"source connection lost: {self._preempt_lost}")
                else:
                    self._paused(f"source connection lost: {reason}")
                self._corrupt = self._preempt_lost = None
                ch, dec = self._wait_recovery(dec)

    def _pump(self, ch: Channel, dec: Decoder) -> None:
        buf = bytearray(RECV_CHUNK)
        view = memoryview(buf)
        while True:
            for ev in iter(dec.next_event, E.NEED_DATA):
                if self._event(ev, dec):
                    return
            if self._pause_event.is_set():
                self._pause_event.clear()
                raise ChannelError("paused by migrate-pause")
            try:
                n = ch.recv_into(view)
            except ChannelTimeout:
                stall = self._stalled(ch.timeout)
                if stall is not None:
                    raise ChannelError(stall) from None
                continue
            if n == 0:
                raise ChannelError("the source closed the main channel before the end")
            self._last_rx = time.monotonic()
            dec.receive_data(view[:n])

    def _stalled(self, timeout: float | None) -> str | None:
        """After ``x-io-timeout`` without a byte on the main channel: is the link really gone?

        A quiet main channel is normal in post-copy (a small ``max-postcopy-bandwidth``, or a
        guest that does not fault): QEMU's listen thread reads with no time-out at all. The
        link counts as failed only when the guest waits for a page and the source has shown no
        sign of life (no byte on either channel) for ``x-io-timeout`` since that request.
        """
        if timeout is None:
            return None
        with self.lock:
            if not self._req_time:
                return None
            oldest = min(self._req_time.values())
            waiting = len(self._req_time)
        quiet = time.monotonic() - max(oldest, self._last_rx)
        if quiet < timeout:
            return None
        return (f"{waiting} requested pages unanswered and nothing received for {quiet:.1f} s "
                f"(x-io-timeout {timeout:g} s)")  # fmt: skip

    def _event(self, ev: Any, dec: Decoder) -> bool:
        """Handle one main-channel event in post-copy; True at EOF."""
        if self.inc.checked and self._checked_event(ev, dec):
            return False
        if isinstance(ev, (E.RamPages, E.RamZeroPages)):
            self._on_pages(ev)
        elif isinstance(ev, E.Ping):
            self._pong(ev.value)
        elif isinstance(ev, E.RecvBitmap):
            self._send_bitmap(ev.block, dec)
        elif isinstance(ev, E.PostcopyResume):
            self._resumed()
        elif isinstance(ev, E.Eof):
            return True
        elif isinstance(ev, (E.SectionPart, E.SectionEnd, E.SectionFooter, E.RamEos)):
            pass
        else:
            raise StreamError(f"{type(ev).__name__} is not expected in post-copy", dec.offset)
        return False

    def _checked_event(self, ev: Any, dec: Decoder) -> bool:
        """x-checksums in post-copy: a PART's pages are held until its checksum says they are
        right, then installed (a wrong page must never reach the running guest). True when the
        event was taken here."""
        checks = self.inc.checks
        if self._must_check and not (isinstance(ev, E.SectionFull) and ev.idstr == CK.IDSTR):
            raise CK.ChecksumError(f"the RAM section before this point ({checks.unit.span()}) "
                                   "is not followed by its checksum", dec.offset)  # fmt: skip
        self._must_check = False
        if isinstance(ev, (E.RamPages, E.RamZeroPages)):
            data = ev.data if isinstance(ev, E.RamPages) else None
            kind = CK.KIND_DATA if data is not None else (CK.KIND_FILL if ev.fill else
                                                           CK.KIND_ZERO)  # fmt: skip
            checks.unit.add(ev.block, kind, ev.offsets >> np.uint64(12), data)
            self._held.append(ev)
            return True
        if isinstance(ev, E.SectionFooter) and self._held:
            self._must_check = True
        elif isinstance(ev, E.SectionFull) and ev.idstr == CK.IDSTR:
            st = ev.state
            checks.verify(st["records"], st["digest"], st["excluded"], dec.offset)
            held, self._held = self._held, []
            for pev in held:
                self._on_pages(pev)
            return True
        elif isinstance(ev, E.Eof):
            checks.require_checked(dec.offset, "at the end of the stream")
        return False

    def _complete(self) -> None:
        inc = self.inc
        if self._preempt_thread is not None:
            self._preempt_eos.wait(inc.timeout)
        missing = {n: int(np.count_nonzero(v)) for n, v in self.need.items() if v.any()}
        if missing:
            hint = ""
            if self._preempt_ch is None and inc.listener is not None and inc.listener.pending():
                # the pages the source sent on a preempt channel nobody accepted
                hint = (f"; a connection waits unaccepted on {inc.listener.address}: the source "
                        f"has postcopy-preempt on, this side off?")  # fmt: skip
            raise MigrationError(f"post-copy stream ended with pages still missing: {missing}"
                                 f"{hint}")  # fmt: skip
        self._teardown_uffd()
        if self.source_checksums is not None:
            self.verified = self.checksums == self.source_checksums
            inc.verify = {"equal": self.verified}
            if not self.verified:
                bad = [n for n in self.blocks if self.checksums.get(n) !=
                       self.source_checksums.get(n)]  # fmt: skip
                raise MigrationError(f"post-copy verification failed: RAM blocks differ: "
                                     f"{', '.join(bad)}")  # fmt: skip
        inc.timeline["resumed"] = self.t_run or time.monotonic()
        inc.timeline["completed"] = time.monotonic()
        self.finished = True
        inc.state.move(MigrationStatus.COMPLETED)
        inc._shut(0)

    def _teardown_uffd(self) -> None:
        self._stop.set()
        if self._fault_thread is not None:
            self._fault_thread.join(2)
        if self._preempt_ch is not None:
            self._preempt_ch.shutdown()
        if self._preempt_thread is not None:
            self._preempt_thread.join(2)
        if self._preempt_ch is not None:
            self._preempt_ch.close()
        if self.uffd is not None:
            for start, end, _n in self._ranges:
                self.uffd.unregister(start, end - start)
            self.uffd.close()
            self.uffd = None

    def _crashed(self, thread: str, exc: BaseException) -> None:
        """A bug in a helper thread. Without its fault thread (or preempt thread) the guest
        would wait for pages nobody asks for, and the listen loop would never notice: record why
        and wake that loop, which fails the migration and stops the incomplete guest."""
        log.error("post-copy %s crashed", thread, exc_info=exc)
        if self._crash is None:
            self._crash = f"internal error in the post-copy {thread}: {exc!r}"
        ch = self.inc.channel
        if ch is not None:
            ch.shutdown()  # a paused loop sees ``_crash`` within 0.2 s

    def fail(self) -> None:
        """The migration failed for good: the guest is incomplete, stop it before the
        userfaultfd goes (its missing pages would then read as zero)."""
        m = self.machine
        self._discarder.close()
        if not self.listening or self.finished:
            return

        def stop() -> None:
            missing = int(sum(np.count_nonzero(v) for v in self.need.values()))
            m.error = (f"post-copy failed with {missing} pages still on the source: the "
                       "incomplete guest was stopped")  # fmt: skip
            try:
                m.set_runstate(RunState.INTERNAL_ERROR)
            except Exception:
                log.exception("could not stop the incomplete guest")

        # vCPUs asleep on missing pages cannot stop until woken: ask them to stop first,
        # then let closing the userfaultfd wake them.
        stopper = threads.Thread(target=stop, name="postcopy/stop-guest", daemon=True)
        stopper.start()
        time.sleep(0.05)
        try:
            self._discarder.wait(self.inc.timeout)  # no DONTNEED after the REMOVE below
        except MigrationError as exc:
            log.warning("post-copy teardown: %s", exc)
        try:
            if self.minor:
                self._drop_needed()
            self._teardown_uffd()
        except (U.UffdError, ChannelError) as exc:
            log.warning("post-copy teardown: %s", exc)
        stopper.join(10)

    # -- preempt channel -------------------------------------------------------------------------

    def _accept_preempt(self, listener: Listener) -> None:
        try:
            self._preempt_ch = listener.accept(timeout=self.inc.timeout, name="postcopy preempt")
        except ChannelTimeout:
            # QEMU needs the capability on both sides too; say which one is likely off
            raise ChannelTimeout(f"postcopy-preempt: no preempt channel reached "
                                 f"{listener.address} within {self.inc.timeout:g} s: is "
                                 f"postcopy-preempt on at the source as well?") from None  # fmt: skip
        self._preempt_eos.clear()
        self._preempt_thread = threads.Thread(target=self._preempt_loop,
                                              args=(self._preempt_ch,),
                                              name="mig/dst/preempt", daemon=True)  # fmt: skip
        self._preempt_thread.start()

    def _preempt_loop(self, ch: Channel) -> None:
        boost_thread(realtime=True, priority=RT_REQUEST_PRIORITY)
        checks = self.inc.checks.fork() if self.inc.checked else None
        parser = PreemptParser(checked=checks is not None)
        held: list[tuple[str, int, bytes | None]] = []
        buf = bytearray(1 << 16)
        view = memoryview(buf)
        ch.timeout = None
        ended: str | None = None
        try:
            while not parser.eos:
                n = ch.recv_into(view, hold_gil=True)
                if n == 0:
                    ended = "the source closed the preempt channel before its end"
                    break
                self._last_rx = time.monotonic()
                records = parser.feed(view[:n])
                if checks is None:
                    self._install_records(records)
                    continue
                for block, offset, page in records:
                    if block is None:  # the checksum of the records held
                        self._install_checked(checks, held, offset, page)  # type: ignore[arg-type]
                        held = []
                        continue
                    # a copy: the next read overwrites ``view`` before the checksum comes
                    held.append((block, offset, bytes(page) if page is not None else None))
                    self._check_preempt_page(block, offset)
        except CK.ChecksumError as exc:
            if not self._stop.is_set():
                self._corrupt = str(exc)  # the listen loop pauses with this reason
                self._wake_listen_loop()
        except StreamError as exc:
            if not self._stop.is_set():
                why = str(exc) if str(exc).startswith("preempt") else f"preempt channel: {exc}"
                if checks is not None:
                    # damaged, and nothing of it was installed unchecked: a broken link
                    self._corrupt = why
                else:
                    # unchecked garbage: pages parsed before it may be in the guest already
                    self._fatal = why
                self._wake_listen_loop()
        except (ChannelError, OSError, MigrationError) as exc:
            ended = str(exc) or type(exc).__name__
        except BaseException as exc:
            if not self._stop.is_set():
                self._crashed("preempt thread", exc)
        finally:
            if parser.eos:
                self._preempt_eos.set()
        if ended is not None and not self._stop.is_set():
            log.info("preempt channel ended: %s", ended)
            # Requested pages come this way: without it the guest would wait for them until
            # the main channel ends, and then fail with pages missing. A preempt channel
            # that breaks is the link breaking: pause, as for the main channel (unless the
            # listen loop already did: then this channel was closed on purpose).
            if ch is self._preempt_ch and \
                    self.inc.state.status == MigrationStatus.POSTCOPY_ACTIVE:  # fmt: skip
                self._preempt_lost = f"preempt channel: {ended}"
                self._wake_listen_loop()

    def _install_records(self, records: list) -> None:
        """Install the preempt channel's records of one read (no x-checksums). The first goes
        in on its own (normally the page a vCPU waits for); after it, runs of consecutive
        pages (a readahead head's lead, a prefetch window) go in ``RUN_PAGES`` at a time with
        one write and one UFFDIO_CONTINUE / UFFDIO_COPY each (``install_run``): one by one,
        each page cost ~30 us of this thread, and the guest sweeping behind them faulted on
        them one after the other."""
        i, n = 0, len(records)
        while i < n:
            block, offset, page = records[i]
            self._check_preempt_page(block, offset)
            j = i + 1
            if page is None or i == 0:
                self.install_one(block, offset // PAGE, page)
                i = j
                continue
            pages = [page]
            while j < n and len(pages) < RUN_PAGES:
                nblock, noffset, npage = records[j]
                if npage is None or nblock != block or noffset != offset + len(pages) * PAGE:
                    break
                self._check_preempt_page(nblock, noffset)
                pages.append(npage)
                j += 1
            if len(pages) == 1:
                self.install_one(block, offset // PAGE, page)
            else:
                self.install_run(block, offset // PAGE, pages)
            i = j

    def _wake_listen_loop(self) -> None:
        """The listen loop reads the main channel: shut it so that it sees the reason set."""
        main = self.inc.channel
        if main is not None:
            main.shutdown()

    def _check_preempt_page(self, block: str, offset: int) -> None:
        b = self.blocks.get(block)
        if b is None or offset // PAGE >= b.npages:
            raise StreamError(f"preempt page {offset:#x} of {block!r} is outside RAM")

    def _install_checked(self, checks: Any, held: list, records: int, digest: int) -> None:
        """x-checksums: install the preempt channel's held pages once their checksum matches."""
        unit = checks.unit
        for block, offset, page in held:
            i = np.array([offset // PAGE])
            if page is None:
                unit.add(block, CK.KIND_ZERO, i)
            else:
                unit.add(block, CK.KIND_DATA, i, np.frombuffer(page, np.uint8).reshape(1, PAGE))
        checks.verify(records, digest, bytes(CK.BITMAP_BYTES), None, " (preempt channel)")
        for block, offset, page in held:
            self.install_one(block, offset // PAGE, page)

    # -- recovery ---------------------------------------------------------------------------------

    def pause(self) -> None:
        """``migrate-pause`` on the destination: drop the link (postcopy-active only)."""
        if self.inc.state.status != MigrationStatus.POSTCOPY_ACTIVE:
            raise MigrationError("migrate-pause is only possible in postcopy-active")
        self._pause_event.set()
        ch = self.inc.channel
        if ch is not None:
            ch.shutdown()

    def recover(self, uri: str) -> None:
        """``migrate-recover URI``: listen there for the source's resume (postcopy-paused)."""
        if self.inc.state.status != MigrationStatus.POSTCOPY_PAUSED:
            raise MigrationError("Migrate recover can only be run when postcopy is paused.")
        # QEMU 10.0 first releases what it listened on (the first address, or an earlier
        # recover's listener: the same path may be given again) and then lists only the new
        # listener in query-migrate's socket-address; livemig listed the first address
        # throughout and left an earlier recover's listener open
        old, self._recover_listener = self._recover_listener, None
        self.inc.socket_addresses = []
        if old is not None:
            old.close()
        listener = Listener(uri, timeout=self.inc.timeout)
        self._recover_listener = listener
        self._recover_uri = listener.address
        self.inc.socket_addresses = listener.socket_addresses()
        self._recover_event.set()

    def _paused(self, reason: str) -> None:
        inc = self.inc
        log.warning("post-copy paused: %s", reason)
        with self.lock:
            self.linked = False
        for ch in (inc.channel, self._preempt_ch):
            if ch is not None:
                ch.shutdown()
        if self._preempt_thread is not None:
            self._preempt_thread.join(2)
        for ch in (inc.channel, self._preempt_ch):
            if ch is not None:
                ch.close()
        self._preempt_ch = self._preempt_thread = None
        missing = sum(int(np.count_nonzero(v)) for v in self.need.values())
        st = inc.state
        if st.status in (MigrationStatus.POSTCOPY_ACTIVE, MigrationStatus.POSTCOPY_RECOVER):
            st.move(MigrationStatus.POSTCOPY_PAUSED,
                    error=f"{reason}; the guest waits for {missing} pages still on the source "
                          "(migrate-recover to resume)")  # fmt: skip

    def _wait_recovery(self, old: Decoder) -> tuple[Channel, Decoder]:
        inc = self.inc
        attempts = 0
        deadline = None
        if self.auto_recover:
            deadline = time.monotonic() + self.auto_recover * inc.timeout
        while True:
            if inc._cancel.is_set():
                raise ChannelError("incoming migration cancelled while post-copy was paused")
            if self._crash is not None:
                raise MigrationError(self._crash)
            listener = None
            if self._recover_event.is_set():
                listener = self._recover_listener
            elif self.auto_recover:
                listener = inc.listener
            if listener is None:
                self._recover_event.wait(0.2)
                continue
            try:
                ch = listener.accept(timeout=0.2)
            except ChannelTimeout:
                if deadline is not None and not self._recover_event.is_set() and \
                        time.monotonic() > deadline:  # fmt: skip
                    raise MigrationError(
                        f"post-copy link lost and the source did not come "
                        f"back in {self.auto_recover} recovery periods"
                    ) from None
                continue
            except ChannelError:
                if listener is not self._recover_listener and listener is not inc.listener:
                    continue  # closed by a later migrate-recover, which listens anew
                raise
            attempts += 1
            inc.channel = ch
            inc._rp_encoder.reset()
            inc.state.move(MigrationStatus.POSTCOPY_RECOVER)
            self._recover_event.clear()
            self._resume_listener = listener  # the preempt channel comes there too
            dec = Decoder(with_header=False, block_sizes=inc.loader.block_sizes(),
                          devices={CK.IDSTR: CK.vmsd()})  # fmt: skip
            # The resumed stream continues the sections started on the first channel.
            dec._sections.update(old._sections)
            # x-checksums: pages held for a checksum that never came are still needed (the
            # source sends them again after RECV_BITMAP)
            self._held, self._must_check = [], False
            self._corrupt = self._preempt_lost = None  # about the link that broke
            inc.checks.unit = CK.Unit()
            return ch, dec

    def _send_bitmap(self, name: str, dec: Decoder) -> None:
        need = self.need.get(name)
        if need is None:
            raise StreamError(f"RECV_BITMAP for unknown RAM block {name!r}", dec.offset)
        bits = np.packbits(~need, bitorder="little")
        pad = (-len(bits)) % 8
        raw = bits.tobytes() + bytes(pad)
        self.inc._send_rp(RP.RecvBitmapReply(name, raw))

    def _resumed(self) -> None:
        inc = self.inc
        listener = getattr(self, "_resume_listener", None)
        if self.preempt and listener is not None:
            # The source connects the preempt channel after the bitmaps, before RESUME.
            self._accept_preempt(listener)
        if listener is not None and listener is not inc.listener:
            listener.close()
        self._resume_listener = None
        inc.state.move(MigrationStatus.POSTCOPY_ACTIVE)
        inc._send_rp(RP.ResumeAck(1))
        with self.lock:
            self.linked = True
            pending = [(n, int(i)) for n, r in self.requested.items()
                       for i in np.flatnonzero(r & self.need[n])]  # fmt: skip
        for n, i in pending:
            self._request(n, i)

    # -- reporting ---------------------------------------------------------------------------------

    def query(self) -> dict[str, Any]:
        st = self.inc.state.status
        out: dict[str, Any] = {}
        info = {
            "faults": self.faults,
            "zero-faults": self.zero_faults,
            "requests": self.requests,
            "pages-placed": self.pages_placed,
            "pages-missing": int(sum(np.count_nonzero(v) for v in self.need.values())),
            # how the pages discarded at the switch were dropped, and why not minor faults
            "discard": "dontneed" if self.minor else "remove",
            # time in madvise, and how much of it RUN waited for (the rest overlapped the
            # package: migration/postcopy_discard.py)
            "discard-us": int(self._discarder.busy * 1e6),
            "discard-wait-us": int(self._discarder.waited * 1e6),
            "latency": percentiles(self.latencies),
            "blocktime-ms": int(self.blocktime * 1000),
            "vcpu-blocktime-ms": [int(v * 1000) for v in self._vcpu_block.values()],
        }
        if self.discard_why:
            info["discard-why"] = self.discard_why
        out["x-postcopy"] = info
        if self.blocktime_on and st == MigrationStatus.COMPLETED:
            out["postcopy-blocktime"] = info["blocktime-ms"]
            out["postcopy-vcpu-blocktime"] = info["vcpu-blocktime-ms"]
        return out
