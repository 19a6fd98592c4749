"""The packed encoding of a VMStateDescription (runs of scalar fields, one ``struct`` each) is
byte for byte the field-by-field one, and fails with the same error (the field named) on any
bad value: random layouts, values in and out of range, wrong array lengths, missing fields."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig import vmstate as vs

SCALARS = {
    vs.u8: (0, 255), vs.u16: (0, 0xFFFF), vs.u32: (0, 0xFFFF_FFFF),
    vs.u64: (0, 2**64 - 1), vs.i32: (-(2**31), 2**31 - 1), vs.i64: (-(2**63), 2**63 - 1),
}  # fmt: skip
INNER = vs.vmsd("inner", 1, [vs.u32("a"), vs.u64("b", array_len=2), vs.buffer("c", 3)])


@st.composite
def layout_and_values(draw: st.DrawFn) -> tuple[vs.VMStateDescription, dict[str, Any]]:
    fields: list[vs.Field] = []
    values: dict[str, Any] = {}
    bad = draw(st.booleans())

    def scalar_value(lo: int, hi: int) -> int:
        if bad and draw(st.integers(0, 9)) == 0:
            return draw(st.sampled_from([lo - 1, hi + 1]))
        return draw(st.integers(lo, hi))

    for i in range(draw(st.integers(0, 12))):
        name = f"f{i}"
        kind = draw(st.sampled_from(["scalar", "scalar", "scalar", "bool", "float", "buffer",
                                     "struct", "vbuffer"]))  # fmt: skip
        alen = draw(st.sampled_from([None, None, 0, 1, 3]))
        n = 1 if alen is None else alen
        if kind == "scalar":
            make = draw(st.sampled_from(list(SCALARS)))
            fields.append(make(name, array_len=alen))
            items = [scalar_value(*SCALARS[make]) for _ in range(n)]
        elif kind == "bool":
            fields.append(vs.boolean(name, array_len=alen))
            items = [draw(st.booleans()) for _ in range(n)]
        elif kind == "float":
            fields.append(vs.float64(name, array_len=alen))
            items = [draw(st.floats(allow_nan=False)) for _ in range(n)]
        elif kind == "buffer":
            fields.append(vs.buffer(name, 4, array_len=alen))
            items = [draw(st.binary(min_size=3 if bad else 4, max_size=4)) for _ in range(n)]
        elif kind == "struct":
            fields.append(vs.struct_field(name, INNER, array_len=alen))
            items = [{"a": scalar_value(0, 0xFFFF_FFFF), "b": [1, 2], "c": b"xyz"}
                     for _ in range(n)]  # fmt: skip
        else:
            fields.append(vs.u32(name + "_len"))
            raw = draw(st.binary(max_size=8))
            values[name + "_len"] = len(raw) + (1 if bad and draw(st.booleans()) else 0)
            fields.append(vs.vbuffer(name, name + "_len", 8))
            values[name] = raw
            continue
        value: Any = items[0] if alen is None else items
        if alen is not None and bad and draw(st.integers(0, 9)) == 0:
            value = [*items, items[0] if items else 0]  # one element too many
        if not (bad and draw(st.integers(0, 19)) == 0):  # now and then a field left out
            values[name] = value
    sub = vs.vmsd("dev/sub", 1, [vs.u16("s")])
    if draw(st.booleans()):
        values["dev/sub"] = {"s": scalar_value(0, 0xFFFF)}
    return vs.vmsd("dev", 1, fields, subsections=[sub]), values


def outcome(fn: Any) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except (KeyError, ValueError, TypeError) as exc:
        return type(exc).__name__, str(exc)


@settings(max_examples=400, deadline=None)
@given(layout_and_values())
def test_packed_encoding_is_the_field_by_field_one(
    case: tuple[vs.VMStateDescription, dict],
) -> None:
    desc, values = case

    def slow() -> bytes:
        out = bytearray()
        desc._encode_fields(out, values)
        return bytes(out)

    assert outcome(lambda: desc.encode(values)) == outcome(slow)


def test_a_bad_value_is_named_as_before() -> None:
    desc = vs.vmsd("dev", 1, [vs.u8("a"), vs.u16("b", array_len=2), vs.u32("c")])
    with pytest.raises(ValueError, match=r"dev\.b: expected 2 elements"):
        desc.encode({"a": 1, "b": [1, 2, 3], "c": 0})
    with pytest.raises(ValueError, match=r"dev\.c: 4294967296 does not fit uint32"):
        desc.encode({"a": 1, "b": [1, 2], "c": 2**32})
    with pytest.raises(KeyError, match=r"dev: no value for field 'c'"):
        desc.encode({"a": 1, "b": [1, 2]})
    assert desc.encode({"a": 1, "b": [2, 3], "c": 4}) == bytes.fromhex("010002000300000004")
