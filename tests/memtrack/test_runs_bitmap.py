"""``runs_to_bitmap``: both of its paths (a slice per run, a difference array) agree with a
plain reference on any sorted, disjoint set of runs."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from livemig.memtrack.pagemap import _FEW_RUNS, runs_to_bitmap


@st.composite
def runs(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    npages = draw(st.integers(1, 4096))
    bounds = sorted(set(draw(st.lists(st.integers(0, npages), max_size=4 * _FEW_RUNS))))
    pairs = [(a, b) for a, b in zip(bounds[::2], bounds[1::2], strict=False) if a < b]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2), npages


@given(runs())
def test_matches_reference(case: tuple[np.ndarray, int]) -> None:
    rs, npages = case
    want = np.zeros(npages, dtype=bool)
    for a, b in rs.tolist():
        want[a:b] = True
    got = runs_to_bitmap(rs, npages)
    assert got.dtype == bool and got.shape == (npages,)
    assert np.array_equal(got, want)
