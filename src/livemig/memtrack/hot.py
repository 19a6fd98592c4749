"""Hot chunks: RAM that the guest rewrites every pass stays writable between syncs.

Why: with write-protect tracking every first write to a page after a sync takes a fault (about
a microsecond in the kernel, plus a TLB flush when the page is protected again). A guest that
rewrites a dense working set pays that for every page on every pass: ``livemig bench precopy``
measured its vCPU at 0.44-0.47 of its undisturbed write rate during unlimited pre-copy, and
0.76 with nothing re-protected. Protecting such pages again buys nothing, since the next sync
finds them written anyway.

Policy, per 2 MiB chunk (``CHUNK`` pages). At each sync the tracker reads which pages were
written; chunks that may stay writable (``candidates``) are read without protecting them, the
rest are read and protected again in the same scan, as without this policy. Then:

* a cold chunk (protected at the previous sync, so the reading is fresh) is *dense* when at
  least ``HOT_SHARE`` of its pages were written. Dense at ``HOT_AFTER`` syncs in a row, or
  once after it was hot before, it becomes hot: it is left writable for ``HOT_SYNCS`` syncs.
  Every other cold chunk is protected again, as without this policy.
* a hot chunk is not protected; every page written since its last protection counts as dirty
  at each of its syncs (a superset: no write is ever missed). At the end of its hot period
  it is protected again, so that the next reading is fresh and tells whether it is still hot.

The cost is bandwidth: a chunk that goes quiet while hot is sent again for up to ``HOT_SYNCS``
syncs. Only dense chunks qualify, so a guest that writes sparsely never triggers it. The
dirty-rate measurement (``calc-dirty-rate``, ``livemig plan``) never uses it: there a superset
would overstate the rate.

This module is the pure policy (numpy in, numpy out); ``wp_async`` applies it with
``PAGEMAP_SCAN``.
"""

from __future__ import annotations

import numpy as np

CHUNK = 512  # pages: 2 MiB
# Share of a chunk's pages written between two syncs that makes it dense: nearly all. A hot
# chunk is sent whole at every pass, so one rewritten by half would cost twice its bytes.
HOT_SHARE = 0.9
HOT_AFTER = 2  # dense syncs in a row before a chunk becomes hot the first time
HOT_SYNCS = 8  # syncs a hot chunk stays writable before it is measured again


class HotChunks:
    """The hot/cold state of one region's chunks."""

    def __init__(self, npages: int) -> None:
        self.npages = npages
        n = -(-npages // CHUNK)
        self.hot_left = np.zeros(n, dtype=np.int16)  # syncs to go writable; 0 = cold
        self.streak = np.zeros(n, dtype=np.int16)  # dense fresh readings in a row
        self.was_hot = np.zeros(n, dtype=bool)
        self.enabled = True
        self._dense_at = np.full(n, HOT_SHARE * CHUNK)  # written pages that make a chunk dense
        self._dense_at[-1] = HOT_SHARE * (npages - (n - 1) * CHUNK)  # the last may be short

    @property
    def hot_pages(self) -> int:
        """Pages in chunks left writable now."""
        hot = self.hot_left > 0
        n = int(np.count_nonzero(hot)) * CHUNK
        if len(hot) and hot[-1]:
            n -= len(hot) * CHUNK - self.npages  # the last chunk may be short
        return n

    def candidates(self) -> np.ndarray:
        """Chunks whose next reading may leave them writable (bool, one per chunk): the hot
        ones and those one dense reading away. Every other chunk is protected at the next
        sync whatever it reads, so the tracker reads and protects it in one scan."""
        if not self.enabled:
            return self.hot_left > 0
        return (self.hot_left > 0) | self.was_hot | (self.streak >= HOT_AFTER - 1)

    def update(self, written: np.ndarray) -> np.ndarray:
        """Given the pages written since the last sync (bool, one per page), advance the state
        and return the chunks to protect again now (bool, one per chunk)."""
        dense = _chunk_counts(written, len(self.hot_left)) >= self._dense_at

        hot = self.hot_left > 0
        self.hot_left[hot] -= 1
        ending = hot & (self.hot_left == 0)  # protect now: the next reading is fresh again

        cold = ~hot
        self.streak[cold] = np.where(dense[cold], self.streak[cold] + 1, 0)
        start = cold & dense & (self.was_hot | (self.streak >= HOT_AFTER)) & self.enabled
        self.hot_left[start] = HOT_SYNCS
        self.streak[start] = 0
        self.was_hot[start] = True
        self.was_hot[cold & ~dense] = False
        return (cold & ~start) | ending

    def cool(self) -> None:
        """No more hot chunks: those hot now are protected at the next sync. For when the dirty
        rate must be measured exactly from here on (auto-converge throttling the guest: a
        superset would make it throttle harder than the guest's writes call for)."""
        self.enabled = False
        self.hot_left[self.hot_left > 0] = 1
        self.streak[:] = 0
        self.was_hot[:] = False

    def reset(self) -> None:
        """Everything cold (the tracker protected everything again)."""
        self.hot_left[:] = 0
        self.streak[:] = 0
        self.was_hot[:] = False


def _chunk_counts(written: np.ndarray, nchunks: int) -> np.ndarray:
    """Written pages per chunk."""
    full = len(written) // CHUNK * CHUNK
    counts = np.zeros(nchunks, dtype=np.int64)
    if full:
        counts[: full // CHUNK] = written[:full].reshape(-1, CHUNK).sum(axis=1)
    if full < len(written):
        counts[-1] = int(np.count_nonzero(written[full:]))
    return counts


def chunk_runs(chunks: np.ndarray, npages: int) -> list[tuple[int, int]]:
    """Maximal runs of True chunks as [first page, end page) ranges, clipped to ``npages``."""
    if not chunks.any():
        return []
    padded = np.concatenate(([False], chunks, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a) * CHUNK, min(int(b) * CHUNK, npages)) for a, b in edges.reshape(-1, 2)]
