"""The ``ram`` section: which pages to send on the source, where to put them on the destination.

Source (``RamSaver``): keeps one dirty bitmap per RAMBlock (numpy bool, one entry per page).
Everything starts dirty except pages the kernel says were never populated (they are zero, and
a destination's RAM starts zero, so they need not even be read). ``sync`` merges the tracker's
bitmaps in (one "pass", QEMU's dirty-sync-count). ``take`` walks the blocks from where the last
batch stopped, clearing the dirty bits of the pages it hands out; ``split_zero`` sorts a batch
into zero and normal pages reading one word per page (only pages whose first word is zero are
scanned whole); the main channel, multifd and mapped-ram all use it.

Destination (``RamLoader``): checks the block list against its own RAMBlocks, copies page
batches into place with one numpy assignment each, and clears zero pages only where something
was written before (untouched destination RAM is already zero, and touching it would allocate
it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from livemig.errors import StreamError
from livemig.machine.abi import PAGE_SIZE

PAGE_SHIFT = 12
WORDS_PER_PAGE = PAGE_SIZE // 8
# take() looks this many bitmap entries ahead at a time: a small take (a post-copy PART) costs
# a window, not a scan of the rest of a large block.
TAKE_FIRST_WINDOW = 1 << 10  # pages a take scans first
TAKE_SCAN_WINDOW = 1 << 16  # the widest it scans at once
_FEW_PAGES = 32  # page_runs splits up to this many pages in Python
_PROBE_STEP = 61  # split_zero samples every 61st first word of a run (odd: not a power of two)


def _pages2d(block: object) -> np.ndarray:
    arr: np.ndarray = block.array  # type: ignore[attr-defined]
    return arr.reshape(-1, PAGE_SIZE)


def page_runs(idx: np.ndarray, ascending: bool = False) -> list[tuple[int, int]]:
    """Page indices as (first, count) runs of consecutive pages, in the order given.

    A multifd packet, a post-copy batch or a mapped-ram job is usually one run: that case costs
    two scalar reads and one vector compare, where the general split takes eight numpy calls
    (~8 us a packet, paid once per 512 KiB on both sides of a multifd channel). Offsets read
    off the wire go through here too, so any input gives exact runs, never an assumed one.
    ``ascending``: the caller knows ``idx`` ascends without repeats (``RamSaver.take``'s
    pages), so first and last alone show a single run. A few pages (an idle guest's packet
    carries ~2 data pages among zero pages) are split in plain Python: the numpy calls cost
    more than the loop, a third of the receiving thread's time on such packets.
    """
    n = len(idx)
    if n == 0:
        return []
    first = int(idx[0])
    if int(idx[-1]) - first == n - 1 and (ascending or n < 3 or bool((np.diff(idx) == 1).all())):
        return [(first, n)]
    if n <= _FEW_PAGES:
        runs: list[list[int]] = []
        prev = -2
        for p in idx.tolist():
            if p == prev + 1:
                runs[-1][1] += 1
            else:
                runs.append([p, 1])
            prev = p
        return [(a, c) for a, c in runs]
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [n]))
    return list(zip(idx[starts].tolist(), (ends - starts).tolist(), strict=True))


def split_zero(words: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pages ``idx`` of a block (``words``: its RAM as uint64 rows of a page) as (normal, zero).
    ``idx`` ascends without repeats, as ``RamSaver.take`` gives it (``zero_mask`` says how)."""
    is_zero = zero_mask(words, idx)
    if is_zero is None:
        return idx, idx[:0]
    return idx[~is_zero], idx[is_zero]


def zero_mask(words: np.ndarray, idx: np.ndarray) -> np.ndarray | None:
    """Which of pages ``idx`` are all zero, as a bool mask beside ``idx``; None when none is.
    ``idx`` ascends without repeats.

    A page whose first word is not zero is normal: only the others are scanned whole. On data
    pages that is one word read per page instead of a 4 KiB gather and scan (the source's
    biggest per-page cost before); a zero page still costs a full scan, as in QEMU.

    Contiguous runs are read through views, never gathered: a fancy-index gather copies every
    candidate page before scanning it. The scan is a ``bitwise_or`` reduction per row, which
    numpy vectorises (26 GB/s here, against 17 for ``any(axis=1)`` on a view and 12 for
    ``any`` on a gather): half the time per GiB of idle guest, a quarter less on mixed pages.
    numpy lets go of the interpreter lock while it scans, so another thread's Python runs
    beside it (multifd scans in the migration thread while a channel thread sends).
    """
    n = len(idx)
    if n == 0:
        return None
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    if hi - lo == n:
        # A contiguous run. When a probe of its first words finds mostly zeros (an idle guest),
        # one streaming pass over the whole run beats a latency-bound read of every first word
        # followed by a second pass over most pages (1.5-2x the throughput of an idle 2 GiB
        # guest); on data pages the first-word read alone is cheaper.
        probe = words[lo:hi:_PROBE_STEP, 0]
        if np.count_nonzero(probe) * 2 < len(probe):
            zero_rows = _page_or(words, lo, hi) == 0
            return zero_rows if zero_rows.any() else None
        first = words[lo:hi, 0] != 0
    else:
        first = words[idx, 0] != 0
    if first.all():
        return None
    cand = np.flatnonzero(~first)
    maybe = idx[cand]
    lo, hi = int(maybe[0]), int(maybe[-1]) + 1
    if hi - lo == len(maybe):
        zero_rows = _page_or(words, lo, hi) == 0
    else:
        zero_rows = np.bitwise_or.reduce(words[maybe], axis=1) == 0
    if not zero_rows.any():
        return None
    is_zero = np.zeros(n, bool)
    is_zero[cand[zero_rows]] = True
    return is_zero


