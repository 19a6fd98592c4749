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
    normal: np.ndarray  # page indices still to send as PAGE records ...
    data: np.ndarray | None  # ... with their contents as cached (None: read them from RAM)
    skipped: int  # pages unchanged since they were last sent: nothing goes out
    current: np.ndarray | None = None  # the copy of every page asked about (rows as ``idx``)


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
        self.active = True  # the first (bulk) pass has sent every page once
        pages, misses, enc_pages, enc_bytes = self._period
        dp = self._iter_pages - pages
        if dp > 0:
            self.cache_miss_rate = (self.cache_miss - misses) / dp
        eb = self.bytes - enc_bytes
        ep = self.pages - enc_pages
        self.encoding_rate = ep * PAGE_SIZE / eb if ep and eb else 0.0
        self._period = (self._iter_pages, self.cache_miss, self.pages, self.bytes)

    def process(self, idstr: str, idx: np.ndarray) -> XbzrleResult:
        """Decide, for the normal (non-zero) pages ``idx`` of block ``idstr``, what to send.

        Pages sent as PAGE records go out from the copy the cache took (QEMU sends the cached
        copy too): had they been read from RAM again, a guest write in between would leave the
        destination with contents the cache does not know, and a later delta would corrupt it.
        """
        if not self.active or len(idx) == 0:
            return XbzrleResult([], idx, None, 0)
        self._iter_pages += len(idx)
        ram = self.base[idstr] + idx.astype(np.int64)
        slot = ram % self.slots
        cur = self.pages2d[idstr][idx]  # one copy: the guest may write on meanwhile
        hit = self.addr[slot] == ram
        self.cache_miss += int(np.count_nonzero(~hit))
        send = ~hit
        encoded: list[tuple[int, bytes]] = []
        skipped = 0
        hk = np.flatnonzero(hit)
        if len(hk):
            hs = slot[hk]
            changed = (self.data[hs] != cur[hk]).any(axis=1)
            skipped = int(np.count_nonzero(~changed))
            n_over = 0
            for k in hk[changed].tolist():
                delta = xbzrle.encode(self.data[slot[k]], cur[k], PAGE_SIZE)
                if delta is None:
                    send[k] = True
                    n_over += 1
                else:
                    encoded.append((int(idx[k]), delta))
            # QEMU (5.1+) counts every cache hit as an XBZRLE page, sent, unchanged or
            # overflowing, and an overflow as a page of bytes: the encoding rate then says how
            # well the guest's rewrites encode. Sent records' bytes: encode_batches.
            self.pages += len(hk)
            self.overflow += n_over
            self.bytes += n_over * PAGE_SIZE
        # the cache learns every page sent; a miss takes its slot only if that slot is free
        # or was not used in the last CACHE_MISS_THRESHOLD passes
        take = (
            hit | (self.addr[slot] < 0) | (self.age[slot] + CACHE_MISS_THRESHOLD <= self.generation)
        )
        self.data[slot[take]] = cur[take]
        self.addr[slot[take]] = ram[take]
        self.age[slot[take]] = self.generation
        return XbzrleResult(encoded, idx[send], cur[send], skipped, cur)

    def zero_pages(self, idstr: str, idx: np.ndarray) -> None:
        """Pages sent as ZERO records: a cached copy of them is now zero (QEMU caches them)."""
        if not self.active or len(idx) == 0:
            return
        ram = self.base[idstr] + idx.astype(np.int64)
        slot = ram % self.slots
        held = self.addr[slot] == ram
        self.data[slot[held]] = 0

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


# -- hooks called by the migration thread (source.py) -------------------------------------------


def source_setup(mig: Any) -> None:
    """Capability ``xbzrle``: a cache of ``xbzrle-cache-size`` bytes for this migration."""
    cfg = mig.config
    if "xbzrle" in cfg.capabilities:
        mig.xbzrle = XbzrleCache(mig.machine.ram_blocks, cfg.params["xbzrle-cache-size"])


def encode_batches(mig: Any, batches: list, unit: Any = None) -> tuple[list, int, int]:
    """Main-channel records for ``ram.Batch`` objects with XBZRLE: ZERO, XBZRLE, PAGE. With
    checksums, ``unit`` (``savevm.checksum.Unit``) learns them, with the copies they were
    encoded from (what the destination ends up with)."""
    from livemig.savevm import checksum as CK
    from livemig.wire import events as E

    cache: XbzrleCache = mig.xbzrle
    enc = mig.encoder
    out: list = []
    normal = zero = 0
    for b in batches:
        if len(b.zero):
            out += enc.encode_zero_pages(b.idstr, b.zero.astype(np.uint64) << 12)
            cache.zero_pages(b.idstr, b.zero)
            zero += len(b.zero)
            if unit is not None:
                unit.add(b.idstr, CK.KIND_ZERO, b.zero)
        if not len(b.normal):
            continue
        res = cache.process(b.idstr, b.normal)
        for i, delta in res.encoded:
            before = enc.bytes_sent
            out += enc.send(E.RamXbzrlePage(b.idstr, i << 12, delta))
            # QEMU's xbzrle bytes: the record less its 8-byte word (as compressed bytes are)
            cache.bytes += enc.bytes_sent - before - 8
        if unit is not None and res.encoded:
            rows = np.searchsorted(b.normal, [i for i, _ in res.encoded])
            unit.add(b.idstr, CK.KIND_DATA, b.normal[rows], res.current[rows])
        if len(res.normal):
            ram = res.data if res.data is not None else b.block.view
            out += enc.encode_pages(b.idstr, res.normal.astype(np.uint64) << 12, ram)
            normal += len(res.normal)
            if unit is not None:
                unit.add(b.idstr, CK.KIND_DATA, res.normal, res.data)
    return out, normal, zero
