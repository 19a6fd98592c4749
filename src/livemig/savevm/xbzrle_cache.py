"""XBZRLE on the source: QEMU's page cache of last-sent contents, and its statistics (§4.6).

Theory of operation (QEMU: ``migration/page_cache.c``, ``save_xbzrle_page``): the cache has
``xbzrle-cache-size / 4096`` slots, direct-mapped by the page's RAM address (``ram_addr / TPS
mod slots``); each slot remembers which page it holds and in which dirty-bitmap pass it was
stored (its age). XBZRLE only starts after the first full pass over RAM (QEMU's bulk stage):
until then every page is new anyway. For a dirty normal page after that:

* **hit** (its slot holds this page): encode the difference to the cached copy
  (``wire.xbzrle.encode``). Identical pages are not sent at all; an encoding longer than a
  page is an **overflow** and the page goes out as a normal PAGE record. The cache is updated
  with the new contents either way.
* **miss**: the page goes out normally and is inserted, unless its slot holds a different page
  stored during the current or the previous pass (QEMU's ``CACHE_MISS_THRESHOLD`` rule keeps
  hot pages from evicting each other every pass).

The statistics are QEMU's ``xbzrle-cache`` member of query-migrate: cache-size, bytes (encoded
bytes sent), pages (pages sent encoded), cache-miss, cache-miss-rate and encoding-rate (both
over the last period, updated at every pass), overflow.

Pages are compared a whole batch at a time with numpy (one vectorised comparison against the
cached copies), so the Python loop only runs for pages that really changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from livemig.errors import StreamError
from livemig.machine.abi import PAGE_SIZE
from livemig.wire import xbzrle

CACHE_MISS_THRESHOLD = 2  # QEMU: a slot younger than this many passes is not replaced


@dataclass
class XbzrleResult:
    """How a batch of normal pages is to be sent."""

    encoded: list[tuple[int, bytes]]  # (page index, delta) for XBZRLE records
    normal: np.ndarray  # page indices still to send as PAGE records
    skipped: int  # pages unchanged since they were last sent: nothing goes out


class XbzrleCache:
    """QEMU's page cache plus the XBZRLE statistics of one outgoing migration."""

    def __init__(self, blocks: list, cache_size: int) -> None:
        self.cache_size = cache_size
        self.slots = max(1, cache_size // PAGE_SIZE)
        self.data = np.zeros((self.slots, PAGE_SIZE), dtype=np.uint8)
        self.addr = np.full(self.slots, -1, dtype=np.int64)  # ram page number held, -1 = empty
        self.age = np.zeros(self.slots, dtype=np.int64)
        self.base: dict[str, int] = {}  # block idstr -> first ram page number
        self.pages2d: dict[str, np.ndarray] = {}
        at = 0
        for b in blocks:
            self.base[b.idstr] = at
            self.pages2d[b.idstr] = b.array.reshape(-1, PAGE_SIZE)
            at += b.npages
        self.generation = 0  # dirty-bitmap passes seen
        self.active = False  # after the first full pass (QEMU: not in the bulk stage)
        # statistics (QEMU's XBZRLECounters)
        self.bytes = 0
        self.pages = 0
        self.cache_miss = 0
        self.overflow = 0
        self.cache_miss_rate = 0.0
        self.encoding_rate = 0.0
        self._period = (0, 0, 0, 0)  # (iterations pages, misses, encoded pages, encoded bytes)
        self._iter_pages = 0

    def on_sync(self) -> None:
        """A dirty-bitmap pass ended: age the cache, close the statistics period."""
        self.generation += 1
        if self.generation >= 2:
            self.active = True  # the first pass has sent every page once
        pages, misses, enc_pages, enc_bytes = self._period
        dp = self._iter_pages - pages
        if dp > 0:
            self.cache_miss_rate = (self.cache_miss - misses) / dp
        eb = self.bytes - enc_bytes
        ep = self.pages - enc_pages
        if eb > 0:
            self.encoding_rate = ep * PAGE_SIZE / eb
        self._period = (self._iter_pages, self.cache_miss, self.pages, self.bytes)

    def process(self, idstr: str, idx: np.ndarray) -> XbzrleResult:
        """Decide, for the normal (non-zero) pages ``idx`` of block ``idstr``, what to send."""
        if not self.active or len(idx) == 0:
            if len(idx):
                self._insert(idstr, idx, np.ones(len(idx), bool))
            return XbzrleResult([], idx, 0)
        self._iter_pages += len(idx)
        ram = self.base[idstr] + idx.astype(np.int64)
        slot = ram % self.slots
        hit = self.addr[slot] == ram
        miss_idx = idx[~hit]
        self.cache_miss += len(miss_idx)
        # a miss only takes the slot if it is empty or was not used recently
        if len(miss_idx):
            s = slot[~hit]
            free = (self.addr[s] < 0) | (self.age[s] + CACHE_MISS_THRESHOLD <= self.generation)
            self._insert(idstr, miss_idx, free)
        hit_idx = idx[hit]
        encoded: list[tuple[int, bytes]] = []
        normal = [miss_idx]
        skipped = 0
        if len(hit_idx):
            cur = self.pages2d[idstr][hit_idx]  # a copy: the guest may write on meanwhile
            hs = slot[hit]
            changed = (self.data[hs] != cur).any(axis=1)
            skipped = int(np.count_nonzero(~changed))
            over = []
            for k in np.flatnonzero(changed).tolist():
                delta = xbzrle.encode(self.data[hs[k]], cur[k], PAGE_SIZE)
                if delta is None:
                    over.append(k)
                else:
                    encoded.append((int(hit_idx[k]), delta))
                    self.bytes += len(delta)
            self.pages += len(encoded)
            self.overflow += len(over)
            if over:
                normal.append(hit_idx[over])
            self.data[hs] = cur
            self.age[hs] = self.generation
        out = np.concatenate(normal) if len(normal) > 1 else normal[0]
        return XbzrleResult(encoded, np.sort(out), skipped)

    def _insert(self, idstr: str, idx: np.ndarray, mask: np.ndarray) -> None:
        idx = idx[mask]
        if not len(idx):
            return
        ram = self.base[idstr] + idx.astype(np.int64)
        slot = ram % self.slots
        self.data[slot] = self.pages2d[idstr][idx]
        self.addr[slot] = ram
        self.age[slot] = self.generation

    def info(self) -> dict[str, Any]:
        """The ``xbzrle-cache`` member of query-migrate."""
        return {
            "cache-size": self.cache_size,
            "bytes": self.bytes,
            "pages": self.pages,
            "cache-miss": self.cache_miss,
            "cache-miss-rate": round(self.cache_miss_rate, 6),
            "encoding-rate": round(self.encoding_rate, 6),
            "overflow": self.overflow,
        }


def load_xbzrle(loader: Any, block: str, offset: int, data: Any, stream_offset: int) -> None:
    """Destination: apply an XBZRLE record to the page it names (its last received contents)."""
    if block not in loader.blocks:
        raise StreamError(f"XBZRLE page for unknown RAM block {block!r}", stream_offset)
    if len(data) > PAGE_SIZE:
        raise StreamError(f"XBZRLE record of {len(data)} bytes is longer than a page",
                          stream_offset)  # fmt: skip
    page = loader.page(block, offset)  # bounds checked; a view into guest RAM
    xbzrle.decode(data, page, stream_offset)
    i = offset // PAGE_SIZE
    loader.touched[block][i] = True
    loader.received[block][i] = True
    loader.pages_loaded += 1
