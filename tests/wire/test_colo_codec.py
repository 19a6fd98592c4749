"""COLO checkpoints on the wire: QEMU's message words, a checkpoint made of the normal stream
encoder's pieces read back whole (in one piece, byte by byte, in random splits), nothing
returned before a checkpoint's last byte, truncations and garbage refused as StreamError, the
return path's XColo message, and the decoder's stop-at-EOF with its unparsed rest."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig import vmstate
from livemig.errors import StreamError
from livemig.wire import Decoder, Encoder, ReturnPathDecoder, XColo, encode_rp
from livemig.wire import colo as C
from livemig.wire import events as E
from livemig.wire.constants import ReturnPathType

PS = 4096
BLOCK = "pc.ram"
SIZE = 64 * PS
DEV = vmstate.vmsd("dev", 1, [vmstate.u32("a"), vmstate.u64("b")])
RAM_SID = 2


def _live(n: int) -> Decoder:
    return Decoder(with_header=False, block_sizes={BLOCK: SIZE}, sections={RAM_SID: "ram"},
                   stop_at_eof=True, start_offset=n)  # fmt: skip


def _devices(n: int) -> Decoder:
    return Decoder(with_header=False, devices={"dev": DEV}, stop_at_eof=True, start_offset=n)


def reader(limit: int = 1 << 24) -> C.CheckpointReader:
    return C.CheckpointReader(_live, _devices, limit)


def checkpoint(pages: dict[int, int], zeros: list[int], a: int, live_only: bool = False) -> bytes:
    """One checkpoint as the primary sends it, built from the normal encoder (``live_only``:
    up to the end of its live state)."""
    enc = Encoder(devices={"dev": DEV})
    live: list = enc.send(E.SectionEnd(RAM_SID))
    if pages:
        offs = np.array(sorted(pages), np.uint64) * PS
        data = np.stack([np.full(PS, pages[k], np.uint8) for k in sorted(pages)])
        live += enc.encode_pages(BLOCK, offs, data)
    if zeros:
        live += enc.encode_zero_pages(BLOCK, np.array(zeros, np.uint64) * PS)
    live += enc.send(E.RamEos()) + enc.send(E.SectionFooter(RAM_SID)) + enc.send(E.Eof())
    if live_only:
        return C.checkpoint_head() + b"".join(bytes(b) for b in live)
    dev = b"".join(bytes(b) for b in enc.send(E.SectionFull(3, "dev", 0, 1, {"a": a, "b": 7})))
    dev += enc.to_bytes(E.Eof())
    return (C.checkpoint_head() + b"".join(bytes(b) for b in live)
            + C.device_state_head(len(dev)) + dev)  # fmt: skip


def _pages(cp: C.Checkpoint) -> dict[int, int]:
    out = {}
    for ev in cp.live:
        if isinstance(ev, E.RamPages):
            for off, row in zip(ev.offsets.tolist(), ev.data, strict=True):
                out[off // PS] = int(row[0])
        elif isinstance(ev, E.RamZeroPages):
            out.update({off // PS: 0 for off in ev.offsets.tolist()})
    return out


def test_message_words_are_qemus() -> None:
    assert C.message(C.ColoMessage.CHECKPOINT_REQUEST) == b"\0\0\0\x01"
    assert C.device_state_head(5) == b"\0\0\0\x04" + struct.pack(">Q", 5)
    assert [m.value for m in C.ColoMessage][:7] == list(range(7))
    assert not C.is_qemu_message(C.ColoMessage.X_HEARTBEAT) and C.is_qemu_message(6)


def test_checkpoints_and_heartbeats_in_one_piece_and_byte_by_byte() -> None:
    wire = (checkpoint({1: 5, 2: 6}, [9], 11) + C.message(C.ColoMessage.X_HEARTBEAT)
            + checkpoint({}, [], 12) + C.message(C.ColoMessage.X_EXIT))  # fmt: skip
    for split in (len(wire), 1, 7):
        r = reader()
        got = []
        for i in range(0, len(wire), split):
            r.receive_data(wire[i : i + split])
            got += r.events()
        kinds = [type(e).__name__ for e in got]
        assert kinds == ["Checkpoint", "Heartbeat", "Checkpoint", "Exit"], split
        first, second = got[0], got[2]
        assert isinstance(first, C.Checkpoint) and isinstance(second, C.Checkpoint)
        assert (first.number, second.number) == (1, 2)
        assert _pages(first) == {1: 5, 2: 6, 9: 0} and _pages(second) == {}
        assert [e.state["a"] for e in first.devices if isinstance(e, E.SectionFull)] == [11]
        assert first.size + second.size + 8 == len(wire)


def test_nothing_before_the_last_byte_then_eof_inside_is_an_error() -> None:
    wire = checkpoint({3: 1}, [], 1)
    r = reader()
    r.receive_data(wire[:-1])
    assert r.events() == [] and r.in_checkpoint
    r.receive_data(b"")
    with pytest.raises(StreamError, match="inside checkpoint 1"):
        r.events()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 900), min_size=1, max_size=20), st.integers(0, 255))
def test_random_splits(cuts: list[int], fill: int) -> None:
    wire = checkpoint({k: fill for k in range(0, 64, 5)}, [1, 2, 3], fill)
    r = reader()
    got: list = []
    pos = 0
    for c in cuts:
        r.receive_data(wire[pos : pos + c])
        pos += c
        got += r.events()
        if pos >= len(wire):
            break
    r.receive_data(wire[pos:])
    got += r.events()
    assert len(got) == 1 and _pages(got[0]) == {**{k: fill for k in range(0, 64, 5)},
                                                 1: 0, 2: 0, 3: 0}  # fmt: skip


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (b"\0\0\0\x09", "unknown COLO message"),
        (b"\0\0\0\x03", "outside a checkpoint"),
        (b"\0\0\0\x01\0\0\0\x04", "VMSTATE_SIZE where VMSTATE_SEND"),
        (C.checkpoint_head() + b"\x03\0\0\0\x07", "never started"),  # an unknown section
        (C.checkpoint_head() + b"\x00" + b"\0\0\0\x05", "VMSTATE_RECEIVED where VMSTATE_SIZE"),
        (C.checkpoint_head() + b"\x00" + C.device_state_head(1) + b"\x01", "device state"),
    ],
)
def test_malformed(wire: bytes, match: str) -> None:
    r = reader()
    with pytest.raises(StreamError, match=match):
        r.receive_data(wire)
        r.events()


def test_device_state_with_trailing_bytes_or_pages_is_refused() -> None:
    r = reader()
    bad = C.checkpoint_head() + b"\x00" + C.device_state_head(2) + b"\x00\x00"
    r.receive_data(bad)
    with pytest.raises(StreamError, match="does not end with its EOF"):
        r.events()
    live_with_device = (
        C.checkpoint_head()
        + bytes(
            Encoder(devices={"dev": DEV}).to_bytes(E.SectionFull(3, "dev", 0, 1, {"a": 1, "b": 2}))
        )
        + b"\x00"
    )
    r = C.CheckpointReader(
        lambda n: Decoder(with_header=False, devices={"dev": DEV}, stop_at_eof=True,
                          start_offset=n), _devices, 1 << 20)  # fmt: skip
    r.receive_data(live_with_device)
    with pytest.raises(StreamError, match="RAM records only"):
        r.events()


def test_a_checkpoint_past_the_limit_is_refused_before_it_completes() -> None:
    wire = checkpoint({k: 1 for k in range(32)}, [], 1)
    r = reader(limit=16 * PS)
    r.receive_data(wire[:100])
    r.events()
    with pytest.raises(StreamError, match="exceeds"):
        r.receive_data(wire[100:])


def test_decoder_stop_at_eof_leaves_the_rest() -> None:
    dec = Decoder(with_header=False, stop_at_eof=True, start_offset=10)
    dec.receive_data(b"\x00rest")
    assert isinstance(dec.next_event(), E.Eof)
    assert dec.next_event() is E.NEED_DATA
    assert dec.offset == 11 and dec.unparsed() == b"rest" and dec.offset == 15


def test_x_colo_on_the_return_path() -> None:
    msgs = [XColo(C.ColoMessage.CHECKPOINT_READY, 0, "tcp:127.0.0.1:7001"),
            XColo(C.ColoMessage.VMSTATE_LOADED, 12345678901), XColo(C.ColoMessage.X_HEARTBEAT)]  # fmt: skip
    wire = b"".join(encode_rp(m) for m in msgs)
    assert int.from_bytes(wire[:2], "big") == ReturnPathType.X_COLO == 0x4C02
    dec = ReturnPathDecoder()
    for i in range(len(wire)):
        dec.receive_data(wire[i : i + 1])
    assert dec.events() == msgs
    dec = ReturnPathDecoder()
    dec.receive_data(int(ReturnPathType.X_COLO).to_bytes(2, "big") + b"\0\x02ab")
    with pytest.raises(StreamError, match="X_COLO"):
        dec.events()


def test_a_checkpoint_broken_off_for_x_exit_is_dropped_whole() -> None:
    """The primary ends the live state early (EOS, footer, EOF) and sends X_EXIT where
    VMSTATE_SIZE would be: no checkpoint comes out, only the exit, naming the one dropped."""
    wire = (checkpoint({}, [], 2) + checkpoint({1: 5}, [], 1, live_only=True)
            + C.message(C.ColoMessage.X_EXIT))  # fmt: skip
    r = reader()
    r.receive_data(wire)
    got = r.events()
    assert [type(e).__name__ for e in got] == ["Checkpoint", "Exit"]
    assert got[1].abandoned == 2 and not r.in_checkpoint  # type: ignore[union-attr]


def test_a_checksummed_stream_checkpoint_ends_with_x_checksum() -> None:
    """With livemig's checksums every checkpoint ends with X_CHECKSUM (records, digest); one
    that ends without it is refused, and the next checkpoint's head is no substitute."""
    one = checkpoint({1: 7}, [2], 5)
    checked = C.CheckpointReader(_live, _devices, 1 << 24, checked=True)
    checked.receive_data(one + C.checksum_tail(4, 0xABCDEF))
    (cp,) = checked.events()
    assert isinstance(cp, C.Checkpoint) and cp.checksum == (4, 0xABCDEF)
    assert cp.size == len(one) + 16
    bare = C.CheckpointReader(_live, _devices, 1 << 24, checked=True)
    bare.receive_data(one + one)
    with pytest.raises(StreamError, match="ends without its X_CHECKSUM"):
        bare.events()
    plain = reader()  # a stream without checksums: no X_CHECKSUM expected, none accepted
    plain.receive_data(one + C.checksum_tail(4, 0))
    with pytest.raises(StreamError, match="X_CHECKSUM outside a checkpoint"):
        plain.events()
