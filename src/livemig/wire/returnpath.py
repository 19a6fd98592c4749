"""Return-path messages (destination -> source, §6): a small sans-IO decoder and encoder.

Each message is ``be16 type, be16 length, payload`` (payload at most 512 bytes); RECV_BITMAP is
followed, outside its message, by ``be64 size, bitmap bytes, be64 0x0123456789ABCDEF``.

``XError`` is livemig's own (type ``X_ERROR``): the destination's reason for failing, sent
before SHUT(1) to a source that announced it reads it (a PING of ``X_FEATURES_PING`` in the
stream); QEMU's return path has no such message. Payload: one flags byte (bit 0: the guest
never ran on this destination, so the source may run its own copy again even after a
post-copy switch), then the reason as UTF-8 text, cut to fit the 512-byte payload.

``XColo`` is livemig's too (type ``X_COLO``): a COLO message of a standby (``wire/colo.py``):
be32 message number (QEMU's COLOMessage, or livemig's X_HEARTBEAT), be64 value (the checkpoint
it is about), then optional UTF-8 text (CHECKPOINT_READY: where the standby serves clients
after a failover).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from livemig.errors import StreamError
from livemig.wire.constants import MAX_RP_PAYLOAD, RECV_BITMAP_ENDING, ReturnPathType
from livemig.wire.events import NEED_DATA, _NeedData

_HEAD = struct.Struct(">HH")
_REQ = struct.Struct(">HHQI")  # REQ_PAGES: header, start, length
_REQ_ID = struct.Struct(">HHQIB")  # REQ_PAGES_ID: the same, then the block name's length
_REQ_PAGES = int(ReturnPathType.REQ_PAGES)
_REQ_PAGES_ID = int(ReturnPathType.REQ_PAGES_ID)


class RPMessage:
    """Base of return-path messages."""


@dataclass(frozen=True)
class Shut(RPMessage):
    status: int = 0


@dataclass(frozen=True)
class Pong(RPMessage):
    value: int


@dataclass(frozen=True)
class ReqPages(RPMessage):
    """A page request; ``block`` set = REQ_PAGES_ID, None = REQ_PAGES (same block as before)."""

    start: int
    length: int
    block: str | None = None


@dataclass(frozen=True)
class RecvBitmapReply(RPMessage):
    """The destination's received bitmap of ``block`` (little-endian 64-bit words)."""

    block: str
    bitmap: bytes


@dataclass(frozen=True)
class ResumeAck(RPMessage):
    value: int = 1


@dataclass(frozen=True)
class SwitchoverAck(RPMessage):
    pass


@dataclass(frozen=True)
class XError(RPMessage):
    """livemig's own: why the destination failed (see the module docstring)."""

    reason: str
    not_started: bool = False  # the guest never ran on the destination


@dataclass(frozen=True)
class XColo(RPMessage):
    """livemig's own: a standby's COLO message (see the module docstring)."""

    msg: int
    value: int = 0
    text: str = ""


_XCOLO = struct.Struct(">IQ")


def _cut_utf8(text: str, limit: int) -> bytes:
    raw = text.encode()
    if len(raw) <= limit:
        return raw
    return raw[: limit - 3].decode(errors="ignore").encode() + b"..."


