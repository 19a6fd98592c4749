"""Sans-IO codec for QMP's wire format: a stream of JSON values in, CRLF-terminated JSON out.

Theory of operation. QMP is not line based on input: clients such as ``qemu.qmp`` send compact
JSON with no newline, possibly split across many writes or several messages in one write. So the
decoder works the way QEMU's json-streamer does: it scans the bytes for message boundaries
(tracking ``{``/``[`` depth and whether it is inside a string, so braces inside strings do not
count) and only when a top-level value is complete hands that exact slice to the JSON parser
(``json.JSONDecoder.raw_decode``). A malformed message therefore costs one error reply and the
stream resynchronises at the next value, as in QEMU.

Usage (h11 style)::

    dec = QMPDecoder()
    dec.receive_data(chunk)          # b"" means end of input
    while (ev := dec.next_event()) is not NEED_DATA:
        ...                          # Message, ParseFailure, Overflow or END

``Overflow`` is fatal (one message grew beyond ``max_message_size``): the caller reports it and
drops the connection. No sockets, threads or asyncio here.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Final

#: QEMU's json-streamer refuses deeper nesting with the same limit.
MAX_NESTING: Final = 1024
#: Default cap on the bytes of one incoming message (QEMU allows 64 MiB; a monitor needs far less).
MAX_MESSAGE_SIZE: Final = 1 << 20

_WHITESPACE = b" \t\r\n"
# Inside a structure only these bytes change the scanner's state. Strings are double- or
# single-quoted: QEMU's JSON parser takes 'single quotes' too (as people type at a socat).
_STRUCTURAL = re.compile(rb"""[{}\[\]"']""")
_IN_STRING = {0x22: re.compile(rb'["\\]'), 0x27: re.compile(rb"['\\]")}
# A bare top-level token (number, keyword, garbage) ends at one of these.
_TOKEN_END = re.compile(rb"""[\s{}\[\]"',:]""")


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA: Final = _Sentinel("NEED_DATA")
END: Final = _Sentinel("END")


@dataclass(frozen=True)
class Message:
    """One complete, well-formed JSON value (not necessarily an object)."""

    value: Any
    offset: int


@dataclass(frozen=True)
class ParseFailure:
    """A complete but malformed value; ``desc`` is the QMP error text. The stream continues."""

    desc: str
    offset: int


@dataclass(frozen=True)
class Overflow:
    """A message exceeded the size cap; the connection must be closed."""

    desc: str
    offset: int


Event = Message | ParseFailure | Overflow | _Sentinel


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN/Infinity; JSON (and QEMU) do not.
    raise ValueError(f"invalid keyword '{name}'")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            # QEMU's parser rejects duplicate keys rather than letting the last one win.
            raise ValueError(f"duplicate key '{key}'")
        obj[key] = value
    return obj


def _finite_float(text: str) -> float:
    # 1e999 is valid JSON but beyond a double: Python makes it inf, which no reply can carry
    # (an "id" of inf could not be echoed and ended the session's dispatcher)
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number '{text[:32]}' out of range")
    return value


_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicates, parse_constant=_reject_constant, parse_float=_finite_float
)


_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'" + r'|"(?:[^"\\]|\\.)*"', re.S)


_PIECES = {"'": re.compile(r'\\.|"', re.S), '"': re.compile(r"\\.", re.S)}


def _double_quoted(text: str) -> str:
    """``text`` with QEMU's extensions of JSON strings made JSON: 'single-quoted' strings
    (a ``"`` inside stands for itself) and ``\\'`` for ``'`` in either kind."""

    def piece(e: re.Match[str]) -> str:
        got = e.group(0)
        if got == "\\'":
            return "'"
        return got if got[0] == "\\" else '\\"'  # a bare '"' of a single-quoted string

    def one(m: re.Match[str]) -> str:
        s = m.group(0)
        return '"' + _PIECES[s[0]].sub(piece, s[1:-1]) + '"'

    return _QUOTED.sub(one, text)