_row_starts = np.arange(0, 1 << 12, dtype=np.intp) * WORDS_PER_PAGE  # grows on demand


def _page_or(words: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The OR of each page's words, pages ``lo`` to ``hi`` of ``words`` (its rows).

    ``reduceat`` over the flat run, not ``reduce`` along rows: the same words, but numpy runs
    the row reduction through its buffered iterator, and reading a guest's RAM from memory
    went at 8-9 GB/s against 10-11 here (an idle guest's 1 GiB: 105 against 127 ms of CPU,
    the biggest single cost of migrating it; a plain flat OR, which says nothing per page,
    reaches 11-12)."""
    global _row_starts
    starts = _row_starts
    if len(starts) < hi - lo:
        starts = _row_starts = np.arange(0, hi - lo, dtype=np.intp) * WORDS_PER_PAGE
    return np.bitwise_or.reduceat(words[lo:hi].reshape(-1), starts[: hi - lo])


@dataclass
class Batch:
    """Pages of one block taken for sending: indices of normal and of zero pages."""

    block: object
    normal: np.ndarray
    zero: np.ndarray

    @property
    def idstr(self) -> str:
        return self.block.idstr  # type: ignore[attr-defined]


class RamSaver:
    """Source-side dirty bitmaps and the page walk."""

    def __init__(self, blocks: list, populated: dict[str, np.ndarray] | None = None) -> None:
        self.blocks = list(blocks)
        self.dirty: dict[str, np.ndarray] = {}
        for b in self.blocks:
            if populated is not None and b.idstr in populated:
                self.dirty[b.idstr] = populated[b.idstr].astype(bool, copy=True)
            else:
                self.dirty[b.idstr] = np.ones(b.npages, dtype=bool)
        self._words = {b.idstr: b.array.view(np.uint64).reshape(-1, WORDS_PER_PAGE)
                       for b in self.blocks}  # fmt: skip
        # Whether the page walk sorts out zero pages. Off when the workers that send the pages
        # find them (multifd's channel threads, mapped-ram's writers), or when nobody does
        # (zero-page-detection none).
        self.find_zero = True
        self._cursor_block = 0
        self._cursor_page = 0
        self.skipped_unpopulated = sum(b.npages for b in self.blocks) - self.pending_pages()

    @property
    def total_bytes(self) -> int:
        return sum(b.size for b in self.blocks)

    def pending_pages(self) -> int:
        return int(sum(np.count_nonzero(d) for d in self.dirty.values()))

    def merge(self, bitmaps: dict[str, np.ndarray]) -> int:
        """OR a tracker sync into the dirty bitmaps; returns the pages newly found dirty."""
        new = 0
        for name, bm in bitmaps.items():
            d = self.dirty[name]
            before = np.count_nonzero(d)  # counts, not bm & ~d: no temporary bitmaps
            np.logical_or(d, bm, out=d)
            new += int(np.count_nonzero(d) - before)
        return new

    def mark_all_dirty(self) -> None:
        for d in self.dirty.values():
            d[:] = True

    def take(self, max_pages: int) -> list[Batch]:
        """Up to ``max_pages`` dirty pages from the walk position, their bits cleared."""
        out: list[Batch] = []
        left = max_pages
        nblocks = len(self.blocks)
        visited = 0
        # The scan starts as wide as the take and doubles each time it comes up short: a dense
        # bitmap costs one short scan (a fixed 64 Ki-page window built a 512 KiB index array
        # for every 4 MiB multifd job), a sparse one a few widening ones.
        window = min(max(left, TAKE_FIRST_WINDOW), max(left, TAKE_SCAN_WINDOW))
        while left > 0 and visited <= nblocks:
            block = self.blocks[self._cursor_block]
            d = self.dirty[block.idstr]
            end = min(block.npages, self._cursor_page + window)
            idx = np.flatnonzero(d[self._cursor_page : end])
            if len(idx) == 0 and end < block.npages:
                self._cursor_page = end
                window = min(2 * window, max(left, TAKE_SCAN_WINDOW))
                continue
            if len(idx) == 0:
                self._cursor_block = (self._cursor_block + 1) % nblocks
                self._cursor_page = 0
                visited += 1
                continue
            idx = idx[:left] + self._cursor_page
            d[idx] = False
            self._cursor_page = int(idx[-1]) + 1
            if self._cursor_page >= block.npages:
                self._cursor_block = (self._cursor_block + 1) % nblocks
                self._cursor_page = 0
            out.append(self.split_zero(block, idx))
            left -= len(idx)
            visited = 0
            window = min(2 * window, max(left, TAKE_SCAN_WINDOW))
        return out

    def seek(self, idstr: str, page: int) -> None:
        """Continue the walk at ``page`` of block ``idstr``. Post-copy calls it after serving a
        requested page, as QEMU's page search continues from the last queued page: the
        neighbours the guest is likely to touch next are pushed first."""
        for i, b in enumerate(self.blocks):
            if b.idstr == idstr:
                self._cursor_block = i
                self._cursor_page = min(max(0, page), b.npages)
                return

    def split_zero(self, block: object, idx: np.ndarray) -> Batch:
        """``idx`` as a batch, its zero pages sorted out if ``find_zero``."""
        if not self.find_zero:
            return Batch(block, idx, idx[:0])
        normal, zero = split_zero(self._words[block.idstr], idx)  # type: ignore[attr-defined]
        return Batch(block, normal, zero)

    def requeue(self, batch: Batch) -> None:
        """Put pages that could not be sent back into the dirty bitmap (never lose one)."""
        d = self.dirty[batch.idstr]
        d[batch.normal] = True
        d[batch.zero] = True


class RamLoader:
    """Destination-side placement of incoming pages."""

    def __init__(self, blocks: list) -> None:
        self.blocks = {b.idstr: b for b in blocks}
        self._pages = {b.idstr: _pages2d(b) for b in blocks}
        self.touched = {b.idstr: np.zeros(b.npages, dtype=bool) for b in blocks}
        self.received = {b.idstr: np.zeros(b.npages, dtype=bool) for b in blocks}
        self.pages_loaded = 0
        self.zero_pages_loaded = 0

    def block_sizes(self) -> dict[str, int]:
        return {name: b.size for name, b in self.blocks.items()}

    def check_setup(self, blocks: tuple, offset: int | None = None) -> None:
        """The source's block list must name our blocks with our sizes."""
        for info in blocks:
            mine = self.blocks.get(info.idstr)
            if mine is None:
                raise StreamError(
                    f"RAM block {info.idstr!r} from the source does not exist here "
                    f"(have: {', '.join(self.blocks)})",
                    offset,
                )
            if info.used_length != mine.size:
                raise StreamError(
                    f"RAM block {info.idstr!r}: source has {info.used_length} bytes, this "
                    f"machine {mine.size} (start the destination with the same --memory)",
                    offset,
                )

    def _index(self, block: str, offsets: np.ndarray) -> np.ndarray:
        b = self.blocks.get(block)
        if b is None:
            raise StreamError(f"page for unknown RAM block {block!r}")
        idx = offsets >> PAGE_SHIFT
        if len(idx) and int(idx.max()) >= b.npages:
            raise StreamError(f"page offset 0x{int(offsets.max()):x} outside RAM block "
                              f"{block!r} of {b.size} bytes")  # fmt: skip
        return idx

    def load_pages(self, block: str, offsets: np.ndarray, data: np.ndarray) -> None:
        idx = self._index(block, offsets)
        self._pages[block][idx] = data
        self.touched[block][idx] = True
        self.received[block][idx] = True
        self.pages_loaded += len(idx)

    def load_zero(self, block: str, offsets: np.ndarray, fill: int = 0) -> None:
        idx = self._index(block, offsets)
        if fill:
            self._pages[block][idx] = fill
            self.touched[block][idx] = True
        else:
            dirty = idx[self.touched[block][idx]]
            if len(dirty):
                self._pages[block][dirty] = 0
                self.touched[block][dirty] = False
        self.received[block][idx] = True
        self.zero_pages_loaded += len(idx)

    def load_page(self, block: str, offset: int, page: bytes | memoryview | np.ndarray) -> None:
        """One page from a decoded record (XBZRLE, compressed)."""
        self.load_pages(block, np.array([offset], dtype=np.uint64),
                        np.frombuffer(page, dtype=np.uint8).reshape(1, PAGE_SIZE))  # fmt: skip

    def page(self, block: str, offset: int) -> np.ndarray:
        idx = self._index(block, np.array([offset], dtype=np.uint64))
        return self._pages[block][int(idx[0])]
