"""The sans-IO QMP stream decoder: whole input, one byte at a time, trailing garbage, fuzz."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from livemig.qmp.codec import (
    END,
    NEED_DATA,
    Message,
    Overflow,
    ParseFailure,
    QMPDecoder,
    encode_message,
)


def drain(dec: QMPDecoder) -> list[object]:
    out = []
    while (ev := dec.next_event()) is not NEED_DATA:
        out.append(ev)
        if ev is END or isinstance(ev, Overflow):
            break
    return out


def decode_whole(data: bytes, **kw: int) -> list[object]:
    dec = QMPDecoder(**kw)
    dec.receive_data(data)
    dec.receive_data(b"")
    return drain(dec)


def decode_bytewise(data: bytes, **kw: int) -> list[object]:
    dec = QMPDecoder(**kw)
    out: list[object] = []
    for i in range(len(data)):
        dec.receive_data(data[i : i + 1])
        out += drain(dec)
        if out and (out[-1] is END or isinstance(out[-1], Overflow)):
            return out
    dec.receive_data(b"")
    return out + drain(dec)


def values(events: list[object]) -> list[object]:
    return [
        e.value if isinstance(e, Message) else "END" if e is END else type(e).__name__
        for e in events
    ]


STREAM = (
    b'{"execute":"qmp_capabilities"}{"execute": "x", "arguments": {"s": "}{][\\"\\\\"}}'
    b'\r\n  [1, [2, {"a": "b"}]] "top" 17 true null\n{"k": "\xc3\xa9"}'
)
EXPECTED = [
    {"execute": "qmp_capabilities"},
    {"execute": "x", "arguments": {"s": '}{]["\\'}},
    [1, [2, {"a": "b"}]],
    "top",
    17,
    True,
    None,
    {"k": "é"},
    "END",
]


@pytest.mark.parametrize("decode", [decode_whole, decode_bytewise])
def test_stream_of_values(decode) -> None:
    assert values(decode(STREAM)) == EXPECTED


@pytest.mark.parametrize("decode", [decode_whole, decode_bytewise])
def test_single_quoted_strings_as_qemu_takes_them(decode) -> None:
    """QEMU's JSON parser takes 'single-quoted' strings (and \\' in either kind): what one
    types at a socat. livemig refused them as a parse error."""
    stream = (b"{'execute': 'qmp_capabilities'}{'a': 'it\\'s \"q\" }{', \"b\": \"x'y\\'\", "
              b"'c': 'd\\\"e\\\\'} 'top'")  # fmt: skip
    assert values(decode(stream)) == [
        {"execute": "qmp_capabilities"},
        {"a": 'it\'s "q" }{', "b": "x'y'", "c": 'd"e\\'},
        "top",
        "END",
    ]


def test_offsets_are_absolute() -> None:
    events = decode_whole(b'  {"a": 1}\n{"b": 2}')
    assert [e.offset for e in events if isinstance(e, Message)] == [2, 11]


@pytest.mark.parametrize("decode", [decode_whole, decode_bytewise])
@pytest.mark.parametrize(
    ("bad", "desc"),
    [
        (b'{"execute": foo}', "JSON parse error, expecting value"),
        (b'{"a": 1,}', "JSON parse error"),
        (b'{"a": NaN}', "JSON parse error, invalid keyword 'NaN'"),
        (b'{"a": 1, "a": 2}', "JSON parse error, duplicate key 'a'"),
        (b'{"a": "\xff"}', "JSON parse error, invalid UTF-8"),
        (b"}", "JSON parse error, unexpected '}'"),
        (b"bogus ", "JSON parse error, invalid keyword 'bogus'"),
        (b'{"a" "b"}', "JSON parse error, expecting ':' delimiter"),
    ],
)
def test_malformed_value_then_recovery(decode, bad: bytes, desc: str) -> None:
    events = decode(bad + b'{"execute": "ok"}')
    failures = [e for e in events if isinstance(e, ParseFailure)]
    assert len(failures) == 1 and failures[0].desc.startswith(desc), failures
    assert values(events)[-2:] == [{"execute": "ok"}, "END"]


@pytest.mark.parametrize("decode", [decode_whole, decode_bytewise])
def test_trailing_garbage_after_good_message(decode) -> None:
    events = decode(b'{"execute": "a"} ]]')
    assert values(events) == [{"execute": "a"}, "ParseFailure", "ParseFailure", "END"]


def test_incomplete_message_needs_data_then_dropped_at_eof() -> None:
    dec = QMPDecoder()
    dec.receive_data(b'{"execute": "quer')
    assert dec.next_event() is NEED_DATA
    dec.receive_data(b"")
    assert dec.next_event() is END


def test_number_at_end_waits_for_delimiter() -> None:
    dec = QMPDecoder()
    dec.receive_data(b"12")
    assert dec.next_event() is NEED_DATA
    dec.receive_data(b"3 ")
    assert dec.next_event() == Message(123, 0)


@pytest.mark.parametrize("decode", [decode_whole, decode_bytewise])
def test_oversized_message_is_fatal(decode) -> None:
    big = b'{"execute": "x", "pad": "' + b"a" * 2000 + b'"}'
    events = decode(b'{"execute": "first"}' + big + b'{"execute": "after"}', max_message_size=1000)
    assert values(events)[0] == {"execute": "first"}
    assert isinstance(events[1], Overflow)
    assert "exceeds the 1000-byte limit" in events[1].desc
    assert len(events) == 2  # nothing after an overflow


def test_many_small_messages_in_one_chunk_are_not_an_overflow() -> None:
    msgs = b"".join(b'{"execute": "m%d"}' % i for i in range(200))
    events = decode_whole(msgs, max_message_size=100)
    assert len([e for e in events if isinstance(e, Message)]) == 200


def test_nesting_limit() -> None:
    deep = b"[" * 40 + b"]" * 40
    events = decode_whole(deep + b"{}", max_nesting=32)
    assert isinstance(events[0], ParseFailure) and "nesting" in events[0].desc
    assert events[1] == Message({}, 80)


def test_unclosed_deep_nesting_hits_size_cap_not_recursion() -> None:
    events = decode_whole(b"[" * 5000, max_message_size=4096)
    assert isinstance(events[0], Overflow)


def test_encode_matches_qemu_layout() -> None:
    assert encode_message({"return": {}}) == b'{"return": {}}\r\n'
    assert encode_message({"s": "é"}) == b'{"s": "\\u00e9"}\r\n'


@given(st.binary(max_size=300))
def test_any_bytes_decode_or_fail_cleanly(data: bytes) -> None:
    for decode in (decode_whole, decode_bytewise):
        events = decode(data, max_message_size=200)
        assert events, "at least END or Overflow"
        assert events[-1] is END or isinstance(events[-1], Overflow)
        assert all(isinstance(e, Message | ParseFailure) for e in events[:-1])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=15,
)


@given(st.lists(st.dictionaries(st.text(max_size=8), json_values), max_size=5), st.data())
def test_objects_survive_any_split(objs: list[dict], data: st.DataObject) -> None:
    stream = b"".join(json.dumps(o, separators=(",", ":")).encode() for o in objs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    dec = QMPDecoder()
    got: list[object] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        if cut > prev:  # b"" would mean end of input
            dec.receive_data(stream[prev:cut])
        prev = cut
        got += drain(dec)
    dec.receive_data(b"")
    got += drain(dec)
    assert values(got) == [*objs, "END"]