def parse_json_value(raw: bytes) -> Any:
    """Parse exactly one JSON value from ``raw``; raise ``ValueError`` with QEMU-style text."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"invalid UTF-8 sequence at byte {exc.start}") from None
    if "'" in text:
        text = _double_quoted(text)
    try:
        value, end = _DECODER.raw_decode(text)
    except json.JSONDecodeError as exc:
        msg = exc.msg[:1].lower() + exc.msg[1:]
        raise ValueError(f"{msg} (line {exc.lineno} column {exc.colno})") from None
    if text[end:].strip():
        raise ValueError(f"unexpected data after the value at character {end}")
    return value


def encode_message(obj: Any) -> bytes:
    """Serialise one reply or event the way QEMU does: ``", "``/``": "`` separators, CRLF."""
    return json.dumps(obj, ensure_ascii=True, allow_nan=False).encode("ascii") + b"\r\n"


class QMPDecoder:
    """Incremental splitter and parser of a QMP input stream (see the module docstring)."""

    def __init__(
        self, max_message_size: int = MAX_MESSAGE_SIZE, max_nesting: int = MAX_NESTING
    ) -> None:
        self.max_message_size = max_message_size
        self.max_nesting = max_nesting
        self._buf = bytearray()
        self._base = 0  # absolute stream offset of _buf[0]
        self._pos = 0  # scan position inside _buf
        self._start: int | None = None  # start of the message being scanned
        self._depth = 0
        self._in_string = False
        self._quote = 0x22  # the quote of the string being scanned
        self._too_deep = False
        self._eof = False
        self._failed = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as an event."""
        return len(self._buf)

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` marks the end of input."""
        if not data:
            self._eof = True
        else:
            self._buf += data

    def next_event(self) -> Event:
        """Return the next complete event, ``NEED_DATA`` or ``END``."""
        if self._failed:
            return END
        while True:
            event = self._scan_top_level() if self._start is None else self._scan_structure()
            if event is not None:
                return event

    # --- scanning -----------------------------------------------------------------------------

    def _scan_top_level(self) -> Event | None:
        buf = self._buf
        pos = self._pos
        while pos < len(buf) and buf[pos] in _WHITESPACE:
            pos += 1
        self._consume(pos)
        if not buf:
            return END if self._eof else NEED_DATA
        first = buf[0]
        if first in b"{[":
            self._begin(depth=1, in_string=False)
            return None
        if first in b"\"'":
            self._begin(depth=0, in_string=True)
            self._quote = first
            return None
        if first in b"}],:":
            self._consume(1)
            return ParseFailure(f"JSON parse error, unexpected '{chr(first)}'", self._base - 1)
        return self._scan_bare_token()

    def _scan_bare_token(self) -> Event | None:
        m = _TOKEN_END.search(self._buf, 1)
        if m is None:
            if len(self._buf) > self.max_message_size:
                return self._overflow()
            if not self._eof:
                return NEED_DATA
            end = len(self._buf)
        else:
            end = m.start()
        token = bytes(self._buf[:end])
        offset = self._base
        self._consume(end)
        try:
            return Message(parse_json_value(token), offset)
        except ValueError:
            shown = token.decode("utf-8", "replace")[:32]
            return ParseFailure(f"JSON parse error, invalid keyword '{shown}'", offset)

    def _scan_structure(self) -> Event | None:
        buf = self._buf
        pos = self._pos
        while True:
            if self._in_string:
                m = _IN_STRING[self._quote].search(buf, pos)
                if m is None:
                    pos = len(buf)
                    break
                pos = m.end()
                if buf[m.start()] == 0x5C:  # backslash: the next byte is escaped
                    if pos >= len(buf):
                        pos = m.start()  # rescan the escape once more bytes arrive
                        break
                    pos += 1
                    continue
                self._in_string = False
                if self._depth == 0:
                    return self._complete(pos)
                continue
            m = _STRUCTURAL.search(buf, pos)
            if m is None:
                pos = len(buf)
                break
            pos = m.end()
            ch = buf[m.start()]
            if ch in (0x22, 0x27):
                self._in_string = True
                self._quote = ch
            elif ch in b"{[":
                self._depth += 1
                if self._depth > self.max_nesting:
                    self._too_deep = True
            else:
                self._depth -= 1
                if self._depth == 0:
                    return self._complete(pos)
        self._pos = pos
        if pos > self.max_message_size:
            return self._overflow()
        if self._eof:
            # An incomplete message at end of input is dropped, as QEMU does.
            self._start = None
            self._consume(len(buf))
            return END
        return NEED_DATA

    def _begin(self, depth: int, in_string: bool) -> None:
        self._start = 0
        self._pos = 1
        self._depth = depth
        self._in_string = in_string
        self._too_deep = False

    def _complete(self, end: int) -> Event:
        if end > self.max_message_size:
            return self._overflow()
        raw = bytes(self._buf[:end])
        offset = self._base
        too_deep = self._too_deep
        self._start = None
        self._consume(end)
        if too_deep:
            return ParseFailure("JSON parse error, nesting depth limit exceeded", offset)
        try:
            return Message(parse_json_value(raw), offset)
        except ValueError as exc:
            return ParseFailure(f"JSON parse error, {exc}", offset)

    def _overflow(self) -> Overflow:
        self._failed = True
        offset = self._base
        self._buf.clear()
        return Overflow(
            f"QMP message exceeds the {self.max_message_size}-byte limit; closing the connection",
            offset,
        )

    def _consume(self, n: int) -> None:
        if n:
            del self._buf[:n]
            self._base += n
        self._pos = 0 if self._start is None else self._pos - n
