"""Unit tests per record type: encode, decode back, and bad input naming its offset."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from livemig import vmstate
from livemig.errors import StreamError
from livemig.testing import CodecPair, decode_all, encode_all, flatten, random_pages
from livemig.wire import (
    Configuration,
    Encoder,
    Eof,
    Header,
    MultifdInit,
    MultifdPacket,
    Packaged,
    Ping,
    Pong,
    PostcopyAdvise,
    PostcopyRamDiscard,
    RamBlockInfo,
    RamEos,
    RamPages,
    RamSetup,
    RamXbzrlePage,
    RamZeroPages,
    RecvBitmap,
    RecvBitmapReply,
    ReqPages,
    ReturnPathDecoder,
    ReturnPathEncoder,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    Shut,
    UnknownLayoutError,
    find_vmdesc,
    xbzrle,
)

FIXTURES = Path("/work/shared/fixtures/qemu")
TIMER = vmstate.vmsd("timer", 2, [vmstate.i64("ticks"), vmstate.u32("flags", array_len=2)])
BLOCKS = (RamBlockInfo("pc.ram", 1 << 20), RamBlockInfo("pc.bios", 1 << 16))


def ram_stream(pages: np.ndarray, offsets: np.ndarray) -> list:
    return [
        Header(),
        Configuration("pc-i440fx-7.2"),
        SectionStart(2, "ram", 0, 4),
        RamSetup(sum(b.used_length for b in BLOCKS), BLOCKS),
        RamEos(),
        SectionFooter(2),
        SectionPart(2),
        RamPages("pc.ram", offsets, pages),
        RamZeroPages("pc.bios", np.array([0, 4096], np.uint64)),
        RamEos(),
        SectionFooter(2),
        SectionFull(0, "timer", 0, 2, {"ticks": -5, "flags": [1, 2]}),
        Eof(),
    ]


def test_annotated_stream_start_matches_reference() -> None:
    # §3.8: header, configuration and the START of "ram" as QEMU 7.2 wrote them.
    enc = Encoder()
    data = b"".join(
        enc.to_bytes(e)
        for e in (Header(), Configuration("pc-i440fx-7.2"), SectionStart(2, "ram", 0, 4))
    )
    assert data == bytes.fromhex("5145564d00000003070000000d") + b"pc-i440fx-7.2" + (
        bytes.fromhex("010000000203") + b"ram" + bytes.fromhex("0000000000000004")
    )


def test_ram_stream_roundtrip_and_continue() -> None:
    pages = random_pages(3)
    offsets = np.array([0, 8192, 4096], np.uint64)
    events = ram_stream(pages, offsets)
    data = encode_all(events, devices={"timer": TIMER})
    got = decode_all(data, devices={"timer": TIMER})
    assert flatten(got) == flatten(events)
    # Only the first page record names its block; the next ones carry CONTINUE (0x28).
    assert data.count(b"\x06pc.ram") == 2  # setup list + first page
    first = data.index(b"\x06pc.ram", data.index(b"\x06pc.ram") + 1)
    assert struct.unpack(">Q", data[first - 8 : first])[0] & 0x3FF == 0x08


def test_page_data_is_a_view_not_a_copy() -> None:
    pages = random_pages(40)
    data = encode_all(
        ram_stream(pages, np.arange(40, dtype=np.uint64) * 4096), devices={"timer": TIMER}
    )
    runs = [e for e in decode_all(data, devices={"timer": TIMER}) if isinstance(e, RamPages)]
    assert [len(r) for r in runs] == [1, 39]
    assert runs[1].data.base is not None and not runs[1].data.flags.owndata
    assert bytes(runs[1].page(0)) == pages[1].tobytes()


def test_capabilities_change_the_block_list() -> None:
    blocks = (
        RamBlockInfo("pc.ram", 1 << 20, mr_addr=0),
        RamBlockInfo("pc.bios", 1 << 16, mr_addr=0xFFFC0000),
    )
    events = [
        Header(),
        Configuration("pc", capabilities=("x-ignore-shared",), uuid=bytes(range(16))),
        SectionStart(2, "ram", 0, 4),
        RamSetup((1 << 20) + (1 << 16), blocks),
        RamEos(),
        SectionFooter(2),
        Eof(),
    ]
    assert decode_all(encode_all(events)) == events  # the decoder learns it from the config


def test_commands_roundtrip() -> None:
    nested = encode_all([Ping(3)])
    events = [
        Header(),
        PostcopyAdvise(0x1000, 0x1000),
        PostcopyAdvise(),
        PostcopyRamDiscard("pc.ram", ((0x10000, 0xFF0000),)),
        Packaged(nested),
        RecvBitmap("pc.ram"),
        Ping(7),
        Eof(),
    ]
    assert decode_all(encode_all(events)) == events
    assert decode_all(nested, with_header=False) == [Ping(3)]


def test_discard_bytes_match_reference() -> None:
    raw = Encoder().to_bytes(PostcopyRamDiscard("pc.ram", ((0x10000, 0xFF0000),)))
    assert raw == bytes.fromhex("080006001900") + b"\x06pc.ram\x00" + struct.pack(
        ">QQ", 0x10000, 0xFF0000
    )


@pytest.mark.parametrize(
    ("data", "offset", "text"),
    [
        (b"QEVX\x00\x00\x00\x03", 0, "bad magic"),
        (b"QEVM\x00\x00\x00\x02", 4, "version 2"),
        (b"QEVM\x00\x00\x00\x03\x42", 8, "unknown section type byte 0x42"),
        (b"QEVM\x00\x00\x00\x03\x08\x00\x63\x00\x00", 9, "unknown command number 99"),
        (b"QEVM\x00\x00\x00\x03\x08\x00\x02\x00\x04\x00", 8, "truncated"),
        (b"QEVM\x00\x00\x00\x03\x00\x06\x00\x00\x00\x01x", 14, "not valid JSON"),
        (b"QEVM\x00\x00\x00\x03\x01\x00\x00\x00\x01\x03r\xffm", 13, "not valid text"),
    ],
)
def test_bad_input_names_offset(data: bytes, offset: int, text: str) -> None:
    with pytest.raises(StreamError) as info:
        decode_all(data)
    assert info.value.offset == offset
    assert text in str(info.value)


def test_page_outside_block_rejected() -> None:
    events = ram_stream(random_pages(1), np.array([1 << 20], np.uint64))
    data = encode_all(events, devices={"timer": TIMER})
    with pytest.raises(StreamError, match=r"outside RAM block 'pc\.ram'"):
        decode_all(data, devices={"timer": TIMER})


def test_length_field_is_capped() -> None:
    data = b"QEVM\x00\x00\x00\x03\x00\x06\xff\xff\xff\xff"
    with pytest.raises(StreamError, match="limit") as info:
        decode_all(data, eof=False, max_record_size=1 << 20)
    assert info.value.offset == 9


def test_unknown_device_layout_is_an_error() -> None:
    data = encode_all([Header(), SectionFull(0, "timer", 0, 2, {"ticks": 1, "flags": [0, 0]})],
                      devices={"timer": TIMER})  # fmt: skip
    with pytest.raises(UnknownLayoutError, match="timer"):
        decode_all(data)


def test_codec_pair_sends_in_order() -> None:
    pair = CodecPair()
    assert pair.send(Header(), Ping(1)) == [Header(), Ping(1)]
    assert pair.send(Eof()) == [Eof()]
    assert pair.close() == [] and pair.decoder.finished


def test_return_path_roundtrip_and_bytes() -> None:
    enc = ReturnPathEncoder()
    msgs = [
        Pong(1),
        ReqPages(0xC0000, 0x1000, "pc.ram"),
        ReqPages(0x47000, 0x1000, "pc.ram"),
        RecvBitmapReply("pc.ram", bytes(8)),
        Shut(0),
    ]
    wire = [enc.send(m) for m in msgs]
    assert wire[0] == bytes.fromhex("0002000400000001")
    assert wire[2] == bytes.fromhex("0004000c00000000000470000000" + "1000")
    dec = ReturnPathDecoder()
    for i in range(0, len(b"".join(wire))):
        dec.receive_data(b"".join(wire)[i : i + 1])
    assert dec.events() == msgs
    bad = ReturnPathDecoder()
    bad.receive_data(bytes.fromhex("0063000000"))
    with pytest.raises(StreamError, match="unknown return-path"):
        bad.events()


def test_multifd_headers() -> None:
    init = MultifdInit(bytes(16), 1)
    assert MultifdInit.unpack(init.pack()) == init and len(init.pack()) == 64
    pkt = MultifdPacket(1, 7, "pc.ram", np.array([0, 4096], np.uint64), 2)
    raw = pkt.pack()
    assert len(raw) == 1344
    back = MultifdPacket.unpack(raw, block_sizes={"pc.ram": 8192})
    assert (back.packet_num, back.ramblock, back.offsets.tolist()) == (7, "pc.ram", [0, 4096])
    with pytest.raises(StreamError, match="magic"):
        MultifdPacket.unpack(bytes(1344))
    with pytest.raises(StreamError, match="magic"):
        MultifdInit.unpack(bytes(64))


def test_xbzrle_reference_bytes_and_roundtrip() -> None:
    old = np.zeros(4096, np.uint8)
    new = old.copy()
    new[0] = 0x18
    assert xbzrle.encode(old, new) == bytes.fromhex("000118")
    rng = np.random.default_rng(1)
    new = old.copy()
    new[rng.integers(0, 4096, 50)] = rng.integers(1, 256, 50)
    enc = xbzrle.encode(old, new)
    page = bytearray(4096)
    xbzrle.decode(enc, page)
    assert page == new.tobytes()
    assert xbzrle.encode(old, rng.integers(1, 256, 4096, dtype=np.uint8)) is None
    rec = RamXbzrlePage("pc.ram", 0x10000, enc)
    events = [Header(), SectionStart(2, "ram", 0, 4), RamSetup(1 << 20, BLOCKS[:1]), rec]
    assert decode_all(encode_all(events), eof=False)[-1] == rec
    with pytest.raises(StreamError):
        xbzrle.decode(b"\x00\x05\x01", bytearray(4096))


def test_vmdesc_roundtrip_through_encoder() -> None:
    enc = Encoder(devices={"timer": TIMER})
    state = {"ticks": 3, "flags": [4, 5]}
    data = b"".join(
        enc.to_bytes(e) for e in (Header(), SectionFull(0, "timer", 0, 2, state), Eof())
    )
    data += enc.to_bytes(enc.vmdesc())
    desc = find_vmdesc(data)
    assert desc is not None and desc["devices"][0]["name"] == "timer"
    assert b'"page_size": 4096, "devices": ' in data  # QEMU's separators
    got = decode_all(data, vmdesc=desc)
    assert got[1] == SectionFull(0, "timer", 0, 2, state)


def test_vmdesc_describes_the_configuration_as_qemu_does() -> None:
    """QEMU 9.0+ writes a "configuration" key first in its vmdesc; without it QEMU's
    analyze-migration.py read a livemig stream's configuration by the pre-9.0 rule and failed
    on its capabilities subsection ('Unknown section type: 5'). The expected entries are what
    QEMU 10.0.2 wrote for pc-i440fx-10.0, with mapped-ram and without capabilities."""
    from livemig.wire.vmdesc import configuration_entry

    name = {"name": "name", "type": "buffer", "size": 14}
    head = [{"name": "len", "type": "uint32", "size": 4}, name]
    assert configuration_entry("pc-i440fx-10.0") == {
        "vmsd_name": "configuration", "version": 1, "fields": head}  # fmt: skip
    assert configuration_entry("pc-i440fx-10.0", ("mapped-ram",)) == {
        "vmsd_name": "configuration", "version": 1, "fields": head,
        "subsections": [{"vmsd_name": "configuration/capabilities", "version": 1, "fields": [
            {"name": "caps_count", "type": "uint32", "size": 4},
            {"name": "capabilities", "type": "capability", "size": 11}]}],
    }  # fmt: skip
    two = configuration_entry("m", ("x-ignore-shared", "mapped-ram"))["subsections"][0]
    assert two["fields"][1] == {"name": "capabilities", "array_len": 2, "type": "capability",
                                "size": 16}  # fmt: skip
    enc = Encoder()
    data = b"".join(enc.to_bytes(e) for e in (Header(), Configuration("livemig-x86_64", ()),
                                              Eof()))  # fmt: skip
    data += enc.to_bytes(enc.vmdesc())
    desc = find_vmdesc(data)
    assert desc is not None and list(desc) == ["configuration", "page_size", "devices"]
    caps = desc["configuration"]["subsections"][0]
    assert caps["fields"] == [{"name": "caps_count", "type": "uint32", "size": 4}]


def test_fixture_hashes_via_cli(tmp_path: Path) -> None:
    meta = json.loads((FIXTURES / "fixtures.json").read_text())
    for entry in meta.values():
        proc = subprocess.run(
            [sys.executable, "-m", "livemig", "analyze", str(FIXTURES / entry["stream"]),
             "--dump-ram", str(tmp_path), "--json"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["vmdesc"] and report["devices"]
        for name, block in entry["ram_blocks"].items():
            digest = hashlib.sha256((tmp_path / name.replace("/", "_")).read_bytes()).hexdigest()
            assert digest == block["sha256"], name


def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    data = (FIXTURES / "pc-64m-bios.mig").read_bytes()
    bad = tmp_path / "cut.mig"
    bad.write_bytes(data[:5000])
    proc = subprocess.run(
        [sys.executable, "-m", "livemig", "analyze", str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "offset" in lines[0] and "Traceback" not in proc.stderr


def test_postcopy_page_size_and_mapped_ram_layouts() -> None:
    # postcopy-ram: a hugepage block carries its page size in the setup list.
    blocks = (RamBlockInfo("pc.ram", 1 << 21, page_size=1 << 21), RamBlockInfo("rom", 4096))
    events = [Header(), SectionStart(2, "ram", 0, 4), RamSetup((1 << 21) + 4096, blocks)]
    opts = {"capabilities": ("postcopy-ram",), "block_page_sizes": {"pc.ram": 1 << 21}}
    raw = encode_all(events, **opts)
    assert decode_all(raw, eof=False, **opts) == events
    # mapped-ram: each block header is followed by a jump past the block's page region.
    head = encode_all([Header(), SectionStart(2, "ram", 0, 4)])
    word = struct.pack(">Q", 4096 | 0x04)
    pages_offset = len(head) + 8 + 4 + 8 + 28 + 100
    entry = b"\x03rom" + struct.pack(">QIQQQ", 4096, 1, 4096, pages_offset - 50, pages_offset)
    raw = head + word + entry + bytes(100 + 4096) + struct.pack(">Q", 0x10)
    got = decode_all(raw, eof=False, capabilities=("mapped-ram",))
    assert got[-2].blocks[0].mapped_ram == (1, 4096, pages_offset - 50, pages_offset)
    assert isinstance(got[-1], RamEos)


def test_single_page_records_match_the_batch_encoder() -> None:
    """``encode_page``/``encode_zero_page`` (post-copy's one-page path) write the same bytes
    as the batch encoder: the first record names its block, the next ones CONTINUE it."""
    pages = random_pages(2)
    one, batch = Encoder(), Encoder()
    got = b"".join(
        bytes(b)
        for bufs in (
            one.encode_page("pc.ram", 4096, memoryview(pages[0])),
            one.encode_zero_page("pc.ram", 0),
            one.encode_page("pc.ram", 8192, memoryview(pages[1])),
        )
        for b in bufs
    )
    want = b"".join(
        bytes(b)
        for bufs in (
            batch.encode_pages("pc.ram", np.array([4096], np.uint64), pages[:1]),
            batch.encode_zero_pages("pc.ram", np.array([0], np.uint64)),
            batch.encode_pages("pc.ram", np.array([8192], np.uint64), pages[1:]),
        )
        for b in bufs
    )
    assert got == want and one.bytes_sent == batch.bytes_sent == len(want)
    with pytest.raises(ValueError, match="aligned"):
        one.encode_page("pc.ram", 100, memoryview(pages[0]))
