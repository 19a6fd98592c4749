"""PreemptParser: the preempt channel's raw page records, however the reads cut them.

The preempt thread reads into one reused buffer and installs every page of a read before the
next: the parser hands out views into that buffer when records arrive whole, copies when a
record was cut. This test reads the same way, so a view that outlived its read would show as
a wrong page."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.errors import StreamError
from livemig.migration.postcopy_dest import PAGE, PreemptParser

_PAGE, _ZERO, _CONT, _EOS = 0x08, 0x02, 0x20, 0x10


def _stream(records: list[tuple[str, int, bytes | None]]) -> bytes:
    out, last = bytearray(), None
    for block, offset, page in records:
        flags = _PAGE if page is not None else _ZERO
        if block == last:
            out += struct.pack(">Q", offset | flags | _CONT)
        else:
            out += struct.pack(">Q", offset | flags) + bytes([len(block)]) + block.encode()
            last = block
        out += page if page is not None else b"\0"
    return bytes(out + struct.pack(">Q", _EOS))


records_st = st.lists(
    st.tuples(
        st.sampled_from(["pc.ram", "extra"]),
        st.integers(0, 1000).map(lambda i: i * PAGE),
        st.one_of(st.none(), st.integers(1, 255).map(lambda b: bytes([b]) * PAGE)),
    ),
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(records=records_st, cuts=st.lists(st.integers(1, 3 * PAGE), min_size=1, max_size=40))
def test_any_chunking_yields_the_records(records: list, cuts: list[int]) -> None:
    data = _stream(records)
    parser = PreemptParser()
    buf = bytearray(4 * PAGE)  # reused for every read, as the preempt thread's
    got: list[tuple[str, int, bytes | None]] = []
    at, k = 0, 0
    while at < len(data):
        n = min(cuts[k % len(cuts)], len(data) - at, len(buf))
        buf[:n] = data[at : at + n]
        at, k = at + n, k + 1
        for block, offset, page in parser.feed(memoryview(buf)[:n]):
            got.append((block, offset, None if page is None else bytes(page)))  # "installed"
        buf[:] = b"\xee" * len(buf)  # the next read overwrites what a stale view would see
    assert got == records
    assert parser.eos


def test_continue_before_any_block_is_refused() -> None:
    with pytest.raises(StreamError, match="CONTINUE before any block"):
        PreemptParser().feed(struct.pack(">Q", _PAGE | _CONT) + bytes(PAGE))


def test_unknown_record_flags_are_refused() -> None:
    with pytest.raises(StreamError, match="unexpected record flags"):
        PreemptParser().feed(struct.pack(">Q", 0x40) + b"\x06pc.ram")
