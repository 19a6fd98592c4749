"""page_runs: exact (first, count) runs for any index array, including offsets read off the
wire that repeat, go backwards or only look contiguous from their ends."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.savevm.ram import page_runs


def _reference(idx: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in idx:
        if out and i == out[-1][0] + out[-1][1]:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 80), max_size=60), st.sampled_from([np.int64, np.uint64]))
def test_page_runs_matches_a_walk(idx: list[int], dtype: type) -> None:
    assert page_runs(np.array(idx, dtype)) == _reference(idx)


def test_page_runs_ends_that_only_look_contiguous() -> None:
    # first and last are n - 1 apart, but the middle repeats or goes back: not one run
    for idx in ([5, 5, 7], [5, 7, 6, 8], [0, 2, 1, 3], [3, 3, 4, 5, 6]):
        assert page_runs(np.array(idx, np.int64)) == _reference(idx)
    assert page_runs(np.arange(100, 228, dtype=np.int64)) == [(100, 128)]
    assert page_runs(np.array([9], np.int64)) == [(9, 1)]
    assert page_runs(np.array([], np.int64)) == []


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(0, 60), max_size=30))
def test_page_runs_ascending_shortcut(pages: set[int]) -> None:
    idx = sorted(pages)
    assert page_runs(np.array(idx, np.int64), ascending=True) == _reference(idx)
