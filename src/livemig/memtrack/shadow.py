"""``shadow``: portable dirty tracking by comparing each region with a private copy.

Theory of operation: ``start`` copies every region into a shadow buffer. ``sync`` compares the
region with its shadow in chunks (``CHUNK_PAGES`` pages at a time, viewed as uint64 words so
numpy compares 8 bytes per step), which bounds the temporary memory and lets other threads run
between chunks; the pages that differ are reported and copied into the shadow. A write racing
the compare either changed the page before it was read (reported now) or after (the page
differs from the shadow at the next sync); a write racing the copy can only leave its new
bytes in the shadow of a page reported now, whose contents the caller reads after sync
returns. Guest and host writes alike are seen, by any path, kernel included; the cost is a
second copy of RAM and one full read of it per sync.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from livemig.memtrack._sys import PAGE_SIZE
from livemig.memtrack.base import TrackerBase

CHUNK_PAGES = 2048  # 8 MiB per compare step
WORDS_PER_PAGE = PAGE_SIZE // 8


class ShadowTracker(TrackerBase):
    """Dirty tracking by page comparison against a shadow copy (no kernel support needed)."""

    name = "shadow"

    def __init__(self, regions: Iterable[Any]) -> None:
        super().__init__(regions)
        self._shadows: dict[str, np.ndarray] = {}

    def _pages(self, name: str) -> np.ndarray:
        region = self._by_name[name]
        return np.frombuffer(region.view, dtype=np.uint64).reshape(region.npages, WORDS_PER_PAGE)

    def _start(self) -> None:
        self._shadows = {}
        for r in self.regions:
            live = self._pages(r.name)
            shadow = np.empty_like(live)
            for first in range(0, r.npages, CHUNK_PAGES):
                shadow[first : first + CHUNK_PAGES] = live[first : first + CHUNK_PAGES]
            self._shadows[r.name] = shadow

    def _sync_guest(self) -> dict[str, np.ndarray]:
        result = {}
        for r in self.regions:
            live, shadow = self._pages(r.name), self._shadows[r.name]
            dirty = np.zeros(r.npages, dtype=bool)
            for first in range(0, r.npages, CHUNK_PAGES):
                cur = live[first : first + CHUNK_PAGES]
                old = shadow[first : first + CHUNK_PAGES]
                changed = (cur != old).any(axis=1)
                idx = np.flatnonzero(changed)
                if len(idx):
                    old[idx] = cur[idx]
                    dirty[first : first + CHUNK_PAGES] = changed
            result[r.name] = dirty
        return result

    def _written_guest(self, name: str, first: int, end: int) -> np.ndarray:
        # changed since the last sync, by content (what the next sync will report)
        live, shadow = self._pages(name), self._shadows[name]
        return (live[first:end] != shadow[first:end]).any(axis=1)

    def _stop(self) -> None:
        self._shadows = {}
