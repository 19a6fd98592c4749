"""Properties: encodable event sequences decode back to themselves (whole, byte by byte, with
trailing garbage); every truncation is a clean StreamError; a bounded fuzz run of mutated
fixture and livemig streams raises only StreamError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig import vmstate
from livemig.errors import StreamError
from livemig.testing import decode_all, encode_all, flatten
from livemig.wire import (
    Configuration,
    Eof,
    Header,
    OpenReturnPath,
    Ping,
    PostcopyAdvise,
    PostcopyListen,
    PostcopyRamDiscard,
    PostcopyRun,
    RamBlockInfo,
    RamEos,
    RamMultifdFlush,
    RamPages,
    RamSetup,
    RamXbzrlePage,
    RamZeroPages,
    RecvBitmap,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    SwitchoverStart,
    find_vmdesc,
)

PS = 4096
BLOCKS = (RamBlockInfo("pc.ram", 16 * PS), RamBlockInfo("/rom@etc/acpi/tables", 4 * PS))
DEV = vmstate.vmsd(
    "dev",
    1,
    [vmstate.u8("a"), vmstate.u64("b", array_len=2)],
    subsections=[vmstate.vmsd("dev/extra", 1, [vmstate.u16("c")])],
)
OPTS = {"devices": {"dev": DEV}}

blocks = st.sampled_from(BLOCKS)


@st.composite
def page_batch(draw: st.DrawFn) -> object:
    block = draw(blocks)
    npages = block.used_length // PS
    idx = draw(st.lists(st.integers(0, npages - 1), min_size=1, max_size=5))
    offsets = np.array(idx, np.uint64) * PS
    if draw(st.booleans()):
        return RamZeroPages(block.idstr, offsets)
    seed = draw(st.integers(0, 3))
    data = np.random.default_rng(seed).integers(0, 256, (len(idx), PS), dtype=np.uint8)
    return RamPages(block.idstr, offsets, data)


ram_record = st.one_of(
    page_batch(),
    st.builds(
        RamXbzrlePage,
        st.just("pc.ram"),
        st.integers(0, 15).map(lambda i: i * PS),
        st.binary(min_size=2, max_size=40),
    ),
    st.just(RamMultifdFlush()),
)
command = st.one_of(
    st.just(OpenReturnPath()),
    st.builds(Ping, st.integers(0, 2**32 - 1)),
    st.just(PostcopyAdvise(PS, PS)),
    st.just(PostcopyListen()),
    st.just(PostcopyRun()),
    st.just(SwitchoverStart()),
    st.builds(RecvBitmap, st.sampled_from(["pc.ram", "x"])),
    st.builds(
        PostcopyRamDiscard,
        st.just("pc.ram"),
        st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8)), max_size=3).map(
            lambda r: tuple((a * PS, b * PS) for a, b in r)
        ),
    ),
)
device = st.builds(
    lambda a, b, c: SectionFull(
        9, "dev", 0, 1, {"a": a, "b": b, **({"dev/extra": {"c": c}} if c is not None else {})}
    ),
    st.integers(0, 255),
    st.lists(st.integers(0, 2**64 - 1), min_size=2, max_size=2),
    st.none() | st.integers(0, 65535),
)


@st.composite
def streams(draw: st.DrawFn) -> list:
    events: list = [Header(), Configuration("pc-i440fx-7.2")]
    events += draw(st.lists(command, max_size=3))
    events += [SectionStart(2, "ram", 0, 4), RamSetup(20 * PS, BLOCKS), RamEos(), SectionFooter(2)]
    for _ in range(draw(st.integers(0, 3))):
        events.append(draw(st.sampled_from([SectionPart(2), SectionEnd(2)])))
        events += draw(st.lists(ram_record, max_size=4))
        events += [RamEos(), SectionFooter(2)]
        events += draw(st.lists(command | device, max_size=2))
    events.append(Eof())
    return events


@settings(max_examples=60)
@given(streams(), st.integers(1, 700))
def test_roundtrip_whole_chunked_bytewise(events: list, chunk: int) -> None:
    data = encode_all(events, **OPTS)
    want = flatten(events)
    assert flatten(decode_all(data, **OPTS)) == want
    assert flatten(decode_all(data, chunk, **OPTS)) == want
    if len(data) < 6000:
        assert flatten(decode_all(data, 1, **OPTS)) == want


@settings(max_examples=40)
@given(streams(), st.binary(min_size=1, max_size=8))
def test_trailing_garbage_is_a_stream_error(events: list, garbage: bytes) -> None:
    data = encode_all(events, **OPTS)
    if garbage[0] == 0x06:
        garbage = b"\x07" + garbage[1:]  # a VMDESCRIPTION byte would be a (bad) trailer
    with pytest.raises(StreamError) as info:
        decode_all(data + garbage, **OPTS)
    assert info.value.offset is not None and info.value.offset >= len(data) - 1


@settings(max_examples=30)
@given(streams(), st.data())
def test_every_truncation_is_a_clean_error(events: list, data: st.DataObject) -> None:
    raw = encode_all(events, **OPTS)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(StreamError) as info:
        decode_all(raw[:cut], **OPTS)
    assert info.value.offset is not None and info.value.offset <= cut


def test_all_truncations_of_a_small_stream() -> None:
    events = [Header(), Configuration("pc"), SectionStart(2, "ram", 0, 4),
              RamSetup(20 * PS, BLOCKS), RamEos(), SectionFooter(2), SectionPart(2),
              RamZeroPages("pc.ram", np.array([0, PS], np.uint64)), RamEos(), SectionFooter(2),
              SectionFull(9, "dev", 0, 1, {"a": 1, "b": [2, 3], "dev/extra": {"c": 4}}),
              Eof()]  # fmt: skip
    raw = encode_all(events, **OPTS)
    for cut in range(len(raw)):
        with pytest.raises(StreamError):
            decode_all(raw[:cut], **OPTS)


FIXTURE = Path("/work/shared/fixtures/qemu/pc-64m-bios.mig")


def _decode_or_stream_error(data: bytes, chunk: int | None = None, **opts: object) -> None:
    try:
        decode_all(data, chunk, **opts)  # type: ignore[arg-type]
    except StreamError:
        pass


@pytest.mark.timeout(60)
@settings(max_examples=150)
@given(st.data())
def test_fuzz_mutated_streams(data: st.DataObject) -> None:
    # Mutations of the real fixture (the RAM part and the device part) and of a livemig
    # stream: any outcome but StreamError (or a hang, or a huge allocation) is a bug.
    raw = FIXTURE.read_bytes()
    vmdesc = find_vmdesc(raw)
    head = raw[:6000]
    dev_start = raw.rfind(b"\x04\x00\x00\x00\x00\x05timer")
    tail = raw[dev_start - 200 :] if dev_start > 0 else raw[-6000:]
    ours = encode_all(data.draw(streams()), **OPTS)
    bases = [(head, {}), (raw[:200] + tail, {"vmdesc": vmdesc}), (ours, OPTS)]
    base, opts = bases[data.draw(st.integers(0, 2), label="base")]
    buf = bytearray(base)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        if op == "flip":
            buf[pos] ^= data.draw(st.integers(1, 255))
        elif op == "set":
            buf[pos] = data.draw(st.sampled_from([0x00, 0x05, 0x06, 0x7E, 0xFF]))
        elif op == "cut":
            del buf[pos : pos + data.draw(st.integers(1, 16))]
        else:
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    _decode_or_stream_error(bytes(buf), max_record_size=1 << 20, **opts)
    _decode_or_stream_error(bytes(buf), 997, max_record_size=1 << 20, **opts)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=600), st.sampled_from(BLOCKS))
def test_postcopy_discards_are_the_commands_send_makes(bits: list, block: RamBlockInfo) -> None:
    """``Encoder.postcopy_discards`` (the switch's discards, made at once) is byte for byte
    one ``send(PostcopyRamDiscard)`` per run of 12 ranges, a range per run of set pages, and
    decodes back to those commands."""
    from livemig.migration.postcopy_source import discard_bufs, discard_ranges
    from livemig.savevm.ram import page_runs
    from livemig.wire.encoder import Encoder

    bitmap = np.array(bits, dtype=bool)
    ranges = [(s * PS, n * PS) for s, n in page_runs(np.flatnonzero(bitmap))]
    commands = [PostcopyRamDiscard(block.idstr, tuple(ranges[i : i + 12]))
                for i in range(0, len(ranges), 12)]  # fmt: skip
    want = b"".join(Encoder().to_bytes(c) for c in commands)
    got_ranges = discard_ranges(bitmap)
    assert [tuple(r) for r in got_ranges.tolist()] == ranges
    enc = Encoder()
    got = b"".join(enc.postcopy_discards(block.idstr, got_ranges)) if ranges else b""
    assert got == want
    assert enc.bytes_sent == len(want)
    if commands:
        header = encode_all([Header(3)])
        assert decode_all(header + got, eof=False) == [Header(3), *commands]

    class Mig:  # what discard_bufs reads of an OutgoingMigration
        encoder = Encoder()
        checks = None

        class ram:
            blocks = [block]

    assert b"".join(discard_bufs(Mig, {block.idstr: bitmap})) == want
