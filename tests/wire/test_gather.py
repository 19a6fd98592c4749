"""Page records as address rows (``PageGather``, ``livemig/iovec.py``): the bytes on the wire
are exactly ``encode_pages``'s, through a socket, after partial writes, and as buffers."""

from __future__ import annotations

import os
import socket
import threading

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig import iovec
from livemig.transport import Channel
from livemig.wire.encoder import Encoder, PageGather

PS = 4096
BLOCK = memoryview(bytearray(os.urandom(64 * PS)))


def _plain(offsets: np.ndarray, *, named: bool = True) -> bytes:
    enc = Encoder()
    if not named:
        enc.last_block = "pc.ram"
    return b"".join(bytes(b) for b in enc.encode_pages("pc.ram", offsets, BLOCK))


def _send_through(bufs: list, sndbuf: int | None = None) -> bytes:
    a, b = socket.socketpair()
    if sndbuf:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    ca, cb = Channel.from_socket(a, "a"), Channel.from_socket(b, "b")
    out = bytearray()

    def drain() -> None:
        buf = memoryview(bytearray(1 << 16))
        while k := cb.recv_into(buf):
            out.extend(buf[:k])

    t = threading.Thread(target=drain)
    t.start()
    n = ca.sendv(bufs)
    ca.close()
    t.join(10)
    cb.close()
    assert n == len(out)
    return bytes(out)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 63), min_size=1, max_size=64, unique=True), st.booleans())
def test_gather_matches_plain_records(pages: list[int], named: bool) -> None:
    offsets = np.array(pages, np.uint64) * PS
    enc = Encoder()
    if not named:
        enc.last_block = "pc.ram"
    bufs = enc.encode_pages_gather("pc.ram", offsets, BLOCK)
    want = _plain(offsets, named=named)
    assert enc.bytes_sent == len(want)
    assert _send_through([b"head", *bufs, b"tail"]) == b"head" + want + b"tail"
    flat = [x for b in bufs for x in (b.buffers() if isinstance(b, PageGather) else (b,))]
    assert b"".join(bytes(x) for x in flat) == want


def test_gather_survives_partial_writes() -> None:
    """A tiny socket buffer: writev stops inside headers and inside pages, many times."""
    offsets = np.arange(64, dtype=np.uint64)[::-1] * PS
    # the block is named once per encoder: compare with one plain encoder's output
    enc = Encoder()
    many = [x for _ in range(40) for x in enc.encode_pages_gather("pc.ram", offsets, BLOCK)]
    enc2 = Encoder()
    want = b"".join(
        bytes(x) for _ in range(40) for x in enc2.encode_pages("pc.ram", offsets, BLOCK)
    )
    assert _send_through(many, sndbuf=4096) == want


def test_advance_trims_the_partly_written_row() -> None:
    iov = np.array([[1000, 8], [5000, 4096], [20000, 8]], np.uint64)
    assert iovec.advance(iov, 0, 8 + 100) == 1
    assert iov[1].tolist() == [5100, 3996]
    assert iovec.advance(iov, 1, 3996) == 2
    assert iovec.advance(iov, 2, 8) == 3


def test_build_skips_empty_buffers_and_keeps_order() -> None:
    keep: list = []
    iov = iovec.build([b"", b"ab", memoryview(b"")[:0], b"cde"], keep)
    assert iov[:, 1].tolist() == [2, 3]
    assert iovec.build([], keep).shape == (0, 2)
