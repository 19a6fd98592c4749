"""split_zero: every page lands in exactly one of (normal, zero), and only all-zero pages are
zero, whether ``idx`` is one contiguous run (strided view) or scattered (fancy index)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.savevm.ram import split_zero


@settings(max_examples=80, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(["zero", "first0", "data"]), min_size=1, max_size=40),
    pick=st.data(),
)
def test_split_zero_matches_a_full_scan(kinds: list[str], pick: st.DataObject) -> None:
    words = np.zeros((len(kinds), 512), np.uint64)
    for i, k in enumerate(kinds):
        if k == "first0":
            words[i, 511] = 7  # first word zero, page not zero: needs the full scan
        elif k == "data":
            words[i, 0] = i + 1
    n = len(kinds)
    start = pick.draw(st.integers(0, n - 1))
    if pick.draw(st.booleans()):
        idx = np.arange(start, pick.draw(st.integers(start + 1, n)), dtype=np.int64)
    else:
        idx = np.array(sorted(pick.draw(st.sets(st.integers(0, n - 1), min_size=1))), np.int64)
    normal, zero = split_zero(words, idx)
    want_zero = [i for i in idx.tolist() if kinds[i] == "zero"]
    assert zero.tolist() == want_zero
    assert sorted(normal.tolist() + zero.tolist()) == idx.tolist()


def test_split_zero_long_runs_both_strategies() -> None:
    """A long contiguous run takes one streaming pass when its first words look mostly zero
    (an idle guest) and the first-word filter otherwise; both must agree with a full scan."""
    rng = np.random.default_rng(3)
    n = 4096
    for data_share in (0.02, 0.3, 0.6, 1.0):
        words = np.zeros((n, 512), np.uint64)
        data = rng.random(n) < data_share
        words[data, rng.integers(0, 512, int(data.sum()))] = 1  # anywhere in the page
        words[rng.random(n) < 0.1, 0] = 5  # some first words set on their own
        idx = np.arange(100, n - 100, dtype=np.int64)
        normal, zero = split_zero(words, idx)
        want = idx[~words[idx].any(axis=1)]
        assert zero.tolist() == want.tolist()
        assert sorted(normal.tolist() + zero.tolist()) == idx.tolist()


def test_split_zero_run_longer_than_the_cached_row_starts() -> None:
    """A run longer than any scanned before (the per-page row starts grow on demand) still
    gets one result per page, the last pages' included."""
    n = 6000
    words = np.zeros((n, 512), np.uint64)
    words[::64, 8] = 1  # idle-like: one page in 64 has data, not in its first word
    words[-1, 511] = 1  # the very last word of the run
    idx = np.arange(n, dtype=np.int64)
    normal, zero = split_zero(words, idx)
    want = idx[~words.any(axis=1)]
    assert zero.tolist() == want.tolist()
    assert sorted(normal.tolist() + zero.tolist()) == idx.tolist()
