"""The events of the main migration stream: what the decoder yields and the encoder takes.

Every event is a frozen dataclass. Page-carrying events hold views into the decoder's input
(``memoryview`` / numpy views over immutable ``bytes``), never copies: they stay valid as long
as the event is referenced. RAM page records come in batches (``RamPages``, ``RamZeroPages``):
one event for a run of records of one block, which is what makes decoding fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


class _NeedData:
    """Sentinel type of ``NEED_DATA``."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


class Event:
    """Base class of every main-stream event."""


# -- stream framing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Header(Event):
    """Magic ``QEVM`` and version 3."""

    version: int = 3


@dataclass(frozen=True)
class Configuration(Event):
    """The configuration section (type 0x07): machine type and its optional subsections."""

    machine_type: str
    capabilities: tuple[str, ...] | None = None
    target_page_bits: int | None = None
    uuid: bytes | None = None


@dataclass(frozen=True)
class SectionStart(Event):
    """SECTION_START header of an iterative device (``ram``); its payload events follow."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True)
class SectionPart(Event):
    section_id: int


@dataclass(frozen=True)
class SectionEnd(Event):
    section_id: int


@dataclass(frozen=True)
class SectionFooter(Event):
    """0x7E + section id, closing a START/PART/END section (checked by the decoder)."""

    section_id: int


@dataclass(frozen=True)
class SectionFull(Event):
    """A complete non-iterative device section, payload decoded through its vmstate layout.

    ``state`` is the ``VMStateDescription.decode`` dict (subsections by name). The footer has
    been checked by the decoder; the encoder writes it.
    """

    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    state: dict[str, Any] = field(compare=True, hash=False)


@dataclass(frozen=True)
class Eof(Event):
    """QEMU_VM_EOF: end of the device stream (or of a package)."""


@dataclass(frozen=True)
class VMDescription(Event):
    """The JSON trailer after EOF (parsed)."""

    description: dict[str, Any] = field(hash=False)


# -- commands (type 0x08) ---------------------------------------------------------------------


@dataclass(frozen=True)
class OpenReturnPath(Event):
    pass


@dataclass(frozen=True)
class Ping(Event):
    value: int


@dataclass(frozen=True)
class PostcopyAdvise(Event):
    """Both None = the 0-length form (dirty-bitmaps postcopy only)."""

    page_size_summary: int | None = None
    target_page_size: int | None = None


@dataclass(frozen=True)
class PostcopyListen(Event):
    pass


@dataclass(frozen=True)
class PostcopyRun(Event):
    pass


@dataclass(frozen=True)
class PostcopyRamDiscard(Event):
    """Byte ranges ``(start, length)`` of one block to drop (at most 12 per command)."""

    block: str
    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Packaged(Event):
    """PACKAGED: a nested stream without header, to be decoded with ``with_header=False``."""

    data: bytes | memoryview = field(hash=False)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Packaged) and bytes(self.data) == bytes(other.data)


@dataclass(frozen=True)
class EnableColo(Event):
    pass


@dataclass(frozen=True)
class PostcopyResume(Event):
    pass


@dataclass(frozen=True)
class RecvBitmap(Event):
    """Command asking the destination for its received bitmap of ``block``."""

    block: str


@dataclass(frozen=True)
class SwitchoverStart(Event):
    pass


# -- RAM section records ----------------------------------------------------------------------


@dataclass(frozen=True)
class RamBlockInfo:
    """One entry of the setup block list."""

    idstr: str
    used_length: int
    page_size: int | None = None  # only with postcopy-ram and a non-base page size
    mr_addr: int | None = None  # only with x-ignore-shared
    # mapped-ram: (version, page_size, bitmap_offset, pages_offset)
    mapped_ram: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class RamSetup(Event):
    """MEM_SIZE record: total bytes and the block list."""

    total: int
    blocks: tuple[RamBlockInfo, ...]


def _pages_eq(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a, b))


@dataclass(frozen=True, eq=False)
class RamPages(Event):
    """A run of normal PAGE records of one block.

    ``offsets`` is a uint64 array of byte offsets in the block; ``data`` a uint8 array of shape
    ``(n, page_size)`` viewing the page bytes where they lie in the input (strided, no copy).
    """

    block: str
    offsets: np.ndarray
    data: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets)

    def page(self, i: int) -> memoryview:
        """Page ``i`` as a memoryview (no copy)."""
        return memoryview(self.data[i])

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, RamPages)
            and self.block == other.block
            and _pages_eq(self.offsets, other.offsets)
            and _pages_eq(self.data, other.data)
        )

    def __repr__(self) -> str:
        return f"RamPages(block={self.block!r}, n={len(self.offsets)})"


@dataclass(frozen=True, eq=False)
class RamZeroPages(Event):
    """A run of ZERO records of one block (``fill`` is the fill byte, 0 except in old QEMU)."""

    block: str
    offsets: np.ndarray
    fill: int = 0

    def __len__(self) -> int:
        return len(self.offsets)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, RamZeroPages)
            and self.block == other.block
            and self.fill == other.fill
            and _pages_eq(self.offsets, other.offsets)
        )

    def __repr__(self) -> str:
        return f"RamZeroPages(block={self.block!r}, n={len(self.offsets)}, fill={self.fill})"


@dataclass(frozen=True, eq=False)
class RamXbzrlePage(Event):
    """An XBZRLE record: ``data`` is the encoded delta (see ``wire.xbzrle``)."""

    block: str
    offset: int
    data: bytes | memoryview

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, RamXbzrlePage)
            and (self.block, self.offset) == (other.block, other.offset)
            and bytes(self.data) == bytes(other.data)
        )


@dataclass(frozen=True, eq=False)
class RamCompressedPage(Event):
    """A COMPRESS_PAGE record (QEMU <= 9.0 ``compress``): one zlib stream inflating to a page."""

    block: str
    offset: int
    data: bytes | memoryview

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, RamCompressedPage)
            and (self.block, self.offset) == (other.block, other.offset)
            and bytes(self.data) == bytes(other.data)
        )


@dataclass(frozen=True)
class RamEos(Event):
    """EOS word: the end of a RAM section's payload."""


@dataclass(frozen=True)
class RamMultifdFlush(Event):
    """MULTIFD_FLUSH word (8.1+): multifd barrier."""


@dataclass(frozen=True)
class RamHook(Event):
    """HOOK word (RDMA registration point)."""