def encode_rp(msg: RPMessage) -> bytes:
    """Wire form of one return-path message."""
    T = ReturnPathType
    if isinstance(msg, Shut):
        return _HEAD.pack(T.SHUT, 4) + struct.pack(">I", msg.status)
    if isinstance(msg, Pong):
        return _HEAD.pack(T.PONG, 4) + struct.pack(">I", msg.value)
    if isinstance(msg, ReqPages):
        return _pack_request(msg.block, msg.start, msg.length)
    if isinstance(msg, RecvBitmapReply):
        name = msg.block.encode()
        if len(msg.bitmap) % 8:
            raise ValueError("a received bitmap is a whole number of 64-bit words")
        head = _HEAD.pack(T.RECV_BITMAP, 1 + len(name)) + bytes((len(name),)) + name
        tail = struct.pack(">Q", RECV_BITMAP_ENDING)
        return head + struct.pack(">Q", len(msg.bitmap)) + bytes(msg.bitmap) + tail
    if isinstance(msg, ResumeAck):
        return _HEAD.pack(T.RESUME_ACK, 4) + struct.pack(">I", msg.value)
    if isinstance(msg, SwitchoverAck):
        return _HEAD.pack(T.SWITCHOVER_ACK, 0)
    if isinstance(msg, XError):
        body = bytes((int(msg.not_started),)) + _cut_utf8(msg.reason, MAX_RP_PAYLOAD - 1)
        return _HEAD.pack(T.X_ERROR, len(body)) + body
    if isinstance(msg, XColo):
        body = _XCOLO.pack(msg.msg, msg.value) + _cut_utf8(msg.text, MAX_RP_PAYLOAD - 12)
        return _HEAD.pack(T.X_COLO, len(body)) + body
    raise TypeError(f"not a return-path message: {msg!r}")


def _pack_request(block: str | None, start: int, length: int) -> bytes:
    """REQ_PAGES (``block`` None: the one named last) or REQ_PAGES_ID."""
    if block is None:
        return _REQ.pack(_REQ_PAGES, 12, start, length)
    name = block.encode()
    if len(name) > 255:
        raise ValueError("block name longer than 255 bytes")
    return _REQ_ID.pack(_REQ_PAGES_ID, 13 + len(name), start, length, len(name)) + name


class ReturnPathEncoder:
    """Encodes return-path messages; emits REQ_PAGES_ID only when the block changes."""

    def __init__(self) -> None:
        self._last_block: str | None = None

    def send(self, msg: RPMessage) -> bytes:
        if isinstance(msg, ReqPages) and msg.block is not None:
            return self.page_request(msg.block, msg.start, msg.length)
        return encode_rp(msg)

    def page_request(self, block: str, start: int, length: int) -> bytes:
        """``send(ReqPages(start, length, block))`` without the message object: the
        destination's fault thread calls this for every page it asks for."""
        if block == self._last_block:
            return _pack_request(None, start, length)
        raw = _pack_request(block, start, length)
        self._last_block = block
        return raw

    def reset(self) -> None:
        """After a postcopy recovery the first request names its block again."""
        self._last_block = None


