"""Mapped-ram: ``file:`` migrations where every guest page has a fixed place in the file.

Theory of operation (QEMU 9.0+: ``mapped_ram_setup_ramblock``, ``ram_save_file_bmap``,
``read_ramblock_mapped_ram``; reference §4.8):

* **Layout.** The ``ram`` START section lists the blocks as usual, but each entry (idstr,
  length) is followed by a 28-byte header ``be32 version (1), be64 page_size, be64
  bitmap_offset, be64 pages_offset`` (absolute file offsets). ``bitmap_offset`` is right after
  the header; ``pages_offset`` is the next 1 MiB boundary after the bitmap (one bit per page,
  rounded up to 64-bit longs as QEMU's ``BITS_TO_LONGS``). The stream then continues at
  ``pages_offset + length``: the next block's entry, EOS, the PART sections (empty: only EOS),
  the device state, EOF. The configuration section announces ``mapped-ram`` in its
  ``capabilities`` subsection so that a reader (``livemig analyze``, QEMU's
  analyze-migration.py) knows the block entries carry the header.
* **Saving.** Page ``i`` of a block is always written at ``pages_offset + i * 4096``, however
  many passes rewrite it, so the file never grows past RAM + metadata. The writer threads
  (``multifd-channels`` of them with capability multifd, else one) take page batches from the
  migration thread, sort out zero pages (not written: their bitmap bit is cleared) and write
  runs of consecutive pages with one ``os.pwritev`` whose buffers are memoryview slices of the
  RAM mmap. At a pass boundary ``sync`` waits until every queued batch is on the file, so an
  older copy of a page can never overwrite a newer one; the final sync writes the bitmaps.
* **Restoring.** When the destination's decoder yields the block list, the bitmaps are read and
  every page whose bit is set is read with ``os.preadv`` straight into its RAM slot (runs of
  pages in one call, several threads); pages not marked stay zero (fresh RAM is zero).

* **Checksums** (``x-checksums``): a block's region also holds one little-endian u64 per page
  right after its bitmap: XXH3-64 of the page as last written, 0 for a page not written. The
  writers hash each page right after its ``pwritev`` (in cache); a page the guest changed
  meanwhile is dirty and written (and hashed) again, so the last hash of every page matches
  the file. Header, bitmap and digests of every block are sealed by the stream's ``x-checksum``
  after the END section; the reader checks every page it reads, and that a page not marked
  has digest 0. QEMU's readers skip the digests: they follow the header's offsets.

Limits: ``file:PATH,offset=N`` with N > 0 is refused (the decoder counts offsets from the stream
start); the reader still reads the page regions through the stream to skip them.
"""

from __future__ import annotations

import logging
import os
import queue
import struct
import threading
from typing import Any

import numpy as np
import xxhash

from livemig import threads
from livemig.errors import MigrationError, StreamError
from livemig.machine.abi import PAGE_SIZE
from livemig.migration.multifd import PageWorkerPool
from livemig.savevm.ram import page_runs, split_zero

log = logging.getLogger(__name__)

MAPPED_RAM_HDR_VERSION = 1
MAPPED_RAM_HEADER = struct.Struct(">IQQQ")  # QEMU's MappedRamHeader, QEMU_PACKED
FILE_OFFSET_ALIGNMENT = 0x100000  # MAPPED_RAM_FILE_OFFSET_ALIGNMENT
RAM_SAVE_FLAG_MEM_SIZE = 0x04
PAGE_SHIFT = 12
WORDS_PER_PAGE = PAGE_SIZE // 8
QUEUE_DEPTH = 4
MAX_IOV = 1024  # IOV_MAX: buffers per pwritev/preadv
_STOP = object()
_SYNC = object()


def bitmap_size(npages: int) -> int:
    """Bytes of a block's page bitmap on file (whole 64-bit longs, as QEMU)."""
    return (npages + 63) // 64 * 8


