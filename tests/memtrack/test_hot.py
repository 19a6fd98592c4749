"""Hot chunks (memtrack/hot.py): the policy alone, and with the real uffd-wp-async tracker that
must never miss a write however the chunks flip between hot and cold."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livemig.memtrack import open_tracker, probe
from livemig.memtrack.hot import CHUNK, HOT_AFTER, HOT_SHARE, HOT_SYNCS, HotChunks, chunk_runs
from livemig.memtrack.pagemap import PAGE_IS_WRITTEN, PagemapScanner


def _written(npages: int, dense_chunks: list[int], sparse_pages: list[int] = ()) -> np.ndarray:
    w = np.zeros(npages, dtype=bool)
    for c in dense_chunks:
        w[c * CHUNK : c * CHUNK + int(CHUNK * HOT_SHARE) + 1] = True
    w[list(sparse_pages)] = True
    return w


def test_a_chunk_dense_twice_in_a_row_is_left_writable() -> None:
    h = HotChunks(4 * CHUNK)
    assert HOT_AFTER == 2
    protect = h.update(_written(4 * CHUNK, [1], [5, 3 * CHUNK]))
    assert protect.all() and h.hot_pages == 0  # dense once: not yet
    protect = h.update(_written(4 * CHUNK, [1]))
    assert protect.tolist() == [True, False, True, True]
    assert h.hot_pages == CHUNK


def test_sparse_writes_never_make_a_chunk_hot() -> None:
    h = HotChunks(2 * CHUNK)
    sparse = list(range(0, 2 * CHUNK, 3))  # a third of every chunk, every sync
    for _ in range(20):
        assert h.update(_written(2 * CHUNK, [], sparse)).all()
    assert h.hot_pages == 0


def test_a_hot_chunk_is_measured_again_after_its_period() -> None:
    h = HotChunks(CHUNK)
    dense = _written(CHUNK, [0])
    h.update(dense)
    assert not h.update(dense)[0]  # hot from here
    # HOT_SYNCS syncs writable, the last of them protects it again (its reading is stale)
    left = [bool(h.update(np.zeros(CHUNK, dtype=bool))[0]) for _ in range(HOT_SYNCS)]
    assert left == [False] * (HOT_SYNCS - 1) + [True]
    # still dense at the fresh reading: hot again at once (it was hot before)
    assert not h.update(dense)[0]
    for _ in range(HOT_SYNCS):
        h.update(dense)
    # gone quiet: cold, and it must be dense HOT_AFTER times again
    assert h.update(np.zeros(CHUNK, dtype=bool))[0]
    assert h.update(dense)[0]
    assert not h.update(dense)[0]


def test_a_short_last_chunk_is_judged_by_its_own_size() -> None:
    npages = CHUNK + 10
    h = HotChunks(npages)
    w = np.zeros(npages, dtype=bool)
    w[CHUNK : CHUNK + 9] = True  # 9 of the last chunk's 10 pages
    h.update(w)
    assert h.update(w).tolist() == [True, False]
    assert h.hot_pages == 10


def test_chunk_runs_are_clipped_page_ranges() -> None:
    assert chunk_runs(np.array([True, True, False, True]), 3 * CHUNK + 7) == [
        (0, 2 * CHUNK),
        (3 * CHUNK, 3 * CHUNK + 7),
    ]
    assert chunk_runs(np.zeros(3, dtype=bool), 3 * CHUNK) == []


# -- with the kernel ----------------------------------------------------------------------------

needs_async = pytest.mark.skipif(
    probe("uffd-wp-async") is not None, reason="uffd-wp-async unavailable here"
)


@needs_async
def test_hot_chunk_stays_writable_and_every_write_is_still_found(make_ram) -> None:
    ram = make_ram("pc.ram", 4 * CHUNK * 4096)
    scanner = PagemapScanner()
    with open_tracker([ram.region], "uffd-wp-async", hot=True) as tracker:
        tracker.start()
        for _ in range(HOT_AFTER):
            ram.words[CHUNK : 2 * CHUNK, 0] += 1  # chunk 1, every page
            ram.words[7, 0] += 1
            assert np.flatnonzero(tracker.sync()["pc.ram"]).tolist() == [
                7, *range(CHUNK, 2 * CHUNK)]  # fmt: skip
        assert tracker.hot_pages == CHUNK
        written = scanner.scan_bitmap(ram.region.host_addr, ram.region.length, PAGE_IS_WRITTEN)
        # chunk 1 left writable (no fault per page next pass); page 7 protected again
        assert written[CHUNK : 2 * CHUNK].all() and not written[7]
        ram.words[CHUNK + 3, 0] += 1
        ram.words[9, 0] += 1
        dirty = tracker.sync()["pc.ram"]
        # the hot chunk counts whole (a superset), the cold page exactly
        assert np.flatnonzero(dirty).tolist() == [9, *range(CHUNK, 2 * CHUNK)]
    scanner.close()


@needs_async
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(
        st.tuples(
            st.lists(st.integers(0, 3), max_size=4),  # chunks written densely this step
            st.lists(st.integers(0, 4 * CHUNK - 1), max_size=20),  # single pages
        ),
        min_size=1,
        max_size=3 * HOT_SYNCS,
    )
)
def test_no_write_is_ever_missed(make_ram, steps: list[tuple[list[int], list[int]]]) -> None:
    ram = make_ram("pc.ram", 4 * CHUNK * 4096)
    with open_tracker([ram.region], "uffd-wp-async", hot=True) as tracker:
        tracker.start()
        for chunks, pages in steps:
            truth = _written(4 * CHUNK, sorted(set(chunks)), pages)
            idx = np.flatnonzero(truth)
            ram.words[idx, 0] += 1
            was_hot = np.repeat(tracker._hot["pc.ram"].hot_left > 0, CHUNK)
            dirty = tracker.sync()["pc.ram"]
            assert not (truth & ~dirty).any(), np.flatnonzero(truth & ~dirty)[:10]
            # a chunk that was writable reports every page written since it was protected
            # (a superset); every other chunk was protected at the last sync: exact
            assert np.array_equal(dirty & ~was_hot, truth & ~was_hot)


def test_cooled_chunks_are_protected_at_the_next_sync_and_none_heats_up() -> None:
    h = HotChunks(2 * CHUNK)
    dense = _written(2 * CHUNK, [0, 1])
    h.update(dense)
    h.update(dense)
    assert h.hot_pages == 2 * CHUNK
    h.cool()
    assert h.candidates().all()  # read, then protected
    assert h.update(dense).all() and h.hot_pages == 0
    for _ in range(3):
        assert h.update(dense).all()
        assert not h.candidates().any()


@needs_async
def test_final_sync_reads_the_hot_chunks_whole_and_protects_nothing(make_ram) -> None:
    ram = make_ram("pc.ram", 4 * CHUNK * 4096)
    scanner = PagemapScanner()
    with open_tracker([ram.region], "uffd-wp-async", hot=True) as tracker:
        tracker.start()
        for _ in range(HOT_AFTER):
            ram.words[CHUNK : 2 * CHUNK, 0] += 1  # chunk 1 turns hot
            tracker.sync()
        ram.words[CHUNK + 3, 0] += 1
        ram.words[9, 0] += 1
        dirty = tracker.final_sync()["pc.ram"]
        # what sync would report: the hot chunk whole (a superset), the cold page exactly
        assert np.flatnonzero(dirty).tolist() == [9, *range(CHUNK, 2 * CHUNK)]
        written = scanner.scan_bitmap(ram.region.host_addr, ram.region.length, PAGE_IS_WRITTEN)
        assert written[9]  # left writable: nothing re-armed (the guest never runs again)
    scanner.close()
