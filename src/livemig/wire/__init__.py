"""Sans-IO codec of QEMU's migration stream (QEMU 7.2 .. master layouts; reference §1-§8).

No sockets, threads or files in here: bytes in, events out; events in, buffers out.

Decoding the main stream::

    dec = Decoder(vmdesc=find_vmdesc(whole_stream))   # or devices={"idstr": VMStateDescription}
    dec.receive_data(chunk)            # any split; b"" = end of input
    while (ev := dec.next_event()) is not NEED_DATA:
        ...                            # Header, Configuration, SectionStart, RamPages, ...

``Decoder(*, with_header=True, page_size=4096, capabilities=(), block_page_sizes=None,
host_page_size=4096, block_sizes=None, devices=None, vmdesc=None, max_record_size=32 MiB,
section_footers=True, start_offset=0)``

- ``with_header=False`` for a PACKAGED nested stream or a postcopy recovery channel; such a
  stream may end at any record boundary.
- ``capabilities``: layout-changing ones: ``x-ignore-shared`` (mr_addr in the block list; also
  switched on by the stream's configuration section), ``postcopy-ram`` (per-block page size for
  blocks whose ``block_page_sizes`` differ from ``host_page_size``), ``mapped-ram`` (header per
  block, then the decoder skips to the end of the block's page region).
- ``block_sizes``: idstr -> used_length; filled from the setup block list when it is decoded.
  A page record for an unknown block or an offset outside its block is a ``StreamError``.
- ``devices``: idstr -> ``VMStateDescription`` (our own devices); ``vmdesc``: a parsed vmdesc
  (QEMU streams). A FULL section whose layout neither gives raises ``UnknownLayoutError``.
- ``max_record_size`` caps the bytes buffered for one incomplete record.
- Every error is a ``StreamError`` (or subclass) whose ``offset`` is the absolute stream offset.
- ``dec.offset``: absolute offset of the next unparsed byte; ``dec.finished``: clean end seen;
  ``dec.last_block``: the block CONTINUE records refer to.

Page events are batches of one block: ``RamPages(block, offsets: uint64 ndarray, data: uint8
ndarray (n, page_size))`` whose ``data`` is a strided view into the received bytes (no copy;
``ev.page(i)`` is a memoryview) and ``RamZeroPages(block, offsets, fill)``. One decoded event can
hold up to 16384 pages. The other RAM events: ``RamSetup(total, blocks: tuple[RamBlockInfo])``,
``RamXbzrlePage``, ``RamCompressedPage``, ``RamEos``, ``RamMultifdFlush``, ``RamHook``.

Sections: ``SectionStart/SectionPart/SectionEnd`` (RAM payload events follow, then ``RamEos``
and ``SectionFooter``), ``SectionFull(section_id, idstr, instance_id, version_id, state)`` (the
footer is checked), ``Eof``, ``VMDescription(description)``. Commands: ``OpenReturnPath``,
``Ping``, ``PostcopyAdvise``, ``PostcopyListen``, ``PostcopyRun``, ``PostcopyRamDiscard``,
``Packaged(data)`` (feed ``data`` to ``Decoder(with_header=False)``), ``EnableColo``,
``PostcopyResume``, ``RecvBitmap``, ``SwitchoverStart``.

Encoding::

    enc = Encoder(devices={...}, capabilities=...)
    bufs = enc.send(Header()) + enc.send(Configuration("pc-i440fx-7.2")) + ...
    bufs += enc.encode_pages("pc.ram", offsets, ram_view)   # headers + memoryview slices
    bufs += enc.encode_zero_pages("pc.ram", zero_offsets)   # one buffer
    sock.sendmsg(bufs[:1024])                                # IOV_MAX chunks

``Encoder.send(event) -> list[bytes | memoryview]``; it tracks the last sent block (CONTINUE),
``reset_block()`` forgets it; ``vmdesc()`` returns the VMDESCRIPTION event for the FULL
sections sent so far; ``bytes_sent`` counts output.

Return path: ``ReturnPathDecoder`` / ``ReturnPathEncoder`` (``encode_rp``) with ``Shut``,
``Pong``, ``ReqPages`` (block None = REQ_PAGES), ``RecvBitmapReply``, ``ResumeAck``,
``SwitchoverAck`` and livemig's ``XError`` and ``XColo``. COLO checkpoints after a replicated
guest's first migration: ``wire.colo`` (``CheckpointReader``, QEMU's ``ColoMessage``). Multifd: ``MultifdInit``, ``MultifdPacket`` (``wire.multifd``). XBZRLE:
``xbzrle.encode(old, new)`` / ``xbzrle.decode(encoded, page)``. vmdesc: ``build_vmdesc``,
``find_vmdesc``, ``descriptions_from_vmdesc`` (``wire.vmdesc``).
"""

from livemig.wire import xbzrle
from livemig.wire.constants import Command, ReturnPathType
from livemig.wire.decoder import Decoder, UnknownLayoutError
from livemig.wire.encoder import Encoder, cstr
from livemig.wire.events import (
    NEED_DATA,
    Configuration,
    EnableColo,
    Eof,
    Event,
    Header,
    OpenReturnPath,
    Packaged,
    Ping,
    PostcopyAdvise,
    PostcopyListen,
    PostcopyRamDiscard,
    PostcopyResume,
    PostcopyRun,
    RamBlockInfo,
    RamCompressedPage,
    RamEos,
    RamHook,
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
    VMDescription,
)
from livemig.wire.multifd import MultifdInit, MultifdPacket
from livemig.wire.returnpath import (
    Pong,
    RecvBitmapReply,
    ReqPages,
    ResumeAck,
    ReturnPathDecoder,
    ReturnPathEncoder,
    RPMessage,
    Shut,
    SwitchoverAck,
    XColo,
    XError,
    encode_rp,
)
from livemig.wire.vmdesc import build_vmdesc, descriptions_from_vmdesc, find_vmdesc

__all__ = [
    "NEED_DATA",
    "Command",
    "Configuration",
    "Decoder",
    "EnableColo",
    "Encoder",
    "Eof",
    "Event",
    "Header",
    "MultifdInit",
    "MultifdPacket",
    "OpenReturnPath",
    "Packaged",
    "Ping",
    "Pong",
    "PostcopyAdvise",
    "PostcopyListen",
    "PostcopyRamDiscard",
    "PostcopyResume",
    "PostcopyRun",
    "RPMessage",
    "RamBlockInfo",
    "RamCompressedPage",
    "RamEos",
    "RamHook",
    "RamMultifdFlush",
    "RamPages",
    "RamSetup",
    "RamXbzrlePage",
    "RamZeroPages",
    "RecvBitmap",
    "RecvBitmapReply",
    "ReqPages",
    "ResumeAck",
    "ReturnPathDecoder",
    "ReturnPathEncoder",
    "ReturnPathType",
    "SectionEnd",
    "SectionFooter",
    "SectionFull",
    "SectionPart",
    "SectionStart",
    "Shut",
    "SwitchoverAck",
    "SwitchoverStart",
    "UnknownLayoutError",
    "VMDescription",
    "XColo",
    "XError",
    "build_vmdesc",
    "cstr",
    "descriptions_from_vmdesc",
    "encode_rp",
    "find_vmdesc",
    "xbzrle",
]
