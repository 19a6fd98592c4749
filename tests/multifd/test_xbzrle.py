"""XBZRLE: the page cache and its statistics, and a migration of a guest that rewrites the same
pages (memstress bumps one counter word per page), where later passes go out as small deltas."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

from livemig.guests.memstress import check_invariant
from livemig.savevm.ram import Batch
from livemig.savevm.xbzrle_cache import XbzrleCache, encode_batches
from livemig.wire import xbzrle
from livemig.wire.encoder import Encoder

from .conftest import MakePair


class _Block:
    def __init__(self, idstr: str, npages: int) -> None:
        self.idstr = idstr
        self.npages = npages
        self.array = np.zeros(npages * 4096, np.uint8)
        self.view = memoryview(self.array)


def test_cache_hit_miss_overflow_and_rates() -> None:
    b = _Block("pc.ram", 64)
    cache = XbzrleCache([b], 16 * 4096)  # 16 slots for 64 pages
    idx = np.arange(8)
    b.array[: 8 * 4096] = 7
    res = cache.process("pc.ram", idx)
    assert len(res.normal) == 8 and res.data is None  # bulk stage: no cache yet
    cache.on_sync()
    res = cache.process("pc.ram", idx)  # all misses, inserted
    assert cache.cache_miss == 8 and list(res.normal) == list(idx)
    assert res.data is not None and (res.data == 7).all()
    b.array[0] = 1  # page 0: one byte changed
    b.array[4096 : 2 * 4096] = np.random.default_rng(1).integers(0, 256, 4096)  # page 1: all
    cache.on_sync()
    res = cache.process("pc.ram", idx)
    assert res.skipped == 6  # pages 2..7 did not change: nothing is sent
    assert [i for i, _ in res.encoded] == [0] and list(res.normal) == [1]
    # QEMU counts every hit as an XBZRLE page (sent, unchanged or overflowing) and an overflow
    # as a page of bytes; a record's bytes are counted where it is encoded (encode_batches)
    assert cache.overflow == 1 and cache.pages == 8 and cache.bytes == 4096
    page = np.full(4096, 7, np.uint8)
    xbzrle.decode(res.encoded[0][1], page)
    assert (page == b.array[:4096]).all()
    cache.on_sync()
    info = cache.info()
    assert info["cache-size"] == 16 * 4096 and info["cache-miss"] == 8
    assert info["cache-miss-rate"] == 0.0  # no miss in the last period
    assert info["encoding-rate"] == pytest.approx(8 * 4096 / 4096)
    # page 16 shares page 0's slot, which was just used: it does not evict it
    cache.process("pc.ram", np.array([16]))
    assert cache.addr[0] == 0


def test_xbzrle_migration_of_rewritten_pages(make_pair: MakePair) -> None:
    p = make_pair("ws=4M rate=40000")
    time.sleep(0.3)
    p.configure(
        {"x-verify": True, "return-path": True, "xbzrle": True},
        {"xbzrle-cache-size": 8 << 20, "downtime-limit": 1, "max-bandwidth": 40 << 20},
    )
    # a tiny downtime limit keeps it iterating: several passes over the same pages
    p.src_mgr.set_parameters({"downtime-limit": 1})
    done = p.migrate_later(30)
    time.sleep(1.0)
    # deltas make the measured bandwidth tiny (bytes, not pages): say what the link can do
    p.src_mgr.set_parameters({"downtime-limit": 300, "avail-switchover-bandwidth": 1 << 30})
    src, dst = done()
    assert src["status"] == "completed", src
    assert src["x-verified"] is True and dst["x-verify"]["equal"] is True
    cache = src["xbzrle-cache"]
    assert cache["pages"] > 500, cache  # later passes went out as deltas
    assert cache["bytes"] < cache["pages"] * 200  # one changed word per page: tiny deltas
    assert cache["cache-size"] == 8 << 20
    p.dst.pause()
    report = check_invariant(p.dst.read_guest)
    assert report.ok, report.problems


def test_xbzrle_bytes_are_qemus() -> None:
    """``bytes`` adds each XBZRLE record less its 8-byte word: encoding flag, length, delta,
    and the block's name where the record names it (QEMU's ``bytes_xbzrle - 8``)."""
    b = _Block("pc.ram", 64)
    mig = SimpleNamespace(xbzrle=XbzrleCache([b], 16 * 4096), encoder=Encoder())
    idx = np.arange(4)
    for _ in range(2):  # bulk pass, then the pass that fills the cache
        encode_batches(mig, [Batch(b, idx, idx[:0])])
        mig.xbzrle.on_sync()
    b.array[[0, 4096, 8192]] = 5  # pages 0, 1, 2: one byte each
    mig.encoder.reset_block()  # as after a record of another block: the next names its own
    out, normal, _zero = encode_batches(mig, [Batch(b, idx, idx[:0])])
    assert normal == 0 and mig.xbzrle.pages == 4  # three deltas and one unchanged page
    deltas = [xbzrle.encode(np.zeros(4096, np.uint8), b.array[i * 4096 : (i + 1) * 4096], 4096)
              for i in range(3)]  # fmt: skip
    named = 1 + len("pc.ram")  # the first record names its block
    assert mig.xbzrle.bytes == named + sum(3 + len(d) for d in deltas)
    assert sum(memoryview(x).nbytes for x in out) == mig.xbzrle.bytes + 3 * 8
