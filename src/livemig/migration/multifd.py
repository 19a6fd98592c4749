"""Multifd: guest pages over N extra connections, one sender/receiver thread per channel.

Theory of operation (QEMU: ``migration/multifd.c``, 8.1+ flush semantics; reference §8):

* **Channels.** After the main channel, the source opens ``multifd-channels`` connections to
  the same URI; each starts with the 64-byte initial packet (magic, version, VM UUID, channel
  id). The destination accepts the main channel and the N multifd channels in any order: it
  peeks the first 4 bytes (QEMU 8.1+) and, for a connection that is neither, falls back to
  QEMU 7.2's rule (first = main). A wrong magic, version or UUID, an id out of range or seen
  twice is refused with an error naming the channel.
* **Packets.** The migration thread hands batches of dirty page indices of one RAMBlock to the
  channel with the fewest jobs queued, waiting while no channel has room (QEMU's
  ``channels_ready`` semaphore: a job never waits behind a slow channel while another idles).
  A job carries about ``JOB_PAGES`` data pages: up to ``MAX_JOB_PAGES`` pages while the last
  jobs were mostly zero pages (``MultifdSender.job_pages``), as what a job costs in Python does
  not depend on what it holds.
  The channel thread sorts them into zero and normal pages (zero-page detection runs here,
  9.0's default ``zero-page-detection=multifd``, or in the migration thread when it would
  otherwise wait for room in the queues; with ``legacy`` the migration thread finds them and
  sends ZERO records on the main channel, as QEMU up to 8.2; with ``none`` every page goes as
  a normal one), builds the 1344-byte packet headers of the whole job at once (a packet: its
  normal pages' offsets, then its zero pages') and sends headers + page data with one
  ``writev`` whose buffers are memoryview slices of the RAM mmap (no copy in Python). With
  compression the pages of a packet go through the channel's single zlib or zstd stream (QEMU:
  one stream per channel; each packet ends with a sync/block flush so it can be decoded on its
  own arrival).
* **Sync.** Channels reorder, so an old copy of a page must never land after a newer one. At
  every dirty-bitmap sync (a pass), and before the device state, ``MultifdSender.sync()`` makes
  every channel send a SYNC packet after everything queued before it and waits until all were
  sent; the migration thread then writes a ``MULTIFD_FLUSH`` word on the main channel. On the
  destination a channel that reads a SYNC packet stops; the main thread, at the
  ``MULTIFD_FLUSH`` word, waits until all N channels stopped, then releases them
  (``MultifdReceiver.flush()``). Within one pass a page is sent at most once, so pages of one
  pass can go in any order.
* **Receive.** Uncompressed page data is read straight into the guest RAM slots the (already
  checked) header names; compressed payloads are read into one reusable buffer per channel and
  inflated into a reusable page buffer before placement. An uncompressed packet for the
  previous packet's block (almost every packet of a pass) is checked and placed without the
  general path's packet object (``_run_of_pages``): a run of data pages with one read, scattered
  data pages with one ``readv``, zero pages by clearing only those written before (untouched
  RAM is zero: QEMU's ``ramblock_recv_bitmap`` rule). The ``readv`` of such a packet's pages
  also takes the next packet's header, as much of it as has arrived, into a second header
  buffer (``_fill``): one read a packet instead of two. The source builds runs' packets the
  same short way (``_run_packets``), and other jobs' packets from a few numpy calls
  (``_mixed_packets``), to the same bytes.

* **QEMU 7.2 streams** (not handled, by design): a 7.2 source (and any machine type up to
  8.0, QEMU's ``multifd-flush-after-each-section=on`` compat property) sends no
  ``MULTIFD_FLUSH`` word; its channels send a SYNC packet before *every* RAM EOS (the START
  section's, each PART's and the END's) and the 7.2 destination waits for all channels at each
  EOS. Supporting it would mean calling ``MultifdReceiver.flush()`` at every ``RamEos`` when
  the configuration's machine type is a QEMU one of version <= 8.0. It is not wired in because
  livemig's destination refuses any machine type but its own (``source.MACHINE_TYPE``) before
  a RAM section arrives, so such a stream never reaches the multifd code; and livemig's source
  always uses the 8.1+ rule (SYNC per dirty-bitmap sync, one ``MULTIFD_FLUSH`` word). The
  channel handshake already accepts 7.2's connection order (first connection = main).
* **mapped-ram** (``mapped_ram.py``): with capability mapped-ram the "channels" are writer
  threads on the ``file:`` target; ``source_setup`` leaves them to ``mapped_ram.source_setup``,
  ``source_flush`` syncs them without a ``MULTIFD_FLUSH`` word (and writes the page bitmaps at
  the final sync), and the destination reads the file with no multifd channels at all.

Every blocking wait has a time-out; a failing channel records its error, wakes the others and
the migration fails with that error (the source guest keeps running).
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import os
import queue
import select
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from livemig import threads
from livemig.errors import MigrationError, StreamError, UsageError
from livemig.machine.abi import PAGE_SIZE
from livemig.savevm import checksum as CK
from livemig.savevm.ram import Batch, page_runs, zero_mask
from livemig.transport import Channel, ChannelError, ChannelTimeout
from livemig.transport.channel import IOV_MAX
from livemig.wire.constants import QEVM_MAGIC
from livemig.wire.multifd import (
    CHECKSUM_PACKET,
    INIT_PACKET,
    MULTIFD_FLAG_COMPRESSION_MASK,
    MULTIFD_FLAG_SYNC,
    MULTIFD_FLAG_X_CHECKSUM,
    MULTIFD_FLAG_ZLIB,
    MULTIFD_FLAG_ZSTD,
    MULTIFD_MAGIC,
    MULTIFD_VERSION,
    PACKET_HEADER,
    PAGES_ALLOC,
    MultifdInit,
    MultifdPacket,
)

log = logging.getLogger(__name__)

PAGE_SHIFT = 12
WORDS_PER_PAGE = PAGE_SIZE // 8
QUEUE_DEPTH = 2  # jobs waiting per channel: enough to keep the socket busy
JOB_PAGES = 8 * PAGES_ALLOC  # pages per hand-off to a channel thread: 8 packets, one writev
# A job of mostly zero pages grows up to this: the x-checksums trailer's bitmap (the packet's
# 8 * PAGES_ALLOC bytes of offsets) names at most this many data records.
MAX_JOB_PAGES = 64 * PAGES_ALLOC
COMPRESSION_FLAGS = {"none": 0, "zlib": MULTIFD_FLAG_ZLIB, "zstd": MULTIFD_FLAG_ZSTD}
_STOP = object()
_SYNC = object()


def zero_uuid() -> bytes:
    """The UUID of a VM started without ``-uuid`` (QEMU compares it even when all zero)."""
    return bytes(16)


def machine_uuid(machine: Any) -> bytes:
    u = getattr(machine, "uuid", None)
    if isinstance(u, (bytes, bytearray)) and len(u) == 16:
        return bytes(u)
    return zero_uuid()


# -- compression ------------------------------------------------------------------------------


class _Compressor:
    """One channel's compression stream (QEMU keeps one per channel for the whole migration)."""

    def __init__(self, method: str, level: int) -> None:
        self.method = method
        if method == "zlib":
            self._z = zlib.compressobj(level)
        elif method == "zstd":
            import zstandard

            self._zc = zstandard.ZstdCompressor(level=level)
            self._z = self._zc.compressobj()
            self._flush = zstandard.COMPRESSOBJ_FLUSH_BLOCK
        elif method != "none":
            raise MigrationError(f"multifd-compression {method!r} is not supported")

    def compress(self, data: bytes | memoryview) -> bytes:
        if self.method == "zlib":
            return self._z.compress(data) + self._z.flush(zlib.Z_SYNC_FLUSH)
        return self._z.compress(data) + self._z.flush(self._flush)


class _Decompressor:
    """One channel's inflate stream; each packet must inflate to exactly its page count."""

    def __init__(self, method: str) -> None:
        self.method = method
        if method == "zlib":
            self._d = zlib.decompressobj()
        elif method == "zstd":
            import zstandard

            self._d = zstandard.ZstdDecompressor().decompressobj()

    def decompress(self, data: memoryview, expected: int, where: str) -> bytes:
        try:
            if self.method == "zlib":
                out = self._d.decompress(data, expected + 1)
                if self._d.unconsumed_tail:
                    raise StreamError(f"{where}: zlib data inflates to more than {expected} bytes")
            else:
                out = self._d.decompress(data)
        except (zlib.error, ValueError) as exc:
            raise StreamError(f"{where}: {self.method} data does not decompress: {exc}") from None
        except Exception as exc:  # zstandard.ZstdError does not derive from a stdlib error
            if type(exc).__name__ == "ZstdError":
                raise StreamError(f"{where}: zstd data does not decompress: {exc}") from None
            raise
        if len(out) != expected:
            raise StreamError(f"{where}: packet inflates to {len(out)} bytes, header says "
                              f"{expected} ({expected // PAGE_SIZE} pages)")  # fmt: skip
        return out


