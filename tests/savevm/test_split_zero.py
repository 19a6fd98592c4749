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