def _pwritev_all(fd: int, bufs: list[memoryview], offset: int) -> int:
    """``pwritev`` until every buffer is written (a short write continues where it stopped)."""
    total = sum(len(b) for b in bufs)
    done = 0
    while bufs:
        n = os.pwritev(fd, bufs[:MAX_IOV], offset + done)
        if n <= 0:
            raise OSError(f"pwritev wrote {n} bytes at offset {offset + done}")
        done += n
        while bufs and n >= len(bufs[0]):
            n -= len(bufs[0])
            bufs = bufs[1:]
        if n:
            bufs[0] = bufs[0][n:]
    return total


def _preadv_all(fd: int, view: memoryview, offset: int, where: str) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise StreamError(f"{where}: file ends inside the page region "
                              f"(wanted {len(view) - got} more bytes)", offset + got)  # fmt: skip
        got += n


class BlockLayout:
    """Where one RAMBlock's bitmap (and, checked, page digests) and pages live in the file."""

    def __init__(self, block: Any, header_at: int, checked: bool = False) -> None:
        self.block = block
        self.idstr: str = block.idstr
        self.npages: int = block.npages
        self.bitmap_offset = header_at + MAPPED_RAM_HEADER.size
        self.digest_offset = self.bitmap_offset + bitmap_size(self.npages)
        meta_end = self.digest_offset + (8 * self.npages if checked else 0)
        self.pages_offset = -(-meta_end // FILE_OFFSET_ALIGNMENT) * FILE_OFFSET_ALIGNMENT
        self.end = self.pages_offset + block.size
        self.written = np.zeros(self.npages, dtype=bool)  # the file bitmap
        # x-checksums: XXH3-64 of each page as last written (0: not written)
        self.digests = np.zeros(self.npages, np.uint64) if checked else None

    def header(self) -> bytes:
        return MAPPED_RAM_HEADER.pack(MAPPED_RAM_HDR_VERSION, PAGE_SIZE, self.bitmap_offset,
                                      self.pages_offset)  # fmt: skip

    def bitmap(self) -> bytes:
        bits = np.packbits(self.written, bitorder="little").tobytes()
        return bits + bytes(bitmap_size(self.npages) - len(bits))

    def digest_bytes(self) -> bytes:
        assert self.digests is not None
        return self.digests.astype("<u8").tobytes()


def seal(idstr: str, header: bytes, bitmap: bytes, digests: bytes) -> bytes:
    """What the stream's checksum covers of a block's region: the XXH3-64 of its header,
    bitmap and page digests, as a pseudo device section (``Unit.add_device``)."""
    h = xxhash.xxh3_64(header)
    h.update(bitmap)
    h.update(digests)
    return h.intdigest().to_bytes(8, "little")


# -- source ---------------------------------------------------------------------------------


class _Writer:
    """One writer thread (a multifd channel's role for a file)."""

    def __init__(self, sender: MappedRamSender, wid: int) -> None:
        self.sender = sender
        self.id = wid
        self.queue: queue.Queue[Any] = queue.Queue(QUEUE_DEPTH)
        self.synced = threading.Semaphore(0)
        self.thread = threads.Thread(target=self._run, name=f"mapped-ram_{wid}", daemon=True)

    def _run(self) -> None:
        s = self.sender
        try:
            while True:
                job = self.queue.get()
                if job is _STOP:
                    return
                if job is _SYNC:
                    self.synced.release()
                    continue
                layout, idx = job
                s._write(layout, idx)
        except OSError as exc:
            s._failed(f"mapped-ram writer {self.id}: write to the file failed: "
                      f"{exc.strerror or exc}")  # fmt: skip
        except BaseException as exc:  # a bug: report it instead of hanging the sync
            log.exception("mapped-ram writer %d crashed", self.id)
            s._failed(f"mapped-ram writer {self.id}: internal error: {exc!r}")


class MappedRamSender(PageWorkerPool):
    """Writes page batches at their fixed file offsets; the migration thread's ``multifd``.

    It offers the calls ``source.py`` makes on a ``MultifdSender`` (``send_batches``, ``sync``,
    ``take_stats``, ``check``, ``shutdown``, ``close``), so the pre-copy loop runs unchanged.
    """

    stream_flush = False  # no MULTIFD_FLUSH words in a mapped-ram stream (QEMU 9.0)

    def __init__(self, fd: int, layouts: list[BlockLayout], nthreads: int,
                 timeout: float = 30.0, zero_detect: bool = True) -> None:  # fmt: skip
        self.fd = fd
        self.zero_detect = zero_detect  # False: zero pages are written like any other
        self.layouts = {lay.idstr: lay for lay in layouts}
        self.words = {lay.idstr: lay.block.array.view(np.uint64).reshape(-1, WORDS_PER_PAGE)
                      for lay in layouts}  # fmt: skip
        super().__init__(timeout)
        self._next = 0
        self.writers = [_Writer(self, i) for i in range(max(1, nthreads))]
        for w in self.writers:
            w.thread.start()

    def _write(self, layout: BlockLayout, idx: np.ndarray) -> None:
        if self.zero_detect:
            normal, zero = split_zero(self.words[layout.idstr], idx)
        else:
            normal, zero = idx, idx[:0]
        # Each page index belongs to one batch per pass and passes are separated by sync(),
        # so two threads never update the same bitmap entries at once.
        layout.written[zero] = False
        nbytes = 0
        if len(normal):
            view = layout.block.view
            for first, count in page_runs(normal):
                buf = view[first << PAGE_SHIFT : (first + count) << PAGE_SHIFT]
                nbytes += _pwritev_all(self.fd, [buf], layout.pages_offset + (first << PAGE_SHIFT))
            layout.written[normal] = True
        if layout.digests is not None:
            # after the write, while the pages are in cache; a page the guest changed since the
            # write is dirty and comes again (see the module docstring)
            layout.digests[zero] = 0
            if len(normal):
                layout.digests[normal] = page_digests(layout.block.view, normal)
        self._count(nbytes, len(normal), len(zero))

    def _failed(self, reason: str) -> None:
        self._latch(reason)
        for w in self.writers:
            w.synced.release()

    def _put(self, w: _Writer, job: Any) -> None:
        self._put_wait(w.queue, job, f"mapped-ram writer {w.id}")

    def send_batches(self, batches: list) -> int:
        pages = 0
        n = len(self.writers)
        for b in batches:
            idx = np.concatenate((b.normal, b.zero)) if len(b.zero) else b.normal
            if len(b.zero) and len(b.normal):
                idx.sort()
            w = self.writers[self._next]
            self._next = (self._next + 1) % n
            self._put(w, (self.layouts[b.block.idstr], idx))
            pages += len(idx)
        return pages

    def sync(self) -> None:
        """Wait until every batch queued so far is in the file."""
        for w in self.writers:
            self._put(w, _SYNC)
        for w in self.writers:
            if not w.synced.acquire(timeout=self.timeout):
                raise MigrationError(f"mapped-ram writer {w.id}: pages not written within "
                                     f"{self.timeout:g} s")  # fmt: skip
            self.check()

    def write_bitmaps(self) -> None:
        """The final sync's step: every block's bitmap of written pages (and its page digests)
        at its offset; with checksums, ``seals`` has what the stream's checksum covers."""
        self.seals: list[tuple[str, bytes]] = []
        try:
            for lay in self.layouts.values():
                bitmap = lay.bitmap()
                os.pwrite(self.fd, bitmap, lay.bitmap_offset)
                if lay.digests is not None:
                    digests = lay.digest_bytes()
                    _pwritev_all(self.fd, [memoryview(digests)], lay.digest_offset)
                    self.seals.append((lay.idstr, seal(lay.idstr, lay.header(), bitmap, digests)))
        except OSError as exc:
            raise MigrationError(f"mapped-ram: writing the page bitmaps failed: "
                                 f"{exc.strerror or exc}") from exc  # fmt: skip

    def shutdown(self) -> None:
        """Cancel: a queued batch is still written, but every waiter wakes up."""
        self._failed(self.error or "mapped-ram: cancelled")

    def close(self, graceful: bool = True) -> None:
        for w in self.writers:
            try:
                w.queue.put(_STOP, timeout=self.timeout if graceful else 1.0)
            except queue.Full:
                log.warning("mapped-ram writer %d did not take its stop", w.id)
        for w in self.writers:
            w.thread.join(self.timeout if graceful else 2.0)


def page_digests(view: memoryview, idx: np.ndarray) -> np.ndarray:
    """XXH3-64 of each page ``idx`` of ``view`` (one call a page: 0.4 us)."""
    h = xxhash.xxh3_64_intdigest
    return np.fromiter((h(view[i << PAGE_SHIFT : (i + 1) << PAGE_SHIFT]) for i in idx.tolist()),
                       np.uint64, len(idx))  # fmt: skip


def _cstr(s: str) -> bytes:
    raw = s.encode()
    return bytes([len(raw)]) + raw


def source_setup(mig: Any) -> None:
    """Write the block list with mapped-ram headers and start the writers (``mig.multifd``).

    Called with the main channel positioned right after the ``ram`` START section header.
    """
    from livemig.transport.uri import parse_uri

    u = parse_uri(mig.config.uri)
    ch = mig.channel
    fd = ch.write_fd if u.scheme == "file" else None
    if fd is None:
        raise MigrationError(f"capability mapped-ram needs a file: migration URI, not {u}")
    if u.offset:
        raise MigrationError(f"mapped-ram: {u} starts at offset {u.offset}; livemig writes "
                             "mapped-ram files from offset 0 only")  # fmt: skip
    p = mig.config.params
    if "multifd" in mig.config.capabilities and p["multifd-compression"] != "none":
        raise MigrationError("mapped-ram cannot be used with multifd-compression "
                             f"{p['multifd-compression']!r} (pages need fixed sizes)")  # fmt: skip
    blocks = mig.machine.ram_blocks
    total = sum(b.size for b in blocks)
    mig._send([struct.pack(">Q", total | RAM_SAVE_FLAG_MEM_SIZE)])
    layouts = []
    checked = mig.checks is not None
    for b in blocks:
        entry = _cstr(b.idstr) + struct.pack(">Q", b.size)
        here = os.lseek(fd, 0, os.SEEK_CUR)
        lay = BlockLayout(b, here + len(entry), checked)
        mig._send([entry, lay.header()])
        # The bitmap is written at the end; the pages during the passes. Reserve both by
        # moving the stream past the region (a sparse hole until written).
        os.ftruncate(fd, max(os.fstat(fd).st_size, lay.end))
        os.lseek(fd, lay.end, os.SEEK_SET)
        layouts.append(lay)
    n = p["multifd-channels"] if "multifd" in mig.config.capabilities else 1
    mig.multifd = MappedRamSender(fd, layouts, n, timeout=p["x-io-timeout"] / 1000,
                                  zero_detect=p["zero-page-detection"] != "none")  # fmt: skip
    mig.mapped_ram = mig.multifd

    # zero pages are found by the writer threads (unless zero-page-detection is none), not by
    # the migration thread's page walk
    mig.ram.find_zero = False


# -- reading a whole file ------------------------------------------------------------------


def file_pages(data: bytes | memoryview, info: Any, offset: int = 0) -> tuple[np.ndarray, Any]:
    """The pages a mapped-ram file holds for one block: (page indices its bitmap marks, a
    ``(npages, 4096)`` view of its page region, to index with them). ``info`` is the block's
    ``RamBlockInfo``; ``offset``: where its entry was, for errors.

    The decoder only skips the page regions (they are file offsets, not stream records), so a
    reader of the whole file, such as ``livemig analyze``, takes the pages from here: pages
    whose bit is clear were zero on the source (or never written) and are not in the file.
    """
    if info.mapped_ram is None:
        raise StreamError(f"RAM block {info.idstr!r} has no mapped-ram header", offset)
    _version, page_size, bitmap_offset, pages_offset = info.mapped_ram
    where = f"mapped-ram block {info.idstr!r}"
    npages = info.used_length // PAGE_SIZE
    if bitmap_offset == 0 and pages_offset == 0:  # x-ignore-shared: the block is not there
        return np.zeros(0, np.int64), np.zeros((npages, PAGE_SIZE), np.uint8)
    if page_size != PAGE_SIZE or info.used_length % PAGE_SIZE:
        raise StreamError(f"{where}: page size {page_size}, length {info.used_length:#x}; "
                          f"livemig reads {PAGE_SIZE}-byte pages", offset)  # fmt: skip
    size = len(data)
    nbits = bitmap_size(npages)
    if bitmap_offset + nbits > size or pages_offset + info.used_length > size:
        raise StreamError(f"{where}: bitmap at {bitmap_offset} and pages at {pages_offset} "
                          f"do not fit a {size}-byte file", offset)  # fmt: skip
    if pages_offset % PAGE_SIZE:
        raise StreamError(f"{where}: pages at {pages_offset}, not page aligned", offset)
    raw = np.frombuffer(data, np.uint8, nbits, bitmap_offset)
    # QEMU writes its bitmap as host-order longs; x86's little-endian order is bit i of byte j
    # for page 8 * j + i
    bits = np.unpackbits(raw, bitorder="little")[:npages]
    pages = np.frombuffer(data, np.uint8, info.used_length, pages_offset).reshape(-1, PAGE_SIZE)
    return np.flatnonzero(bits), pages


# -- destination ---------------------------------------------------------------------------


def _read_runs(fd: int, jobs: list[tuple[memoryview, int]], where: str) -> None:
    for view, offset in jobs:
        _preadv_all(fd, view, offset, where)


def _read_checked(fd: int, jobs: list[tuple], bad: list[tuple[str, np.ndarray]]) -> None:
    """Read each job's pages, then hash them (in cache) against the file's page digests."""
    for view, offset, name, first, expected in jobs:
        _preadv_all(fd, view, offset, "mapped-ram")
        got = page_digests(view, np.arange(len(expected)))
        wrong = np.flatnonzero(got != expected)
        if len(wrong):
            bad.append((name, wrong + first))


def _block_jobs(view: memoryview, idx: np.ndarray, pages_offset: int) -> list[tuple]:
    """(RAM slice, file offset, first page, pages) of ``idx``'s runs, split so that the
    threads share the work evenly."""
    jobs = []
    for first, count in page_runs(idx):
        for f in range(first, first + count, 2048):
            n = min(2048, first + count - f)
            jobs.append((view[f << PAGE_SHIFT : (f + n) << PAGE_SHIFT],
                         pages_offset + (f << PAGE_SHIFT), f, n))  # fmt: skip
    return jobs


def _check_digests(mig: Any, info: Any, fd: int, bits: np.ndarray, bitmap: bytes,
                   where: str, offset: int) -> np.ndarray:  # fmt: skip
    """x-checksums: the block's page digests (checked against the bitmap: 0 where no page
    was written), its seal noted for the stream's checksum."""
    from livemig.savevm import checksum as CK

    _version, _ps, bitmap_offset, pages_offset = info.mapped_ram
    npages = len(bits)
    at = bitmap_offset + bitmap_size(npages)
    if at + 8 * npages > pages_offset:
        raise CK.ChecksumError(f"{where}: no room for page digests between the bitmap and the "
                               f"pages at {pages_offset}", offset)  # fmt: skip
    raw = os.pread(fd, 8 * npages, at)
    if len(raw) != 8 * npages:
        raise CK.ChecksumError(f"{where}: the file ends inside the page digests", offset)
    digests = np.frombuffer(raw, "<u8").astype(np.uint64)
    stray = np.flatnonzero(digests.astype(bool) & ~bits.astype(bool))
    if len(stray):
        raise CK.ChecksumError(f"{where}: {len(stray)} page(s) from {int(stray[0]):#x} have a "
                               "digest but no bit in the bitmap: the bitmap or the digests "
                               "are corrupted", offset)  # fmt: skip
    header = MAPPED_RAM_HEADER.pack(*info.mapped_ram)
    mig.checks.mapped_seals.append((info.idstr, seal(info.idstr, header, bitmap, raw)))
    return digests


def incoming_load(mig: Any, setup: Any, offset: int) -> None:
    """Read every page the file's bitmaps mark straight into its RAM slot (``os.preadv``);
    with checksums, check each against its digest."""
    if "mapped-ram" not in mig.capabilities:
        raise StreamError("the stream uses mapped-ram but capability mapped-ram is off on the "
                          "destination (migrate-set-capabilities mapped-ram on)", offset)  # fmt: skip
    ch = mig.channel
    fd = ch.read_fd if ch is not None else None
    if fd is None or not ch.seekable:
        raise StreamError("a mapped-ram stream can only be restored from a file: URI", offset)
    size = os.fstat(fd).st_size
    loader = mig.loader
    checked = bool(mig.checked)
    jobs: list[tuple] = []
    for info in setup.blocks:
        if info.mapped_ram is None:
            raise StreamError(f"RAM block {info.idstr!r} has no mapped-ram header", offset)
        _version, page_size, bitmap_offset, pages_offset = info.mapped_ram
        if bitmap_offset == 0 and pages_offset == 0:
            continue  # x-ignore-shared: block skipped
        where = f"mapped-ram block {info.idstr!r}"
        if page_size != PAGE_SIZE:
            raise StreamError(f"{where}: page size {page_size}, this machine uses {PAGE_SIZE}",
                              offset)  # fmt: skip
        block = loader.blocks[info.idstr]
        npages = block.npages
        if (bitmap_offset + bitmap_size(npages) > pages_offset
                or pages_offset + block.size > size):  # fmt: skip
            raise StreamError(f"{where}: bitmap at {bitmap_offset} and pages at {pages_offset} "
                              f"do not fit a {size}-byte file", offset)  # fmt: skip
        raw = os.pread(fd, bitmap_size(npages), bitmap_offset)
        bits = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")[:npages]
        idx = np.flatnonzero(bits)
        runs = _block_jobs(block.view, idx, pages_offset)
        if checked:
            digests = _check_digests(mig, info, fd, bits, raw, where, offset)
            jobs += [(v, o, info.idstr, f, digests[f : f + n]) for v, o, f, n in runs]
        else:
            jobs += [(v, o) for v, o, _f, _n in runs]
        loader.touched[info.idstr][idx] = True
        loader.received[info.idstr][idx] = True
        loader.pages_loaded += len(idx)
    p = mig.params
    n = max(1, p["multifd-channels"] if "multifd" in mig.capabilities else 1)
    n = min(n, max(1, len(jobs)))
    errors: list[BaseException] = []
    bad: list[tuple[str, np.ndarray]] = []

    def run(part: list[tuple]) -> None:
        try:
            if checked:
                _read_checked(fd, part, bad)
            else:
                _read_runs(fd, part, "mapped-ram")
        except (OSError, StreamError) as exc:
            errors.append(exc)

    loaders = [threads.Thread(target=run, args=(jobs[i::n],), name=f"mapped-ram-load_{i}",
                              daemon=True) for i in range(n)]  # fmt: skip
    for t in loaders:
        t.start()
    for t in loaders:
        t.join(mig.timeout + 60)
        if t.is_alive():
            raise MigrationError(f"mapped-ram: reading pages took longer than {mig.timeout:g} s")
    if errors:
        exc = errors[0]
        if isinstance(exc, StreamError):
            raise exc
        raise StreamError(f"mapped-ram: reading pages failed: {exc}", offset)
    if bad:
        from livemig.savevm import checksum as CK

        name = bad[0][0]
        wrong = np.sort(np.concatenate([w for b, w in bad if b == name]))
        raise CK.ChecksumError(f"mapped-ram block {name!r}: {len(wrong)} page(s) do not match "
                               f"their checksums, first {int(wrong[0]):#x}, last "
                               f"{int(wrong[-1]):#x}: the file is corrupted", offset)  # fmt: skip