# -- source -----------------------------------------------------------------------------------


class _Scan:
    """A queued job's zero-page scan, done once by whichever thread comes to it first: its
    channel thread, or the migration thread, which scans queued jobs from the newest back
    while it would otherwise wait for room or for a sync (``MultifdSender._scan_one_queued``)."""

    __slots__ = ("done", "lock", "mask")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.mask: np.ndarray | None = None
        self.done = False

    def run(self, words: np.ndarray, idx: np.ndarray) -> np.ndarray | None:
        """The mask, scanned now unless another thread did (waiting while it scans)."""
        with self.lock:
            self._scan(words, idx)
            return self.mask

    def try_run(self, words: np.ndarray, idx: np.ndarray) -> bool:
        """Scan now if nobody did or is doing it; False if it was done or is under way."""
        if self.done or not self.lock.acquire(blocking=False):
            return False
        try:
            return self._scan(words, idx)
        finally:
            self.lock.release()

    def _scan(self, words: np.ndarray, idx: np.ndarray) -> bool:
        """Under ``lock``: scan unless done; whether this call scanned."""
        if self.done:
            return False
        self.mask = zero_mask(words, idx)
        self.done = True
        return True


class _SendChannel:
    """One multifd connection: its compression stream and pending checksum trailer. A
    ``_SendWorker`` thread writes its packets (one worker may serve several connections)."""

    def __init__(self, sender: MultifdSender, cid: int, channel: Channel) -> None:
        self.sender = sender
        self.id = cid
        self.channel = channel
        self.synced = threading.Semaphore(0)
        self.compressor = _Compressor(sender.compression, sender.level)
        self._trailer: list = []  # x-checksums: the last job's checksum packet, not yet sent

    def send_job(
        self,
        block: Any,
        idx: np.ndarray,
        is_zero: np.ndarray | _Scan | None = None,
        scanned: bool = False,
    ) -> None:
        """Send a job: ``idx`` (ascending pages of ``block``); ``is_zero`` marks its zero pages
        if ``scanned`` (the migration thread looked), else this thread looks if it must (a
        ``_Scan``: unless the migration thread did meanwhile)."""
        s = self.sender
        unit = CK.Unit() if s.checks is not None else None
        if isinstance(is_zero, _Scan):
            is_zero = is_zero.run(s.words[block.idstr], idx)
        elif not scanned and s.zero_detect:
            is_zero = zero_mask(s.words[block.idstr], idx)
        nzero = 0 if is_zero is None else int(np.count_nonzero(is_zero))
        s.zero_share += (nzero / len(idx) - s.zero_share) / 4  # for ``job_pages`` (a hint)
        self._send_packet(0, block, idx, unit, is_zero)
        if unit:
            # after the packets: the tracker is asked once the pages are out; the trailer goes
            # with the next job's packets on this connection, or before its SYNC
            self._trailer = self._trailer_packet(unit)

    def send_sync(self) -> None:
        self._send_packet(MULTIFD_FLAG_SYNC, None, np.empty(0, np.int64))
        self.synced.release()

    def _trailer_packet(self, unit: CK.Unit) -> list:
        """x-checksums: the packet with the checksum of the job just sent."""
        s = self.sender
        digest, ex = s.checks.close(unit, MAX_JOB_PAGES)  # type: ignore[union-attr]
        head = CHECKSUM_PACKET.pack(MULTIFD_MAGIC, MULTIFD_VERSION, MULTIFD_FLAG_X_CHECKSUM,
                                    PAGES_ALLOC, 0, 0, next(s.packet_num), 0, unit.records,
                                    digest, b"")  # fmt: skip
        return [head, CK.pack_bits(ex, 8 * PAGES_ALLOC)]

    def _with_trailer(self, bufs: list) -> list:
        """``bufs`` after the pending trailer, if one is waiting (one writev for both)."""
        if not self._trailer:
            return bufs
        out, self._trailer = [*self._trailer, *bufs], []
        return out

    def _send_packet(
        self,
        flags: int,
        block: Any,
        idx: np.ndarray,
        unit: Any = None,
        is_zero: np.ndarray | None = None,
    ) -> None:
        """Send ``idx`` (up to ``MAX_JOB_PAGES`` pages of ``block``, or none for a SYNC packet) as
        packets of at most ``PAGES_ALLOC`` pages, all of them in one ``writev``.

        The wire keeps QEMU's 128-page packets (a QEMU destination refuses more), but the
        per-packet work in Python (a queue hand-off, a zero scan, a system call) was a third
        of the channel thread's time at 512 KiB a packet; it is now paid once per job.
        """
        s = self.sender
        if len(idx) == 0:
            head = MultifdPacket(flags | s.flag, next(s.packet_num), "", idx.astype(np.uint64),
                                 0, 0, PAGES_ALLOC, 0).pack()  # fmt: skip
            s._count(self.channel.sendv(self._with_trailer([head])), 0, 0)
            return
        first = int(idx[0])
        if is_zero is None and s.flag == 0 and int(idx[-1]) - first == len(idx) - 1:
            if unit is not None:
                unit.add(block.idstr, CK.KIND_DATA, idx)
                s.checks.prepare(unit)  # type: ignore[union-attr]
                unit.feed(s.checks.views)  # type: ignore[union-attr]  # then the kernel's copy
            bufs = self._run_packets(flags, block, first, len(idx))
            s._count(self.channel.sendv(self._with_trailer(bufs)), len(idx), 0)
            return
        nzero = 0 if is_zero is None else int(np.count_nonzero(is_zero))
        if s.flag == 0:
            bufs = self._mixed_packets(flags, block, idx, is_zero, unit)
            if unit is not None:
                s.checks.prepare(unit)  # type: ignore[union-attr]
                unit.feed(s.checks.views)  # type: ignore[union-attr]  # then the kernel's copy
            s._count(self.channel.sendv(self._with_trailer(bufs)), len(idx) - nzero, nzero)
            return
        view = block.view
        bufs: list[Any] = []
        for at in range(0, len(idx), PAGES_ALLOC):
            chunk = idx[at : at + PAGES_ALLOC]
            if is_zero is not None:
                z = is_zero[at : at + PAGES_ALLOC]
                pn, pz = chunk[~z], chunk[z]
            else:
                pn, pz = chunk, chunk[:0]
            slices = [
                view[i << PAGE_SHIFT : (i + n) << PAGE_SHIFT]
                for i, n in page_runs(pn, ascending=True)
            ]
            if s.compression == "none" or not slices:
                payload = slices
            else:
                raw = slices[0] if len(slices) == 1 else b"".join(slices)
                payload = [self.compressor.compress(raw)]
            offsets = (np.concatenate((pn, pz)) if len(pz) else pn).astype(np.uint64)
            if unit is not None:
                unit.add(block.idstr, CK.KIND_DATA, pn)
                unit.add(block.idstr, CK.KIND_ZERO, pz)
            bufs.append(MultifdPacket(
                flags | s.flag, next(s.packet_num), block.idstr, offsets << np.uint64(PAGE_SHIFT),
                len(pn), len(pz), PAGES_ALLOC, sum(len(p) for p in payload),
            ).pack())  # fmt: skip
            bufs += payload
        if unit is not None:
            s.checks.prepare(unit)  # type: ignore[union-attr]
            unit.feed(s.checks.views)  # type: ignore[union-attr]
        s._count(self.channel.sendv(self._with_trailer(bufs)), len(idx) - nzero, nzero)

    def _run_packets(self, flags: int, block: Any, first: int, count: int) -> list[Any]:
        """The packets of ``count`` uncompressed data pages from ``first``, one run: what a
        pass over a busy guest sends almost only. All their offsets come from one numpy
        expression, each header from one ``struct.pack``; the general path builds a packet
        object and an offsets array per packet. A job of 8 packets, hot: 30 us against 73."""
        s = self.sender
        name = s.names.get(block.idstr)
        if name is None:
            name = s.names[block.idstr] = block.idstr.encode()
        pages = np.arange(first, first + count, dtype=np.uint64)
        offs = memoryview((pages << np.uint64(PAGE_SHIFT)).astype(">u8").tobytes())
        view = block.view
        bufs: list[Any] = []
        for at in range(0, count, PAGES_ALLOC):
            n = min(PAGES_ALLOC, count - at)
            page = first + at
            bufs.append(PACKET_HEADER.pack(MULTIFD_MAGIC, MULTIFD_VERSION, flags, PAGES_ALLOC, n,
                                           n << PAGE_SHIFT, next(s.packet_num), 0, name))  # fmt: skip
            bufs.append(offs[at * 8 : (at + n) * 8])
            if n < PAGES_ALLOC:
                bufs.append(bytes(8 * (PAGES_ALLOC - n)))
            bufs.append(view[page << PAGE_SHIFT : (page + n) << PAGE_SHIFT])
        return bufs

    def _mixed_packets(self, flags: int, block: Any, idx: np.ndarray,
                       is_zero: np.ndarray | None, unit: Any = None) -> list[Any]:  # fmt: skip
        """The packets of uncompressed pages ``idx`` of any shape: zero pages (``is_zero``),
        gaps. Each packet takes the job's next ``PAGES_ALLOC`` pages, its normal pages' offsets
        first and then its zero pages', as QEMU's and the general path's. The offsets, counts
        and data runs of all the job's packets come from a few numpy calls over the whole job:
        the general path's per-packet masks, runs and packet objects were most of the channel
        thread's Python on an idle guest (8 packets of 2 data and 126 zero pages a job)."""
        s = self.sender
        name = s.names.get(block.idstr)
        if name is None:
            name = s.names[block.idstr] = block.idstr.encode()
        n = len(idx)
        npk = -(-n // PAGES_ALLOC)
        slots = npk * PAGES_ALLOC
        key = np.full(slots, 2, np.int8)  # 0 normal, 1 zero, 2 an unused slot (sorted last)
        key[:n] = 0 if is_zero is None else is_zero
        rows = key.reshape(npk, PAGES_ALLOC)
        order = np.argsort(rows, axis=1, kind="stable")
        order += (np.arange(npk) * PAGES_ALLOC)[:, None]
        pages = np.zeros(slots, np.uint64)  # unused slots: offset 0, as QEMU leaves them
        pages[:n] = idx
        placed = pages[order.ravel()]  # each packet's slots: its normal pages, then zero
        offs = memoryview((placed << np.uint64(PAGE_SHIFT)).astype(">u8").tobytes())
        nnormal = np.count_nonzero(rows == 0, axis=1).tolist()
        nzero = np.count_nonzero(rows == 1, axis=1).tolist()
        # the data: runs of normal pages, broken at gaps and at packet boundaries
        pos = np.flatnonzero(key[:n] == 0) if is_zero is not None else np.arange(n)
        normal = idx[pos].astype(np.int64)
        runs: list[tuple[int, int, int]] = []
        if len(normal):
            brk = np.flatnonzero((np.diff(normal) != 1)
                                 | (np.diff(pos // PAGES_ALLOC) != 0)) + 1  # fmt: skip
            starts = np.concatenate(([0], brk))
            ends = np.concatenate((brk, [len(normal)]))
            runs = list(zip((pos[starts] // PAGES_ALLOC).tolist(), normal[starts].tolist(),
                            (ends - starts).tolist(), strict=True))  # fmt: skip
        runs.append((npk, 0, 0))  # a sentinel past the last packet
        view = block.view
        bufs: list[Any] = []
        r = 0
        step = 8 * PAGES_ALLOC
        for p in range(npk):
            nn = nnormal[p]
            bufs.append(PACKET_HEADER.pack(MULTIFD_MAGIC, MULTIFD_VERSION, flags, PAGES_ALLOC,
                                           nn, nn << PAGE_SHIFT, next(s.packet_num), nzero[p],
                                           name))  # fmt: skip
            bufs.append(offs[p * step : (p + 1) * step])
            if unit is not None:  # x-checksums: the records in stream order, as the receiver
                at = p * PAGES_ALLOC
                unit.add(block.idstr, CK.KIND_DATA, placed[at : at + nn].astype(np.int64))
                unit.add(block.idstr, CK.KIND_ZERO,
                         placed[at + nn : at + nn + nzero[p]].astype(np.int64))  # fmt: skip
            while runs[r][0] == p:
                _, i, c = runs[r]
                bufs.append(view[i << PAGE_SHIFT : (i + c) << PAGE_SHIFT])
                r += 1
        return bufs


class _SendWorker:
    """A thread that fills one or more multifd connections, taking jobs from its queue.

    QEMU runs a thread per channel. Here threads and connections are decoupled
    (``x-multifd-threads``): the wire keeps the channel count a QEMU peer requires, while the
    work goes to as many threads as the host has cores for. A thread per channel made 2 and 4
    channels move less than 1 on a 2-core host (2.7-2.9 against 3.4 GB/s of random memory):
    four busy Python threads on two cores fought over them and over each side's GIL, and
    spent 20 % more CPU per GB. Jobs go to the worker with the fewest queued, and a worker
    writes each job whole to its next connection in turn.
    """

    def __init__(self, sender: MultifdSender, wid: int, channels: list[_SendChannel]) -> None:
        self.sender = sender
        self.channels = channels
        self.queue: queue.Queue[Any] = queue.Queue(QUEUE_DEPTH * len(channels))
        self._next = 0
        name = f"mig/src/send_{channels[0].id}"
        self.thread = threads.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        s = self.sender
        c = self.channels[0]
        try:
            while True:
                job = self.queue.get()
                if job is _STOP:
                    return
                if job is _SYNC:
                    for c in self.channels:  # after every job queued before it, on each
                        c.send_sync()
                    continue
                s._room.release()  # a data job left the queue: any worker may take the next
                c = self.channels[self._next]
                self._next = (self._next + 1) % len(self.channels)
                c.send_job(*job)
        except (ChannelError, OSError, StreamError) as exc:
            s._failed(f"multifd channel {c.id}: {exc}")
        except BaseException as exc:  # a bug: report it instead of hanging the sync
            log.exception("multifd send channel %d crashed", c.id)
            s._failed(f"multifd channel {c.id}: internal error: {exc!r}")


def default_threads(channels: int, compression: str = "none") -> int:
    """``x-multifd-threads`` 0: a thread for each core the host can spare (one goes to the
    migration thread), never more than there are channels. With compression, a thread for every
    core: zlib and zstd work without the interpreter lock, so they compress (or inflate) on
    both cores while the migration thread, which mostly waits for them, shares one."""
    spare = (os.cpu_count() or 1) - (1 if compression == "none" else 0)
    return max(1, min(channels, spare))


class PageWorkerPool:
    """What the multifd channels and the mapped-ram writers share: the first error latched for
    the migration thread, page counters it takes as deltas, and a bounded hand-off of jobs to
    a worker's queue (a stalled worker fails the migration instead of hanging it)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.error: str | None = None
        self._lock = threading.Lock()
        self._bytes = self._normal = self._zero = 0
        self._taken = (0, 0, 0)

    def _count(self, nbytes: int, normal: int, zero: int) -> None:
        with self._lock:
            self._bytes += nbytes
            self._normal += normal
            self._zero += zero

    def _latch(self, reason: str) -> None:
        with self._lock:
            if self.error is None:
                self.error = reason
        log.warning("%s", reason)

    def check(self) -> None:
        if self.error is not None:
            raise MigrationError(self.error)

    def take_stats(self) -> tuple[int, int, int]:
        """(bytes, normal pages, zero pages) sent since the last call."""
        with self._lock:
            now = (self._bytes, self._normal, self._zero)
        prev, self._taken = self._taken, now
        return now[0] - prev[0], now[1] - prev[1], now[2] - prev[2]

    @property
    def bytes_sent(self) -> int:
        return self._bytes

    def _put_wait(self, q: queue.Queue, job: Any, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            self.check()
            try:
                q.put(job, timeout=0.1)
                return
            except queue.Full:
                if time.monotonic() > deadline:
                    raise MigrationError(f"{what}: no progress for {self.timeout:g} s") from None


class MultifdSender(PageWorkerPool):
    """The source's multifd channels: queue page batches, sync at pass boundaries."""

    scan_ahead = True  # the migration thread scans jobs for zero pages while it would wait

    def __init__(
        self,
        blocks: list,
        channels: list[Channel],
        *,
        compression: str = "none",
        level: int = 1,
        uuid: bytes | None = None,
        timeout: float = 30.0,
        zero_detect: bool = True,
        handshake_sent: bool = False,
        checks: CK.SourceChecks | None = None,
        threads: int = 0,
    ) -> None:
        self.blocks = list(blocks)
        self.checks = checks  # x-checksums: a trailer packet after every job
        self.zero_detect = zero_detect  # False: every page goes as a normal one
        self.names: dict[str, bytes] = {}  # RAMBlock idstr as the packet header carries it
        self.words = {b.idstr: b.array.view(np.uint64).reshape(-1, WORDS_PER_PAGE)
                      for b in self.blocks}  # fmt: skip
        self.compression = compression
        self.flag = COMPRESSION_FLAGS[compression]
        self.level = level
        super().__init__(timeout)
        self.packet_num = itertools.count()
        # The share of zero pages in the last jobs, updated by the channel threads (a float
        # stored whole: a racy update loses a sample, never the value)
        self.zero_share = 0.0
        # Free data-job slots over all channel queues (SYNC and STOP are queued only while no
        # data job is): the migration thread waits for room in *any* queue, as QEMU's
        # multifd_send waits on channels_ready, never for one channel while another idles.
        self._room = threading.Semaphore(len(channels) * QUEUE_DEPTH)
        # The last jobs queued for their channel thread to scan: no more can still be queued
        self._queued_scans: collections.deque[tuple[Any, np.ndarray, _Scan]] = (
            collections.deque(maxlen=len(channels) * QUEUE_DEPTH))  # fmt: skip
        self.channels = [_SendChannel(self, i, ch) for i, ch in enumerate(channels)]
        uuid = uuid if uuid is not None else zero_uuid()
        for c in self.channels:
            if not handshake_sent:
                c.channel.send(MultifdInit(uuid, c.id).pack())
            self._count(INIT_PACKET.size, 0, 0)
        k = min(len(self.channels), threads or default_threads(len(self.channels), compression))
        self.workers = [_SendWorker(self, w, self.channels[w::k]) for w in range(k)]
        for w in self.workers:
            w.thread.start()

    @classmethod
    def connect(
        cls,
        uri: str,
        blocks: list,
        n: int,
        *,
        compression: str = "none",
        level: int = 1,
        uuid: bytes | None = None,
        timeout: float = 30.0,
        zero_detect: bool = True,
        checks: CK.SourceChecks | None = None,
        threads: int = 0,
    ) -> MultifdSender:
        """Open ``n`` multifd connections to ``uri`` (after the main one) and start them.

        Each sends its initial packet as soon as it is connected, as QEMU's do: a QEMU 7.2
        destination reads it right after accepting the channel, on its main loop, and over
        TLS the next channel's handshake waited behind that read (both sides stuck until a
        time-out, when all the packets came after all the connects)."""
        from livemig.transport import connect

        uuid = uuid if uuid is not None else zero_uuid()
        chans: list[Channel] = []
        try:
            for i in range(n):
                ch = connect(uri, timeout=timeout, name=f"multifd {i}")
                chans.append(ch)
                ch.send(MultifdInit(uuid, i).pack())
            return cls(blocks, chans, compression=compression, level=level, uuid=uuid,
                       timeout=timeout, zero_detect=zero_detect, handshake_sent=True,
                       checks=checks, threads=threads)  # fmt: skip
        except BaseException:
            for ch in chans:
                ch.close()
            raise

    # -- called by the channel threads ----------------------------------------------------------

    def _failed(self, reason: str) -> None:
        self._latch(reason)
        for c in self.channels:
            c.channel.shutdown()
            c.synced.release()  # wake a waiting sync(); it sees the error

    # -- called by the migration thread -------------------------------------------------------

    def _put(self, job: Any, room: bool = False) -> None:
        """Hand ``job`` to the worker with the fewest jobs queued, once any has room.

        Waiting on one chosen worker (round robin) let one that ran ahead empty its queue and
        sit idle while the migration thread waited for room behind a slower one: py-spy
        showed the channel threads waiting for jobs a tenth of the time at 2 channels.
        """
        deadline = time.monotonic() + self.timeout
        while not room and not self._room.acquire(blocking=False):
            # no room: scan a queued job for its channel thread rather than wait
            if self._scan_one_queued():
                continue
            if self._room.acquire(timeout=0.1):
                break
            self.check()
            if time.monotonic() > deadline:
                raise MigrationError(f"multifd channels: no progress for {self.timeout:g} s")
        self.check()
        for w in sorted(self.workers, key=lambda w: w.queue.qsize()):
            try:
                w.queue.put_nowait(job)
                return
            except queue.Full:
                continue
        # not reached while only data jobs share the queues; wait rather than lose the job
        w = self.workers[0]
        self._put_wait(w.queue, job, f"multifd channel {w.channels[0].id}")

    @property
    def job_pages(self) -> int:
        """Pages per job: ``JOB_PAGES`` of data pages, as the last jobs' share of zero pages
        predicts, up to ``MAX_JOB_PAGES``.

        A job's cost in Python (the migration thread's take and hand-off, the channel
        thread's scan call, packet headers and writev) is paid per job, whatever it holds; on
        an idle guest (63 zero pages in 64) that was a fifth of both processes' CPU at 8
        packets a job. Sized by the data it carries, a job keeps what waits in the queues to
        about the same number of bytes on the wire (what the final sync must still send), on
        any guest."""
        data = max(1.0 - self.zero_share, JOB_PAGES / MAX_JOB_PAGES)
        return JOB_PAGES * min(MAX_JOB_PAGES // JOB_PAGES, int(1 / data))

    def send_batches(self, batches: list) -> int:
        """Queue ``ram.Batch`` objects (normal and zero indices are re-sorted by the channels).

        Returns the number of pages queued.
        """
        pages = 0
        step = self.job_pages
        for b in batches:
            idx = np.concatenate((b.normal, b.zero)) if len(b.zero) else b.normal
            if len(b.zero) and len(b.normal):
                idx.sort()
            words = self.words[b.idstr]
            for i in range(0, len(idx), step):
                self.check()
                job = idx[i : i + step]
                # Zero-page detection (multifd): a job scanned here while the channel threads
                # are busy (their queues full, or holding two jobs nobody has scanned yet)
                # rather than waiting for room; otherwise they scan it. numpy
                # scans without the interpreter lock, so an idle guest's scan, memory-bound,
                # runs on both cores and beside the channel threads' Python: the channel
                # thread alone spent half its time scanning, and the migration thread waited
                # (idle 1 GiB, 2 channels, CPU ms of the critical thread 205 -> 125 with the
                # packet changes of the same commit). The bound on unscanned jobs keeps the
                # end of a pass short: what is queued then, one thread scanned (8 jobs of 8192
                # pages of an idle guest: 50-107 ms, loaded host).
                room = self._room.acquire(blocking=False)
                if self.zero_detect and self.scan_ahead and (
                        not room or self._unscanned() >= 2):  # fmt: skip
                    self._put((b.block, job, zero_mask(words, job), True), room)
                elif self.zero_detect and self.scan_ahead:
                    scan = _Scan()
                    self._queued_scans.append((b.block, job, scan))
                    self._put((b.block, job, scan), room)
                else:
                    self._put((b.block, job), room)
            pages += len(idx)
        return pages

    def _unscanned(self) -> int:
        """Queued jobs that no thread has scanned yet."""
        return sum(not scan.done for _block, _idx, scan in self._queued_scans)

    def _scan_one_queued(self) -> bool:
        """Scan the newest queued job no channel thread has come to; False if there is none.

        The migration thread does this instead of waiting for room in the queues or for a
        sync, newest first, while the channel threads take jobs oldest first: whoever is free
        scans. Jobs queued while there was room are left for their channel thread to scan,
        so a pass could end with several queued that nobody had scanned, and the migration
        thread waited at the sync while one channel thread scanned them alone (an idle guest,
        1 GiB, 4 channels: 50-107 ms of a pass of ~300, 8 jobs of 8192 pages queued, half of
        them not scanned). A job whose scan a channel thread has begun is left to it."""
        scans = self._queued_scans
        while scans:
            block, idx, scan = scans.pop()
            if scan.try_run(self.words[block.idstr], idx):
                return True
            # scanned, or a channel thread is scanning it
        return False

    def sync(self) -> None:
        """Every channel sends a SYNC packet after its queued pages; wait until all did."""
        while self._scan_one_queued():
            self.check()
        for w in self.workers:
            self.check()
            deadline = time.monotonic() + self.timeout
            while True:
                try:
                    w.queue.put(_SYNC, timeout=0.1)
                    break
                except queue.Full:
                    self.check()
                    if time.monotonic() > deadline:
                        raise MigrationError(f"multifd channel {w.channels[0].id}: sync not "
                                             f"queued within {self.timeout:g} s") from None  # fmt: skip
        for c in self.channels:
            if not c.synced.acquire(timeout=self.timeout):
                raise MigrationError(f"multifd channel {c.id}: SYNC not sent within "
                                     f"{self.timeout:g} s")  # fmt: skip
            self.check()

    def shutdown(self) -> None:
        """Wake every blocked channel (cancel); safe from any thread."""
        for c in self.channels:
            c.channel.shutdown()

    def close(self, graceful: bool = True) -> None:
        """Stop the threads; with ``graceful`` the peer sees a clean end of each channel."""
        for w in self.workers:
            try:
                w.queue.put(_STOP, timeout=1 if graceful and self.error is None else 0.01)
            except queue.Full:
                for c in w.channels:
                    c.channel.shutdown()
        for w in self.workers:
            w.thread.join(self.timeout if graceful else 1)
            if w.thread.is_alive():
                for c in w.channels:
                    c.channel.shutdown()
                w.thread.join(1)
        for c in self.channels:
            if graceful and self.error is None:
                c.channel.close_write()
            c.channel.close()


# -- destination ------------------------------------------------------------------------------


def _peek(ch: Channel, sock: socket.socket, n: int, timeout: float) -> bytes:
    """The first ``n`` bytes of a new channel on plain socket ``sock``, left in place for the
    real reader."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ChannelTimeout(f"{ch.name}: nothing received within {timeout:g} s")
        p = select.poll()
        p.register(sock.fileno(), select.POLLIN)
        if not p.poll(int(min(left, 0.2) * 1000)):
            continue
        try:
            data = sock.recv(n, socket.MSG_PEEK)
        except BlockingIOError:
            continue
        except OSError as exc:
            raise ChannelError(f"{ch.name}: read failed: {exc.strerror or exc}") from exc
        if len(data) >= n or not data:
            return data
        time.sleep(0.001)


def accept_channels(
    accept: Callable[[float], Channel],
    nchannels: int,
    uuid: bytes,
    timeout: float,
    cancelled: Callable[[], bool] = lambda: False,
) -> tuple[Channel, list[Channel]]:
    """Accept the main channel and ``nchannels`` multifd channels, checking each handshake.

    ``accept(timeout)`` returns the next connection or raises ``ChannelTimeout``. Returns
    (main, multifd channels by id). Any refused channel raises ``StreamError``.
    """
    main: Channel | None = None
    chans: dict[int, Channel] = {}
    pending: list[Channel] = []
    # TLS channels cannot be peeked at (the bytes under them are records): as in QEMU, the
    # first connection is main and the others are multifd, whose initial packets are read
    # once all have arrived. A source may send them only then (livemig's did): reading one
    # before the next connection's handshake deadlocked both sides.
    unpeeked: list[Channel] = []
    deadline: float | None = None

    def register(ch: Channel) -> None:
        try:
            raw = ch.recv_exact(INIT_PACKET.size)
        except ChannelError as exc:
            raise StreamError(f"multifd channel handshake: {exc}") from exc
        init = MultifdInit.unpack(raw)
        if init.uuid != uuid:
            raise StreamError(f"multifd channel: received uuid '{_fmt_uuid(init.uuid)}', "
                              f"expected uuid '{_fmt_uuid(uuid)}'")  # fmt: skip
        if init.channel_id >= nchannels:
            raise StreamError(f"multifd channel id {init.channel_id} out of range "
                              f"(multifd-channels is {nchannels})")  # fmt: skip
        if init.channel_id in chans:
            raise StreamError(f"multifd channel id {init.channel_id} arrived twice")
        ch.name = f"multifd {init.channel_id}"
        chans[init.channel_id] = ch

    try:
        while main is None or len(chans) + len(unpeeked) < nchannels:
            if cancelled():
                raise ChannelError("incoming migration cancelled while channels were arriving")
            try:
                ch = accept(0.2)
            except ChannelTimeout:
                if deadline is not None and time.monotonic() > deadline:
                    raise MigrationError(
                        f"multifd: {len(chans) + len(unpeeked)} of {nchannels} channels arrived"
                        + ("" if main else " and no main channel")
                        + f" within {timeout:g} s"
                    ) from None
                continue
            pending.append(ch)
            if deadline is None:
                deadline = time.monotonic() + timeout
            sock: socket.socket | None = getattr(ch, "_sock", None)
            if sock is None:  # TLS
                if main is None:
                    main = ch
                else:
                    unpeeked.append(ch)
                continue
            head = _peek(ch, sock, 4, timeout)
            magic = int.from_bytes(head, "big") if len(head) == 4 else None
            if magic == QEVM_MAGIC or (magic != MULTIFD_MAGIC and main is None):
                # 8.1+: the stream magic says main; 7.2 order: the first connection is main
                if main is not None:
                    raise StreamError(f"{ch.name}: a second main channel")
                main = ch
                continue
            register(ch)
        for ch in unpeeked:
            register(ch)
    except BaseException:
        for ch in pending:
            ch.close()
        raise
    return main, [chans[i] for i in range(nchannels)]


_FIXED_FIELDS = struct.Struct(PACKET_HEADER.format[:9])  # the header up to the name's padding
assert _FIXED_FIELDS.size == 36


@functools.cache
def _run_terms(n: int) -> tuple[int, int]:
    """(R, S) for ``n`` offsets: R has a 1 in each 64-bit field, S each field's page offset."""
    steps = np.arange(n, dtype=np.uint64) * np.uint64(PAGE_SIZE)
    big = (np.ones(n, ">u8").tobytes(), steps.astype(">u8").tobytes())
    return int.from_bytes(big[0], "big"), int.from_bytes(big[1], "big")


def _run_sum(first: int, n: int) -> int:
    """``n`` big-endian 64-bit fields ``first, first + PAGE_SIZE, ...`` as one integer."""
    r, s = _run_terms(n)
    return first * r + s


def _fmt_uuid(u: bytes) -> str:
    h = u.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class _RecvChannel:
    """One multifd connection on the destination: its packet reader and checks. A
    ``_RecvWorker`` thread reads it (one worker may serve several connections)."""

    def __init__(self, receiver: MultifdReceiver, cid: int, channel: Channel) -> None:
        self.r = receiver
        self.id = cid
        self.channel = channel
        self.release = threading.Semaphore(0)
        self.decompressor = _Decompressor(receiver.compression)
        # x-checksums: the pages since the last trailer packet, checked when it comes
        self.checks = receiver.checks.fork() if receiver.checks is not None else None
        self.unchecked = 0  # records not covered by a trailer when the last SYNC came
        self._name = ""
        self.head = bytearray(PACKET_HEADER.size + 8 * PAGES_ALLOC)
        # The next packet's header, as far as it came in the same readv as this packet's
        # pages (``_fill``): ``packet()`` starts from it.
        self._next = bytearray(len(self.head))
        self._next_n = 0
        self._alloc = 0  # page slots per packet, once the first packet told
        self.normal = 0  # pages placed (this thread's counts; the receiver sums them)
        self.zero = 0
        self.payload = bytearray(2 * PAGES_ALLOC * PAGE_SIZE + 4096)
        self.packets = 0
        # Packet numbers: the source numbers all channels' packets from one counter, so at a
        # sync point the numbers seen on all channels together are 0..top, each once. QEMU 7.2
        # has one exception: when a SYNC catches a channel that has not sent its pages yet,
        # the SYNC's number replaces theirs (one number skipped, ``rides``), and the channel
        # then sends an empty packet repeating it (counted once).
        self.numbers = 0
        self.rides = 0
        self.top = -1
        self._last_num = -1
        # The last data packet's RAMBlock, for _run_of_pages: its name field as sent, and where
        # its pages go. Empty until a packet went through the full checks.
        self._raw_name = b""
        self._block: tuple[int, memoryview, np.ndarray, np.ndarray] | None = None

    def _read(self, view: memoryview, what: str, eof_ok: bool = False) -> bool:
        got = 0
        while got < len(view):
            try:
                n = self.channel.recv_into(view[got:])
            except ChannelTimeout:
                # between packets a channel may idle as long as the migration does (a slow
                # pass, pause-before-switchover); the main channel watches the source's health
                if got == 0 and eof_ok and not self.r.closing and self.r.error is None:
                    continue
                raise
            if n == 0:
                if got == 0 and eof_ok:
                    return False
                raise StreamError(f"multifd channel {self.id}: stream ended inside {what} "
                                  f"(packet {self.packets})", self.channel.bytes_received)  # fmt: skip
            got += n
            if got < len(view):
                # The rest of this buffer is on its way: sleep until it is all there (at most
                # 1 ms) rather than read each piece as it lands. Reads a packet 4.1 -> 2.7,
                # empty reads and their polls ~0.9 -> 0 (receive benchmark, 512 KiB packets).
                self.channel.wait_buffered(len(view) - got, 0.001)
        return True

    def packet(self) -> bool | str:
        """Read and place one packet: True, False at the channel's end, or ``"sync"`` after
        a SYNC packet (the channel then waits for ``release`` before it is read again)."""
        r = self.r
        got = self._next_n
        at = self.channel.bytes_received - got
        if got:  # the last packet's read brought (part of) this header
            self.head, self._next = self._next, self.head
            self._next_n = 0
        hv = memoryview(self.head)
        # Every packet of a migration has the same size (QEMU reads a fixed packet_len): once
        # the first told it, header and offsets come in one read, and each packet must agree.
        hlen = PACKET_HEADER.size + 8 * self._alloc
        if got < hlen and not self._read(hv[got:hlen], "a packet header", eof_ok=not got):
            return False
        alloc = int.from_bytes(hv[12:16], "big")
        if self._alloc and alloc not in (self._alloc, 0):
            raise StreamError(f"multifd channel {self.id}: packet {self.packets} has room "
                              f"for {alloc} pages, the first had {self._alloc}", at + 12)  # fmt: skip
        if not self._alloc:
            # A QEMU 9.0+ SYNC packet has pages_alloc 0 but is as long as the others: QEMU's
            # receiver reads a fixed packet_len (MULTIFD_PACKET_SIZE / page size slots)
            slots = alloc or PAGES_ALLOC
            if slots <= 1 << 16:
                if PACKET_HEADER.size + 8 * slots > len(self.head):
                    self.head = bytearray(PACKET_HEADER.size + 8 * slots)
                    self._next = bytearray(len(self.head))
                    self.head[: PACKET_HEADER.size] = hv[: PACKET_HEADER.size]
                    hv = memoryview(self.head)
                self._read(hv[PACKET_HEADER.size : PACKET_HEADER.size + 8 * slots],
                           "page offsets")  # fmt: skip
                alloc = slots
        if self._block is not None and self._run_of_pages(hv):
            return True
        pkt = MultifdPacket.unpack(hv, at, r.block_sizes)  # checks magic, counts and offsets
        self._alloc = self._alloc or alloc
        self._numbered(pkt.packet_num, bool(pkt.flags & MULTIFD_FLAG_SYNC and pkt.normal_pages))
        where = f"multifd channel {self.id}, packet {pkt.packet_num}"
        # QEMU checks the compression bits only of packets that carry pages: 7.2 leaves them
        # out of page-less (SYNC) packets
        if pkt.normal_pages and pkt.flags & MULTIFD_FLAG_COMPRESSION_MASK != r.flag:
            raise StreamError(f"{where}: compression flags 0x{pkt.flags & 0x3E:x}, this side "
                              f"uses {r.compression!r} (0x{r.flag:x})", at + 8)  # fmt: skip
        self.packets += 1
        if pkt.flags & MULTIFD_FLAG_X_CHECKSUM:
            self._trailer(hv, pkt, where, at)
            return True
        normal = pkt.normal_pages
        idx = pkt.offsets >> np.uint64(PAGE_SHIFT)
        if normal:
            self._pages(pkt, idx[:normal], where, at)
        if pkt.zero_pages:
            r.loader.load_zero(pkt.ramblock, pkt.offsets[normal:])
            self.zero += pkt.zero_pages
            if r.compression == "none":
                self._remember(pkt.ramblock)
            if self._checking():
                self.checks.unit.add(pkt.ramblock, CK.KIND_ZERO, idx[normal:])  # type: ignore[union-attr]
        if pkt.flags & MULTIFD_FLAG_SYNC:
            if self.checks is not None:
                self.unchecked = self.checks.unit.records
            r._arrived.release()
            return "sync"
        return True

    def header_ready(self) -> bool:
        """The next packet's header was read whole with this packet's pages."""
        return self._next_n >= PACKET_HEADER.size + 8 * self._alloc

    def _checking(self) -> bool:
        """Whether pages are collected for a checksum: the stream announced x-checksums (or
        the main thread has not read its configuration yet)."""
        return self.checks is not None and self.r.checked is not False

    def _trailer(self, hv: memoryview, pkt: MultifdPacket, where: str, at: int) -> None:
        """x-checksums: check the job this trailer packet closes."""
        if not self._checking() or pkt.normal_pages or pkt.zero_pages:
            raise StreamError(f"{where}: a checksum packet where none can be", at + 8)
        records, digest = CHECKSUM_PACKET.unpack_from(hv)[8:10]
        alloc = self._alloc or PAGES_ALLOC
        bitmap = hv[PACKET_HEADER.size : PACKET_HEADER.size + 8 * alloc]
        self.checks.verify(records, digest, bitmap, None,
                           f", multifd channel {self.id} before packet {pkt.packet_num}")  # fmt: skip

    def _numbered(self, num: int, ride: bool = False) -> None:
        if ride:
            self.rides += 1
        if num != self._last_num:
            self._last_num = num
            self.numbers += 1
            self.top = max(self.top, num)

    def _run_of_pages(self, hv: memoryview) -> bool:
        """Place a packet of the commonest kinds, or return False to leave it to the full path:
        uncompressed pages, for the previous packet's RAMBlock.

        A pass over a busy guest sends almost only packets whose normal pages are one run; an
        idle guest's have a few data pages and many zero pages. The full path (a packet
        object, its offsets as a new array, range checks, a run split, a read per run, bitmap
        scatters) took 41-59 us of user CPU a packet, a third of the receiving thread's CPU,
        most of it cache misses after the previous packet's 512 KiB copy; with this one, 28-37
        us for a run. Its checks are as exact: offsets that step by one page from an aligned
        first one and end inside the block name exactly that run; otherwise every offset must
        be page-aligned and inside the block (one OR and one max over all of them).

        The run test reads the offsets as one big-endian integer, which equals
        ``first * R + S`` (``_run_sum``) exactly when each 64-bit field is ``first`` plus its
        page: the fields cannot carry into each other, as the run ends inside the block. A
        numpy difference over big-endian offsets was a sixth of the thread's time.
        """
        head = self.head
        magic, version, flags, alloc, normal, size, num, zero = _FIXED_FIELDS.unpack_from(head)
        r = self.r
        if not (magic == MULTIFD_MAGIC and version == MULTIFD_VERSION and flags == 0
                and r.flag == 0 and alloc == self._alloc and 0 < normal + zero <= alloc
                and size == normal * PAGE_SIZE and head.startswith(self._raw_name, 64)):  # fmt: skip
            return False
        bsize, view, touched, received = self._block  # type: ignore[misc]
        at = PACKET_HEADER.size
        first = int.from_bytes(head[at : at + 8], "big")
        end = first + size
        if (not zero and not first % PAGE_SIZE and end <= bsize
                and (normal == 1 or int.from_bytes(hv[at : at + 8 * normal], "big")
                     == _run_sum(first, normal))):  # fmt: skip
            self.packets += 1
            self._numbered(num)
            self._fill([view[first:end]], "page data")
            page = first >> PAGE_SHIFT
            touched[page : page + normal] = True
            received[page : page + normal] = True
            self.normal += normal
            if self._checking():
                unit = self.checks.unit  # type: ignore[union-attr]
                unit.add(self._name, CK.KIND_DATA, np.arange(page, page + normal))
                if self.checks.eager:  # type: ignore[union-attr]
                    unit.feed(self.checks.views)  # type: ignore[union-attr]  # just received
            return True
        offs = np.frombuffer(hv, ">u8", normal + zero, at)
        if int(np.bitwise_or.reduce(offs)) % PAGE_SIZE or int(offs.max()) + PAGE_SIZE > bsize:
            return False  # the full path names the fault
        self.packets += 1
        self._numbered(num)
        idx = (offs >> np.uint64(PAGE_SHIFT)).astype(np.intp)
        if normal:
            pages = idx[:normal]
            self._fill([view[i << PAGE_SHIFT : (i + n) << PAGE_SHIFT]
                        for i, n in page_runs(pages)], "page data")  # fmt: skip
            touched[pages] = True
            received[pages] = True
            if self._checking():
                self.checks.unit.add(self._name, CK.KIND_DATA, pages)  # type: ignore[union-attr]
                if self.checks.eager:  # type: ignore[union-attr]
                    self.checks.unit.feed(self.checks.views)  # type: ignore[union-attr]
        if zero:
            # Only a page written before is cleared: untouched RAM is zero already, and
            # writing it would allocate it (QEMU: ramblock_recv_bitmap, the same rule).
            zpages = idx[normal:]
            written = zpages[touched[zpages]]
            if len(written):
                r.loader.load_zero(self._name, written.astype(np.uint64) << np.uint64(PAGE_SHIFT))
            received[zpages] = True
            if self._checking():
                self.checks.unit.add(self._name, CK.KIND_ZERO, zpages)  # type: ignore[union-attr]
        self.normal += normal
        self.zero += zero
        return True

    def _fill(self, views: list[memoryview], what: str) -> None:
        """Fill ``views`` in order from the channel, with as few reads as it allows, and read
        the next packet's header, as much of it as has arrived, in the last ``readv`` too
        (into ``_next``, never into guest RAM: ``packet()`` checks it as any other).

        A packet cost two reads, its header's and its pages'; with the header riding on the
        previous packet's pages, one (the receiver is usually behind, so it is there)."""
        nxt = memoryview(self._next)[: PACKET_HEADER.size + 8 * self._alloc]
        i = 0
        while True:
            last = i + IOV_MAX - 1 >= len(views)
            n = self.channel.recv_into_many([*views[i:], nxt] if last
                                            else views[i : i + IOV_MAX - 1])  # fmt: skip
            if n == 0:
                raise StreamError(f"multifd channel {self.id}: stream ended inside {what} "
                                  f"(packet {self.packets})", self.channel.bytes_received)  # fmt: skip
            while n and i < len(views):
                k = len(views[i])
                if n >= k:
                    n -= k
                    i += 1
                else:
                    views[i] = views[i][n:]
                    n = 0
            if i == len(views):
                self._next_n = n  # what came of the next header
                return
            # the rest is on its way: sleep until it is all there (at most 1 ms), as _read
            self.channel.wait_buffered(sum(len(v) for v in views[i:]), 0.001)

    def _remember(self, name: str) -> None:
        """The block of a packet that passed the full checks: ``_run_of_pages`` takes the
        next packets for it (the header's name field as sent, where its pages go)."""
        r = self.r
        self._name = name
        self._raw_name = bytes(memoryview(self.head)[64:320])
        self._block = (r.block_sizes[name], r.views[name], r.loader.touched[name],
                       r.loader.received[name])  # fmt: skip

    def _pages(self, pkt: MultifdPacket, idx: np.ndarray, where: str, at: int) -> None:
        r = self.r
        name = pkt.ramblock
        nbytes = pkt.normal_pages * PAGE_SIZE
        if r.compression == "none":
            if pkt.next_packet_size not in (nbytes, 0):
                raise StreamError(f"{where}: payload {pkt.next_packet_size} bytes for "
                                  f"{pkt.normal_pages} pages", at + 20)  # fmt: skip
            view = r.views[name]
            # straight into guest RAM: the header (checked) says where every page goes
            for i, n in page_runs(idx):
                self._read(view[i << PAGE_SHIFT : (i + n) << PAGE_SHIFT], "page data")
            r.loader.touched[name][idx] = True
            r.loader.received[name][idx] = True
            self._remember(name)
        else:
            size = pkt.next_packet_size
            if size > len(self.payload):
                if size > 4 * nbytes + 65536:
                    raise StreamError(f"{where}: compressed payload of {size} bytes for "
                                      f"{pkt.normal_pages} pages", at + 20)  # fmt: skip
                self.payload = bytearray(size)
            pv = memoryview(self.payload)[:size]
            self._read(pv, "compressed data")
            data = self.decompressor.decompress(pv, nbytes, where)
            pages = np.frombuffer(data, np.uint8).reshape(-1, PAGE_SIZE)
            r.loader.load_pages(name, pkt.offsets[: pkt.normal_pages], pages)
        self.normal += pkt.normal_pages
        if self._checking():
            self.checks.unit.add(name, CK.KIND_DATA, idx)  # type: ignore[union-attr]
            if self.checks.eager:  # type: ignore[union-attr]
                self.checks.unit.feed(self.checks.views)  # type: ignore[union-attr]


class _RecvWorker:
    """A thread that reads one or more multifd connections (``x-multifd-threads``, as on the
    source): it waits for whichever of its connections has data (``poll``), reads one packet
    there, and goes on; a connection that reached its SYNC is left alone until the main
    thread releases it. A TLS connection gets a worker of its own: bytes TLS has already
    decrypted do not show in ``poll``."""

    def __init__(self, receiver: MultifdReceiver, channels: list[_RecvChannel]) -> None:
        self.r = receiver
        self.channels = channels
        name = f"mig/dst/recv_{channels[0].id}"
        self.thread = threads.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        r = self.r
        c = self.channels[0]
        try:
            if len(self.channels) == 1:
                self._one(c)
            else:
                self._many()
        except (ChannelError, OSError, StreamError) as exc:
            if not r.closing:
                r._failed(f"multifd channel {c.id}: {exc}")
        except BaseException as exc:
            log.exception("multifd receive channel %d crashed", c.id)
            r._failed(f"multifd channel {c.id}: internal error: {exc!r}")

    def _released(self, c: _RecvChannel) -> bool:
        while not c.release.acquire(timeout=0.2):
            if self.r.closing or self.r.error is not None:
                return False
        return True

    def _one(self, c: _RecvChannel) -> None:
        while True:
            got = c.packet()
            if got is False or (got == "sync" and not self._released(c)):
                return

    def _many(self) -> None:
        r = self.r
        active = {c.channel.read_fd: c for c in self.channels}
        waiting: list[_RecvChannel] = []
        poller = select.poll()
        for fd in active:
            poller.register(fd, select.POLLIN)
        # connections whose next header is already read (``_RecvChannel._fill``): poll may
        # not show them, a SYNC packet's header can be all that was left on the socket
        held: set[int] = set()
        while active or waiting:
            if not active:  # every connection of this worker is at its SYNC
                for c in waiting:
                    if not self._released(c):
                        return
                    active[c.channel.read_fd] = c
                    poller.register(c.channel.read_fd, select.POLLIN)
                waiting = []
                continue
            ready = [fd for fd, _events in poller.poll(0 if held else 200)]
            if r.error is not None:
                return
            for fd in held.difference(ready):
                ready.append(fd)
            held.clear()
            for fd in ready:
                c = active.get(fd)
                if c is None:
                    continue
                got = c.packet()
                if got is not True:
                    poller.unregister(fd)
                    del active[fd]
                    if got == "sync":
                        waiting.append(c)
                elif c.header_ready():
                    held.add(fd)


class MultifdReceiver:
    """The destination's multifd channels: place pages, stop at SYNC until ``flush()``."""

    def __init__(
        self,
        loader: Any,
        channels: list[Channel],
        *,
        compression: str = "none",
        timeout: float = 30.0,
        on_error: Callable[[str], None] | None = None,
        checks: CK.IncomingChecks | None = None,
        threads: int = 0,
    ) -> None:
        self.loader = loader
        self.checks = checks
        self.checked: bool | None = None  # the stream announced x-checksums (the main thread)
        self.block_sizes = loader.block_sizes()
        self.views = {name: b.view for name, b in loader.blocks.items()}
        self.compression = compression
        self.flag = COMPRESSION_FLAGS[compression]
        self.timeout = timeout
        self.on_error = on_error or (lambda reason: None)
        self.error: str | None = None
        self.closing = False
        self._lock = threading.Lock()
        self._arrived = threading.Semaphore(0)
        self.channels = [_RecvChannel(self, i, ch) for i, ch in enumerate(channels)]
        from livemig.transport.tls import TLSChannel

        plain = [c for c in self.channels if not isinstance(c.channel, TLSChannel)]
        k = (min(len(plain), threads or default_threads(len(self.channels), compression))
             if plain else 0)  # fmt: skip
        self.workers = [_RecvWorker(self, plain[w::k]) for w in range(k)]
        self.workers += [_RecvWorker(self, [c]) for c in self.channels if c not in plain]
        for w in self.workers:
            w.thread.start()

    @property
    def normal_pages(self) -> int:
        return sum(c.normal for c in self.channels)

    @property
    def zero_pages(self) -> int:
        return sum(c.zero for c in self.channels)

    def _failed(self, reason: str) -> None:
        with self._lock:
            first = self.error is None
            if first:
                self.error = reason
        if first:
            log.warning("%s", reason)
            for _ in self.channels:
                self._arrived.release()
            self.on_error(reason)

    def check(self) -> None:
        if self.error is not None:
            raise MigrationError(self.error)

    def flush(self) -> None:
        """At a MULTIFD_FLUSH: wait until every channel stopped at its SYNC, then release all."""
        self.wait_synced()
        self.release()

    def wait_synced(self) -> None:
        """Wait until every channel stopped at its SYNC: all pages sent before it are placed,
        and none after it will be until ``release()``."""
        for _ in self.channels:
            if not self._arrived.acquire(timeout=self.timeout):
                raise MigrationError(f"multifd: channels did not reach their SYNC within "
                                     f"{self.timeout:g} s")  # fmt: skip
            self.check()
        if self.checked:
            for c in self.channels:
                if c.unchecked:
                    reason = (f"multifd channel {c.id}: {c.unchecked} page record(s) before its "
                              "SYNC came without their checksum packet")  # fmt: skip
                    self._failed(reason)
                    raise MigrationError(reason)
        seen = sum(c.numbers for c in self.channels)
        top = max(c.top for c in self.channels)
        if seen != top + 1 - sum(c.rides for c in self.channels):
            # Pages are missing (or came twice) and would be silently wrong: most often the
            # source has more channels than this side accepted, whose packets nobody reads.
            reason = (f"multifd: at a sync point {len(self.channels)} channels brought {seen} "
                      f"distinct packet numbers, the source used 0..{top}: does the source "
                      f"have a different multifd-channels ({len(self.channels)} here)?")  # fmt: skip
            self._failed(reason)
            raise MigrationError(reason)

    def release(self) -> None:
        """Let the channels stopped at their SYNC go on."""
        for c in self.channels:
            c.release.release()

    def close(self, graceful: bool = True) -> None:
        """Stop the threads: after a completed migration wait (briefly) for the source to close
        the channels; otherwise shut them down at once."""
        self.closing = True
        if not graceful or self.error is not None:
            for c in self.channels:
                c.channel.shutdown()
        for w in self.workers:
            w.thread.join(2)
            if w.thread.is_alive():
                for c in w.channels:
                    c.channel.shutdown()
                w.thread.join(2)
        for c in self.channels:
            c.channel.close()


# -- hooks called by source.py / destination.py -------------------------------------------------


def check_uri(u: Any, capabilities: Any) -> None:
    """Refuse capability multifd on a URI that carries one connection (``exec:``, ``fd:``):
    its N extra channels would go to N more commands, or nowhere. Raised by ``migrate`` and
    ``migrate-incoming`` before anything starts (QEMU: "multifd is not supported by current
    protocol"). ``file:`` takes multifd only as mapped-ram's parallel writers."""
    if "multifd" not in capabilities or u.scheme in ("tcp", "unix"):
        return
    if u.scheme == "file" and "mapped-ram" in capabilities:
        return
    need = "tcp: or unix:, or file: with capability mapped-ram"
    raise UsageError(f"multifd is not supported by current protocol: {u} carries one "
                     f"connection; multifd needs {need}")  # fmt: skip


def source_setup(mig: Any) -> None:
    """After the main channel's setup: open the multifd channels if capability ``multifd``."""
    cfg = mig.config
    if "multifd" not in cfg.capabilities or "mapped-ram" in cfg.capabilities:
        return  # mapped-ram: the channels are file writers (mapped_ram.source_setup)
    p = cfg.params
    method = p["multifd-compression"]
    level = p["multifd-zstd-level"] if method == "zstd" else p["multifd-zlib-level"]
    detection = p["zero-page-detection"]
    mig.multifd = MultifdSender.connect(
        cfg.uri, mig.machine.ram_blocks, p["multifd-channels"], compression=method, level=level,
        uuid=machine_uuid(mig.machine), timeout=p["x-io-timeout"] / 1000,
        zero_detect=detection == "multifd", checks=mig.checks, threads=p["x-multifd-threads"],
    )  # fmt: skip
    if detection != "legacy":
        # the channel threads find the zero pages ("multifd"), or nobody does ("none")
        mig.ram.find_zero = False


def source_queue(mig: Any, batches: list, unit: Any = None) -> tuple[list, int, int]:
    """Normal pages go to the channels (their stats come via ``account``); zero pages found by
    the migration thread (``zero-page-detection`` legacy) go as ZERO records on main.

    ``max-bandwidth`` is charged here for the channels' pages, when they are queued, not when a
    channel thread has sent them: charged late, the migration thread would keep queueing for a
    whole PART and overrun the limit. A page costs its bytes plus its share of a packet header
    (one the channel finds zero costs less than charged). ZERO records on main are charged
    when sent, like everything on main.
    """
    normal = sum(len(b.normal) for b in batches)
    zero = sum(len(b.zero) for b in batches)
    mig.rate.account(normal * (PAGE_SIZE + 16))
    if not zero:
        mig.multifd.send_batches(batches)
        return [], 0, 0
    out: list = []
    for b in batches:
        if len(b.zero):
            out += mig.encoder.encode_zero_pages(b.idstr, b.zero.astype(np.uint64) << PAGE_SHIFT)
            if unit is not None:
                unit.add(b.idstr, CK.KIND_ZERO, b.zero)
    mig.multifd.send_batches([Batch(b.block, b.normal, b.zero[:0]) for b in batches
                              if len(b.normal)])  # fmt: skip
    return out, 0, zero


def source_account(mig: Any, phase: str) -> int:
    """Fold what the channels sent since the last call into the migration's counters."""
    nbytes, normal, zero = mig.multifd.take_stats()
    if nbytes or normal or zero:
        mig.stats.account(nbytes, normal, zero, phase)
        mig.stats.multifd_bytes = getattr(mig.stats, "multifd_bytes", 0) + nbytes
    return nbytes


def source_flush(mig: Any, phase: str, in_section: bool = False) -> None:
    """Pass boundary: SYNC on every channel, then MULTIFD_FLUSH on main (in a RAM section)."""
    from livemig.wire import events as E

    mig.multifd.sync()
    if not getattr(mig.multifd, "stream_flush", True):
        # mapped-ram: the file needs no MULTIFD_FLUSH; the final sync writes the bitmaps
        if in_section:
            mig.multifd.write_bitmaps()
        return
    enc = mig.encoder
    if in_section:
        mig._send(enc.send(E.RamMultifdFlush()), phase)
    else:
        mig._send([*enc.send(E.SectionPart(mig._ram_sid)), *enc.send(E.RamMultifdFlush()),
                   *enc.send(E.RamEos()), *enc.send(E.SectionFooter(mig._ram_sid))],
                  phase)  # fmt: skip


def source_close(mig: Any, completed: bool) -> None:
    mf = mig.multifd
    if mf is not None:
        mf.close(graceful=completed)


def incoming_accept(mig: Any) -> Channel:
    """Accept main + multifd channels (destination hook); starts the receiver threads."""
    p = mig.params
    if "mapped-ram" in mig.capabilities:
        return mig._accept()  # one file; its pages are read in place (mapped_ram.incoming_load)
    main, chans = accept_channels(
        lambda t: mig.listener.accept(timeout=t), p["multifd-channels"],
        machine_uuid(mig.machine), mig.timeout, mig._cancel.is_set,
    )  # fmt: skip
    mig.channel = main

    def on_error(reason: str) -> None:
        # The reason first, while main can still carry it (XError and SHUT 1 to a livemig
        # source); then wake the main thread: the migration fails with ``reason``.
        mig._shut(1, reason)
        main.shutdown()

    mig.multifd = MultifdReceiver(mig.loader, chans, compression=p["multifd-compression"],
                                  timeout=mig.timeout, on_error=on_error, checks=mig.checks,
                                  threads=p["x-multifd-threads"])  # fmt: skip
    return main


def incoming_flush(mig: Any, offset: int) -> None:
    mf = getattr(mig, "multifd", None)
    if mf is None and "mapped-ram" in mig.capabilities:
        return  # a mapped-ram file's pages are all in place already
    if mf is None:
        raise StreamError("MULTIFD_FLUSH but capability multifd is off on the destination", offset)
    mf.flush()


def incoming_error(mig: Any) -> str | None:
    mf = getattr(mig, "multifd", None)
    return mf.error if mf is not None else None


def incoming_close(mig: Any) -> None:
    from livemig.migration.state import MigrationStatus

    mf = getattr(mig, "multifd", None)
    if mf is not None:
        mf.close(graceful=mig.state.status == MigrationStatus.COMPLETED)


def source_query(mig: Any, out: dict[str, Any]) -> None:
    """Add multifd-bytes and the xbzrle-cache statistics to a query-migrate reply."""
    ram = out.get("ram")
    if ram is not None and mig.multifd is not None:
        ram["multifd-bytes"] = getattr(mig.stats, "multifd_bytes", 0)
    cache = getattr(mig, "xbzrle", None)
    if cache is not None:
        out["xbzrle-cache"] = cache.info()