class ReturnPathDecoder:
    """Incremental decoder of the return path; ``max_bitmap`` caps a RECV_BITMAP body."""

    def __init__(self, max_bitmap: int = 64 << 20) -> None:
        self._buf = bytearray()
        self._base = 0
        self._eof = False
        self._last_block: str | None = None
        self.max_bitmap = max_bitmap

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            self._eof = True
        else:
            self._buf += data

    def page_request(self, data: bytes | bytearray | memoryview) -> tuple[str, int, int] | None:
        """(block, start, length) when ``data`` is exactly one well-formed REQ_PAGES or
        REQ_PAGES_ID message and nothing is buffered; None otherwise, and then ``data`` is for
        ``receive_data`` as usual (which also reports what is wrong with it).

        The post-copy request path's read: in post-copy almost every read of the return path
        is one page request, and decoding it without the general parser and message objects
        (with the source's dispatch) takes 0.4 us hot instead of 3.1.
        """
        n = len(data)
        if self._buf or n < _REQ.size:
            return None
        kind, length, start, ln = _REQ.unpack_from(data)
        if kind == _REQ_PAGES and length == 12 and n == _REQ.size:
            block = self._last_block
        elif kind == _REQ_PAGES_ID and n == 4 + length and 13 <= length <= MAX_RP_PAYLOAD:
            if _REQ_ID.unpack_from(data)[4] != length - 13:
                return None
            try:
                block = bytes(data[_REQ_ID.size : n]).decode()
            except UnicodeDecodeError:
                return None
            self._last_block = block
        else:
            return None
        if block is None:
            return None
        self._base += n
        return block, start, ln

    def next_event(self) -> RPMessage | _NeedData:
        msg = self._parse()
        if msg is None:
            if self._eof and self._buf:
                raise StreamError(
                    f"return path truncated: {len(self._buf)} bytes of an incomplete message",
                    self._base,
                )
            return NEED_DATA
        return msg

    def events(self) -> list[RPMessage]:
        out: list[RPMessage] = []
        while (m := self.next_event()) is not NEED_DATA:
            out.append(m)  # type: ignore[arg-type]
        return out

    def _parse(self) -> RPMessage | None:
        buf = self._buf
        if len(buf) < 4:
            return None
        kind, length = _HEAD.unpack_from(buf)
        if length > MAX_RP_PAYLOAD:
            raise StreamError(f"return-path message of {length} bytes (max 512)", self._base + 2)
        if len(buf) < 4 + length:
            return None
        T = ReturnPathType
        body = bytes(buf[4 : 4 + length])
        used = 4 + length

        def fixed(n: int, name: str) -> None:
            if length != n:
                raise StreamError(f"{name}: length {length}, expected {n}", self._base + 2)

        msg: RPMessage
        if kind == T.SHUT:
            fixed(4, "SHUT")
            msg = Shut(struct.unpack(">I", body)[0])
        elif kind == T.PONG:
            fixed(4, "PONG")
            msg = Pong(struct.unpack(">I", body)[0])
        elif kind == T.REQ_PAGES:
            fixed(12, "REQ_PAGES")
            if self._last_block is None:
                raise StreamError("REQ_PAGES before any REQ_PAGES_ID named a block", self._base)
            start, ln = struct.unpack(">QI", body)
            msg = ReqPages(start, ln, self._last_block)
        elif kind == T.REQ_PAGES_ID:
            if length < 13 or body[12] != length - 13:
                raise StreamError("REQ_PAGES_ID: block name length mismatch", self._base + 2)
            start, ln = struct.unpack_from(">QI", body)
            msg = ReqPages(start, ln, self._text(body[13:]))
            self._last_block = msg.block
        elif kind == T.RECV_BITMAP:
            if length < 1 or body[0] != length - 1:
                raise StreamError("RECV_BITMAP: block name length mismatch", self._base + 2)
            name = self._text(body[1:])
            if len(buf) < used + 8:
                return None
            size = struct.unpack_from(">Q", buf, used)[0]
            if size > self.max_bitmap:
                raise StreamError(f"RECV_BITMAP of {size} bytes is too large", self._base + used)
            if len(buf) < used + 16 + size:
                return None
            bitmap = bytes(buf[used + 8 : used + 8 + size])
            end = struct.unpack_from(">Q", buf, used + 8 + size)[0]
            if end != RECV_BITMAP_ENDING:
                raise StreamError(
                    f"RECV_BITMAP end marker 0x{end:016x}", self._base + used + 8 + size
                )
            used += 16 + size
            msg = RecvBitmapReply(name, bitmap)
        elif kind == T.RESUME_ACK:
            fixed(4, "RESUME_ACK")
            msg = ResumeAck(struct.unpack(">I", body)[0])
        elif kind == T.SWITCHOVER_ACK:
            fixed(0, "SWITCHOVER_ACK")
            msg = SwitchoverAck()
        elif kind == T.X_ERROR:
            if not body:
                raise StreamError("X_ERROR without its flags byte", self._base)
            msg = XError(body[1:].decode(errors="replace"), bool(body[0] & 1))
        elif kind == T.X_COLO:
            if length < _XCOLO.size:
                raise StreamError(f"X_COLO: length {length}, at least 12", self._base + 2)
            number, value = _XCOLO.unpack_from(body)
            msg = XColo(number, value, body[12:].decode(errors="replace"))
        else:
            raise StreamError(f"unknown return-path message type {kind}", self._base)
        del buf[:used]
        self._base += used
        return msg

    def _text(self, raw: bytes) -> str:
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise StreamError(f"block name {raw!r} is not text", self._base) from None
