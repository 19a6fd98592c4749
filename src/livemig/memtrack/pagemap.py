"""The ``PAGEMAP_SCAN`` ioctl on ``/proc/self/pagemap`` (Linux 6.7+), and page bitmaps built from it.

Theory of operation
-------------------
``PAGEMAP_SCAN`` walks the page tables of an address range and returns the runs of pages whose
categories match a filter, as ``struct page_region {start, end, categories}`` records. Two uses:

* dirty tracking (``uffd-wp-async``): category ``PAGE_IS_WRITTEN`` (the page is not
  userfaultfd write-protected any more) with ``PM_SCAN_WP_MATCHING``, which write-protects every
  matching page again *in the same page-table walk*, under the page-table lock: a guest write
  either lands before the re-protect (the page is in this scan) or faults after it (the page
  is written again, so it is in the next scan). No write is lost.
* populated pages (``PAGE_IS_PRESENT``): a first migration pass need not read pages the kernel
  never populated, since they read as zero.

When the output vector fills up, the kernel stops early and reports ``walk_end``; the scan
continues from there. Runs are turned into a ``numpy`` bool array (one byte per 4 KiB page)
with a vectorised difference array, never a Python loop over pages.
"""

from __future__ import annotations

import ctypes
import errno
import os

import numpy as np

from livemig.memtrack._sys import IOWR, PAGE_SHIFT, PAGE_SIZE, KernelError, ioctl

# --- <linux/fs.h> ----------------------------------------------------------------------------
PAGEMAP_MAGIC = ord("f")

PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_SOFT_DIRTY = 1 << 7

PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1


class pm_scan_arg(ctypes.Structure):
    """``struct pm_scan_arg`` (96 bytes)."""

    _fields_ = tuple(
        (name, ctypes.c_uint64)
        for name in (
            "size",
            "flags",
            "start",
            "end",
            "walk_end",
            "vec",
            "vec_len",
            "max_pages",
            "category_inverted",
            "category_mask",
            "category_anyof_mask",
            "return_mask",
        )
    )


# struct page_region {u64 start, end, categories} is 24 bytes.
PAGE_REGION_WORDS = 3
PAGEMAP_SCAN = IOWR(PAGEMAP_MAGIC, 16, ctypes.sizeof(pm_scan_arg))


class PagemapScanner:
    """An open ``/proc/self/pagemap`` plus a reusable output vector of ``vec_len`` regions."""

    def __init__(self, vec_len: int = 8192) -> None:
        self.fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self._vec = np.zeros((vec_len, PAGE_REGION_WORDS), dtype=np.uint64)
        # the fields no scan changes are set once (a field costs ~1 us to set from Python, and
        # a post-copy switch's last sync is one scan inside its downtime)
        self._arg = pm_scan_arg(size=ctypes.sizeof(pm_scan_arg), vec=self._vec.ctypes.data,
                                vec_len=vec_len)  # fmt: skip

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> PagemapScanner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def scan_runs(self, start: int, end: int, category: int, flags: int = 0) -> np.ndarray:
        """All runs in [start, end) whose categories include ``category``, as an (n, 2) array of
        [first page, end page) indexes relative to ``start``. ``flags`` are PM_SCAN_* bits."""
        arg, vec = self._arg, self._vec
        arg.flags = flags
        arg.end = end
        arg.category_mask = category
        arg.return_mask = category
        chunks = []
        pos = start
        while pos < end:
            arg.start = pos
            try:
                n = ioctl(self.fd, PAGEMAP_SCAN, arg, what=f"PAGEMAP_SCAN 0x{pos:x}-0x{end:x}")
            except KernelError as exc:
                raise KernelError(
                    f"PAGEMAP_SCAN 0x{pos:x}-0x{end:x} flags={flags}", exc.errno
                ) from None
            if n:
                chunks.append(vec[:n, :2].astype(np.int64))  # a copy: vec is reused
            if int(arg.walk_end) <= pos:
                raise KernelError(f"PAGEMAP_SCAN made no progress at 0x{pos:x}", errno.EIO)
            pos = int(arg.walk_end)
        if not chunks:
            return np.empty((0, 2), dtype=np.int64)
        runs = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
        runs -= start
        runs >>= PAGE_SHIFT
        return runs

    def scan_bitmap(
        self, start: int, length: int, category: int, flags: int = 0, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Bool array, one entry per page of [start, start+length), True where the page's
        categories include ``category``; OR-ed into ``out`` when given."""
        npages = length >> PAGE_SHIFT
        runs = self.scan_runs(start, start + length, category, flags)
        bitmap = runs_to_bitmap(runs, npages)
        if out is None:
            return bitmap
        np.logical_or(out, bitmap, out=out)
        return out


_FEW_RUNS = 64


def runs_to_bitmap(runs: np.ndarray, npages: int) -> np.ndarray:
    """(n, 2) [first, end) page runs to a bool array of ``npages`` entries (vectorised)."""
    if len(runs) <= _FEW_RUNS:
        # a slice per run beats a cumsum over every page of a large block (0.7 ms per GiB)
        bitmap = np.zeros(npages, dtype=bool)
        for first, end in runs.tolist():
            bitmap[first:end] = True
        return bitmap
    # Runs come sorted and disjoint, so the starts (and the ends) are unique indexes and plain
    # fancy-index updates are exact.
    diff = np.zeros(npages + 1, dtype=np.int32)
    diff[runs[:, 0]] += 1
    diff[runs[:, 1]] -= 1
    return np.cumsum(diff[:-1], dtype=np.int32) > 0


def swap_active() -> bool:
    """Whether the host has any swap device or file in use (``/proc/swaps``)."""
    try:
        with open("/proc/swaps") as f:
            return len(f.read().strip().splitlines()) > 1
    except OSError:
        return True  # cannot tell: assume the worst


def present_pages(start: int, length: int) -> np.ndarray:
    """Bool array of the pages of [start, start+length) that may hold data: the others were
    never written and read as zero.

    Only ``PAGE_IS_PRESENT`` counts. ``PAGE_IS_SWAPPED`` does not help here: for shared memory
    a swapped-out page leaves an empty PTE (its swap entry lives in the shmem page cache), and
    the uffd write-protect markers on unpopulated pages *are* swap-type PTEs, so the category
    would report every page once dirty logging runs. Hence, when swap is in use at all, every
    page counts as possibly populated: a page can never be skipped because it was swapped out.
    """
    npages = length // PAGE_SIZE
    if swap_active():
        return np.ones(npages, dtype=bool)
    with PagemapScanner() as scanner:
        return scanner.scan_bitmap(start, length, PAGE_IS_PRESENT)
