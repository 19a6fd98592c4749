"""The checksum codec (``livemig.savevm.checksum``) without machines: what the source computes
from guest RAM right after a send equals what the destination computes from the pages it
placed; any change to a page, an offset, a record kind or a device section is caught and named;
exclusions leave pages pending until a checked copy comes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.savevm import checksum as CK

NPAGES = 64


class Block:
    def __init__(self, idstr: str, fill: int = 0) -> None:
        self.idstr = idstr
        self.npages = NPAGES
        self.array = np.random.default_rng(fill).integers(0, 256, NPAGES * 4096, dtype=np.uint8)
        self.view = memoryview(self.array)


def _unit(parts: list[tuple[str, int, list[int]]], data: dict | None = None) -> CK.Unit:
    u = CK.Unit()
    for block, kind, idx in parts:
        u.add(block, kind, np.array(idx), None if data is None else data.get((block, idx[0])))
    return u


PARTS = [("pc.ram", CK.KIND_ZERO, [3, 4]), ("pc.ram", CK.KIND_DATA, [5, 6, 7, 20]),
         ("rom", CK.KIND_DATA, [0])]  # fmt: skip


def _checks() -> tuple[CK.SourceChecks, CK.IncomingChecks, list[Block]]:
    src_blocks = [Block("pc.ram", 1), Block("rom", 2)]
    dst_blocks = [Block("pc.ram", 1), Block("rom", 2)]  # the pages as received
    none = lambda block, idx: np.zeros(len(idx), bool)  # noqa: E731
    return (CK.SourceChecks(src_blocks, written=none, live=lambda: False),
            CK.IncomingChecks(dst_blocks), dst_blocks)  # fmt: skip


def test_source_and_destination_agree() -> None:
    src, dst, _ = _checks()
    st_ = src.section_state(_unit(PARTS))
    dst.unit = _unit(PARTS)
    dst.verify(st_["records"], st_["digest"], st_["excluded"], 0)
    assert dst.units == 1 and not dst.unit


def test_a_changed_page_is_named() -> None:
    src, dst, blocks = _checks()
    st_ = src.section_state(_unit(PARTS))
    blocks[0].array[6 * 4096 + 17] ^= 0x10  # one bit of page 6, as received
    dst.unit = _unit(PARTS)
    with pytest.raises(CK.ChecksumError, match=r"RAM block 'pc.ram' pages 0x3-0x14") as e:
        dst.verify(st_["records"], st_["digest"], st_["excluded"], 1234)
    assert e.value.offset == 1234 and "corrupted" in str(e.value)


@pytest.mark.parametrize("change", ["offset", "kind", "block", "count"])
def test_metadata_changes_are_caught(change: str) -> None:
    src, dst, _ = _checks()
    st_ = src.section_state(_unit(PARTS))
    parts = [list(p) for p in PARTS]
    if change == "offset":
        parts[1][2] = [5, 6, 7, 21]  # a record naming another page (its data may be equal)
    elif change == "kind":
        parts[0][1] = CK.KIND_FILL
    elif change == "block":
        parts[2][0] = "pc.ram"
    else:
        parts[1][2] = [5, 6, 7]
    dst.unit = _unit([tuple(p) for p in parts])  # type: ignore[misc]
    with pytest.raises(CK.ChecksumError):
        dst.verify(st_["records"], st_["digest"], st_["excluded"], 0)


def test_device_sections_are_covered() -> None:
    src, dst, _ = _checks()
    u = CK.Unit()
    u.add_device("cpu", 0, 1, b"\x01\x02")
    st_ = src.section_state(u)
    dst.unit.add_device("cpu", 0, 1, b"\x01\x03")
    with pytest.raises(CK.ChecksumError, match="1 device section"):
        dst.verify(st_["records"], st_["digest"], st_["excluded"], 0)


def test_copies_hash_like_ram() -> None:
    """XBZRLE sends from a copy: the digest of the copy is the digest of the same bytes in RAM."""
    src, dst, blocks = _checks()
    copy = blocks[0].array.reshape(-1, 4096)[[5, 6, 7, 20]].copy()
    st_ = src.section_state(_unit(PARTS, {("pc.ram", 5): copy}))
    dst.unit = _unit(PARTS)
    dst.verify(st_["records"], st_["digest"], st_["excluded"], 0)


def test_pages_written_meanwhile_are_excluded_then_pending() -> None:
    blocks = [Block("pc.ram", 1), Block("rom", 2)]
    written = {"pc.ram": {6}}
    calls = []

    def query(block: str, idx: np.ndarray) -> np.ndarray:
        calls.append(block)
        return np.array([i in written.get(block, ()) for i in idx.tolist()])

    src = CK.SourceChecks(blocks, written=query, live=lambda: True)
    unit = _unit(PARTS)
    st_ = src.section_state(unit)
    assert src.excluded_pages == 1 and calls
    dst_blocks = [Block("pc.ram", 1), Block("rom", 2)]
    dst_blocks[0].array[6 * 4096] ^= 1  # the page changed while it was sent: not checked
    dst = CK.IncomingChecks(dst_blocks)
    dst.unit = _unit(PARTS)
    dst.verify(st_["records"], st_["digest"], st_["excluded"], 0)
    with pytest.raises(CK.ChecksumError, match=r"1 page\(s\) of RAM block 'pc.ram' \(pages 0x6"):
        dst.check_nothing_pending(0, "at EOF")
    # a later, checked copy of page 6 clears it
    dst.unit = _unit([("pc.ram", CK.KIND_DATA, [6])])
    st2 = CK.SourceChecks([*dst_blocks], written=lambda b, i: np.zeros(len(i), bool),
                          live=lambda: False).section_state(_unit([("pc.ram", CK.KIND_DATA, [6])]))  # fmt: skip
    dst.verify(st2["records"], st2["digest"], st2["excluded"], 0)
    dst.check_nothing_pending(0, "at EOF")


def test_a_page_that_keeps_changing_is_sent_again() -> None:
    """A guest writing new pages of the unit at every look: all excluded and made dirty."""
    blocks = [Block("pc.ram", 1), Block("rom", 2)]
    n = iter(range(100))
    requeued = []

    def query(block: str, idx: np.ndarray) -> np.ndarray:
        k = next(n)
        return np.arange(len(idx)) <= k  # one more page written at each look

    src = CK.SourceChecks(blocks, written=query, live=lambda: True,
                          requeue=lambda b, i: requeued.append((b, list(i))))  # fmt: skip
    pages = list(range(10, 30))
    _, ex = src.close(_unit([("pc.ram", CK.KIND_DATA, pages)]))
    # every page excluded, and the ones the tracker did not report are made dirty by hand
    assert ex is not None and ex.all()
    assert requeued == [("pc.ram", pages)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=8))
def test_digest_does_not_depend_on_how_records_are_split(cuts: list[int]) -> None:
    """The destination sees a run of records as the decoder splits it; the source as it encoded
    it: the digest is the same."""
    block = Block("pc.ram", 3)
    idx = np.arange(40)
    whole = CK.Unit()
    whole.add("pc.ram", CK.KIND_DATA, idx)
    split = CK.Unit()
    at = 0
    for c in cuts:
        if at >= len(idx):
            break
        split.add("pc.ram", CK.KIND_DATA, idx[at : at + c])
        split.feed({"pc.ram": block.view})  # as the destination feeds after each event
        at += c
    split.add("pc.ram", CK.KIND_DATA, idx[at:])
    views, order = {"pc.ram": block.view}, {"pc.ram": 0}
    assert split.digest(views, order) == whole.digest(views, order)


def test_bitmaps_round_trip() -> None:
    flags = np.zeros(CK.MAX_DATA, bool)
    flags[[0, 7, 8, CK.MAX_DATA - 1]] = True
    raw = CK.pack_bits(flags, CK.BITMAP_BYTES)
    assert len(raw) == CK.MAX_DATA // 8 and (CK.unpack_bits(raw, CK.MAX_DATA) == flags).all()
    assert CK.pack_bits(None, 32) == bytes(32)
