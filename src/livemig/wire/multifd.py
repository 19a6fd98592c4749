"""Multifd channel handshake and RAM packet headers (§8), as ``struct.Struct`` layouts.

Initial packet, first 64 bytes on every multifd connection::

    0      4        8                24   25                        64
    +------+--------+----------------+----+-------------------------+
    |magic |version | uuid (16)      | id | zero (39)               |
    +------+--------+----------------+----+-------------------------+
    magic 0x11223344, version 1, all big-endian

RAM packet header (1344 bytes with pages_alloc = 128; QEMU sizes every packet of a migration so,
``MULTIFD_PACKET_SIZE`` / page size slots, even a 9.0+ SYNC packet whose pages_alloc is 0)::

    0      4        8      12           16            20               24
    +------+--------+------+------------+-------------+----------------+
    |magic |version |flags |pages_alloc |normal_pages |next_packet_size|
    +------+--------+------+------------+-------------+----------------+
    24            32          36            64                     320
    +-------------+-----------+-------------+----------------------+
    |packet_num   |zero_pages |reserved (28)|ramblock name (256,NUL)|
    +-------------+-----------+-------------+----------------------+
    320 ... 320 + 8 * pages_alloc: be64 offsets (normal first, then zero; rest 0)

then the payload: normal_pages x page_size raw bytes (compression "none"). A zeroed buffer never
decodes: the magic is checked first (reserved zero value).

livemig's checksum trailer (only between livemig peers, with ``x-checksums``): a packet with
flag ``MULTIFD_FLAG_X_CHECKSUM`` and no pages, numbered like the others, closes the job sent
before it on its channel. Its reserved bytes hold ``be32 records, be64 digest`` (then 16 zero
bytes) and its offset area the excluded-pages bitmap (``livemig.savevm.checksum``)::

    36        40          48            64
    +---------+-----------+-------------+
    |records  |digest     |zero (16)    |
    +---------+-----------+-------------+
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from livemig.errors import StreamError

MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
MULTIFD_FLAG_SYNC = 0x01
MULTIFD_FLAG_COMPRESSION_MASK = 0x3E
MULTIFD_FLAG_ZLIB = 0x02
MULTIFD_FLAG_ZSTD = 0x04
MULTIFD_FLAG_X_CHECKSUM = 0x100  # livemig's; QEMU uses bits 0-5
PAGES_ALLOC = 128

INIT_PACKET = struct.Struct(">II16sB39x")
PACKET_HEADER = struct.Struct(">IIIIIIQI28x256s")
CHECKSUM_PACKET = struct.Struct(">IIIIIIQIIQ16x256s")  # the reserved bytes: records, digest
assert INIT_PACKET.size == 64 and PACKET_HEADER.size == 320 == CHECKSUM_PACKET.size


@dataclass(frozen=True)
class MultifdInit:
    """The 64-byte handshake: source VM UUID and this channel's id."""

    uuid: bytes
    channel_id: int

    def pack(self) -> bytes:
        if len(self.uuid) != 16:
            raise ValueError("a VM UUID is 16 bytes")
        return INIT_PACKET.pack(MULTIFD_MAGIC, MULTIFD_VERSION, self.uuid, self.channel_id)

    @classmethod
    def unpack(cls, data: bytes | memoryview, offset: int = 0) -> MultifdInit:
        if len(data) < INIT_PACKET.size:
            raise StreamError(f"multifd initial packet needs 64 bytes, got {len(data)}", offset)
        magic, version, uuid, cid = INIT_PACKET.unpack_from(data)
        _check(magic, version, offset)
        return cls(uuid, cid)


def _check(magic: int, version: int, offset: int) -> None:
    if magic != MULTIFD_MAGIC:
        raise StreamError(f"multifd magic 0x{magic:08x}, expected 0x{MULTIFD_MAGIC:08x}", offset)
    if version != MULTIFD_VERSION:
        raise StreamError(f"multifd version {version}, expected {MULTIFD_VERSION}", offset + 4)


@dataclass(frozen=True, eq=False)
class MultifdPacket:
    """A RAM packet header; ``offsets`` holds the normal then the zero page offsets."""

    flags: int
    packet_num: int
    ramblock: str
    offsets: np.ndarray
    normal_pages: int
    zero_pages: int = 0
    pages_alloc: int = PAGES_ALLOC
    next_packet_size: int = 0

    @property
    def header_size(self) -> int:
        return PACKET_HEADER.size + 8 * self.pages_alloc

    def pack(self, page_size: int = 4096) -> bytes:
        n = self.normal_pages + self.zero_pages
        if n != len(self.offsets) or n > self.pages_alloc:
            raise ValueError("offsets do not match normal_pages + zero_pages <= pages_alloc")
        name = self.ramblock.encode()
        if len(name) > 255:
            raise ValueError("RAMBlock name longer than 255 bytes")
        size = self.next_packet_size or self.normal_pages * page_size
        head = PACKET_HEADER.pack(
            MULTIFD_MAGIC,
            MULTIFD_VERSION,
            self.flags,
            self.pages_alloc,
            self.normal_pages,
            size,
            self.packet_num,
            self.zero_pages,
            name,
        )
        offs = np.zeros(self.pages_alloc, ">u8")
        offs[:n] = self.offsets
        return head + offs.tobytes()

    @classmethod
    def unpack(
        cls,
        data: bytes | memoryview,
        offset: int = 0,
        block_sizes: dict[str, int] | None = None,
        page_size: int = 4096,
    ) -> MultifdPacket:
        if len(data) < PACKET_HEADER.size:
            raise StreamError("multifd packet header truncated", offset)
        (magic, version, flags, alloc, normal, size, num, zero, raw) = PACKET_HEADER.unpack_from(
            data
        )
        _check(magic, version, offset)
        # QEMU 9.0+ sends SYNC packets with no page slots (pages_alloc 0, the packet still
        # its full size on the wire); a packet that carries pages needs slots for them
        if (alloc == 0 and normal + zero) or alloc > 1 << 16 or normal + zero > alloc:
            raise StreamError(
                f"multifd packet: {normal}+{zero} pages with pages_alloc {alloc}", offset + 12
            )
        if len(data) < PACKET_HEADER.size + 8 * alloc:
            raise StreamError("multifd packet offsets truncated", offset + PACKET_HEADER.size)
        try:
            name = raw.split(b"\0", 1)[0].decode()
        except UnicodeDecodeError:
            raise StreamError("multifd RAMBlock name is not text", offset + 64) from None
        offs = np.frombuffer(data, ">u8", normal + zero, PACKET_HEADER.size).astype(np.uint64)
        if block_sizes is not None and normal + zero:
            bsize = block_sizes.get(name)
            if bsize is None:
                raise StreamError(f"multifd packet for unknown RAMBlock {name!r}", offset + 64)
            # an OR of all offsets has a low bit set iff one of them is not page-aligned
            if int(offs.max()) + page_size > bsize or int(np.bitwise_or.reduce(offs)) % page_size:
                raise StreamError(f"multifd page offset outside block {name!r}", offset + 320)
        return cls(flags, num, name, offs, normal, zero, alloc, size)
