"""RamSaver.take looks ahead a window at a time (cheap small takes in post-copy): the walk
must still return every dirty page exactly once, in RAM order from the cursor, across blocks."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livemig.savevm import ram as ramsave


class _Block:
    def __init__(self, idstr: str, npages: int) -> None:
        self.idstr = idstr
        self.npages = npages
        self.size = npages * 4096
        self.array = np.zeros(self.size, dtype=np.uint8)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=3),
    density=st.floats(0.0, 1.0),
    take=st.integers(1, 70),
    window=st.integers(1, 64),
    seed=st.integers(0, 2**32 - 1),
)
def test_take_returns_every_dirty_page_once(sizes, density, take, window, seed, monkeypatch):
    monkeypatch.setattr(ramsave, "TAKE_SCAN_WINDOW", window)
    rng = np.random.default_rng(seed)
    blocks = [_Block(f"b{i}", n) for i, n in enumerate(sizes)]
    pop = {b.idstr: rng.random(b.npages) < density for b in blocks}
    saver = ramsave.RamSaver(blocks, populated=pop)
    got: list[tuple[int, int]] = []
    for _ in range(sum(sizes) + 2):
        batches = saver.take(take)
        assert sum(len(x.normal) + len(x.zero) for x in batches) <= take
        for x in batches:
            blk = int(x.idstr[1:])
            got += [(blk, int(i)) for i in np.sort(np.concatenate((x.normal, x.zero)))]
    want = [(i, int(p)) for i, b in enumerate(blocks) for p in np.flatnonzero(pop[b.idstr])]
    assert got == want
    assert saver.pending_pages() == 0


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=3), seed=st.integers(0, 2**32 - 1))
def test_merge_counts_the_pages_newly_dirty(sizes, seed) -> None:
    """A sync merged into the dirty bitmaps: their union, and the count of pages that were
    clean before (the dirty-pages rate is made of it)."""
    rng = np.random.default_rng(seed)
    blocks = [_Block(f"b{i}", n) for i, n in enumerate(sizes)]
    saver = ramsave.RamSaver(blocks, populated={b.idstr: rng.random(b.npages) < 0.5
                                                for b in blocks})  # fmt: skip
    before = {k: v.copy() for k, v in saver.dirty.items()}
    synced = {b.idstr: rng.random(b.npages) < 0.3 for b in blocks}
    new = saver.merge(synced)
    assert new == sum(int(np.count_nonzero(synced[k] & ~before[k])) for k in before)
    for k in before:
        assert np.array_equal(saver.dirty[k], before[k] | synced[k])
