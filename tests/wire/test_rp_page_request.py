"""``ReturnPathDecoder.page_request``: the post-copy request path's shortcut agrees with the
general decoder on every page request, and declines (None) everything else, leaving it to
``receive_data`` and its errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.errors import StreamError
from livemig.wire.returnpath import (
    Pong,
    ReqPages,
    ReturnPathDecoder,
    ReturnPathEncoder,
    Shut,
    encode_rp,
)

names = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(reqs=st.lists(st.tuples(names, st.integers(0, 2**40), st.integers(0, 2**20)),
                     min_size=1, max_size=20))  # fmt: skip
def test_shortcut_agrees_with_the_decoder(reqs: list[tuple[str, int, int]]) -> None:
    enc = ReturnPathEncoder()  # REQ_PAGES when the block repeats, REQ_PAGES_ID otherwise
    fast, slow = ReturnPathDecoder(), ReturnPathDecoder()
    for block, start, length in reqs:
        data = enc.send(ReqPages(start * 4096, length, block))
        slow.receive_data(data)
        (msg,) = slow.events()
        assert fast.page_request(data) == (msg.block, msg.start, msg.length)


def test_shortcut_declines_the_rest() -> None:
    dec = ReturnPathDecoder()
    req = encode_rp(ReqPages(4096, 4096, "pc.ram"))
    assert dec.page_request(encode_rp(ReqPages(0, 4096))) is None  # REQ_PAGES: no block yet
    assert dec.page_request(encode_rp(Pong(7))) is None
    assert dec.page_request(encode_rp(Shut(0))) is None
    assert dec.page_request(req + req) is None  # two messages: the general path
    assert dec.page_request(req[:-1]) is None  # part of one
    bad = bytearray(req)
    bad[16] += 1  # name length does not match the message length
    assert dec.page_request(bad) is None
    not_text = bytearray(req)
    not_text[17] = 0xFF
    assert dec.page_request(not_text) is None
    with pytest.raises(StreamError, match="not text"):
        dec.receive_data(not_text)
        dec.events()
    # after a declined message the decoder works as before
    ok = ReturnPathDecoder()
    ok.receive_data(req[:5])
    assert ok.page_request(req) is None  # bytes are buffered: never skip ahead of them
    ok.receive_data(req[5:])
    assert ok.events() == [ReqPages(4096, 4096, "pc.ram")]


def test_encoder_shortcut_is_encode_rp() -> None:
    enc = ReturnPathEncoder()
    assert enc.page_request("pc.ram", 8192, 4096) == encode_rp(ReqPages(8192, 4096, "pc.ram"))
    assert enc.page_request("pc.ram", 4096, 4096) == encode_rp(ReqPages(4096, 4096))
    assert enc.page_request("vga", 0, 4096) == encode_rp(ReqPages(0, 4096, "vga"))
    enc.reset()
    assert enc.page_request("vga", 0, 4096) == encode_rp(ReqPages(0, 4096, "vga"))
    with pytest.raises(ValueError, match="longer than 255"):
        enc.page_request("x" * 256, 0, 4096)
