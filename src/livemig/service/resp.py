"""RESP (the Redis protocol) on the host: framing a client's request stream into whole commands
for the ring, and a small synchronous client for tests and ``livemig bench service``.

The framer only finds command boundaries (arrays of bulk strings, or inline commands ending in
``\\n``); parsing and executing them is the guest's job. Framing on the host is what lets a
ring chain carry whole commands only, so the guest keeps no per-connection parser state and a
migration never splits a command between two machines.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any

from livemig.errors import LivemigError, StreamError

MAX_HEADER = 64  # the longest "*N\r\n" / "$N\r\n" line accepted
MAX_INLINE = 64 * 1024


class RespError(LivemigError):
    """An error reply (``-ERR ...``) from the server, as a value in pipelined results."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RespError) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


def _number(buf: bytearray | bytes, start: int, end: int, offset: int) -> int:
    try:
        return int(buf[start:end])
    except ValueError:
        raise StreamError(f"RESP: bad length {bytes(buf[start:end])[:20]!r}", offset) from None


class RequestFramer:
    """Splits one connection's byte stream into chains of whole commands of at most ``limit``
    bytes each. ``offset`` counts the stream's bytes, for error messages."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buf = bytearray()
        self.offset = 0  # stream offset of _buf[0]
        self.commands = 0

    def _end(self, p: int) -> int | None:
        """End of the command starting at ``p``, or None if it is not all here yet."""
        buf = self._buf
        if buf[p] != ord("*"):
            nl = buf.find(b"\n", p)
            if nl < 0:
                if len(buf) - p > MAX_INLINE:
                    raise StreamError("RESP: inline command too long", self.offset + p)
                return None
            return nl + 1
        nl = buf.find(b"\r\n", p, p + MAX_HEADER)
        if nl < 0:
            if len(buf) - p >= MAX_HEADER:
                raise StreamError("RESP: array header too long", self.offset + p)
            return None
        count = _number(buf, p + 1, nl, self.offset + p)
        q = nl + 2
        for _ in range(max(count, 0)):
            if q >= len(buf):
                return None
            if buf[q] != ord("$"):
                raise StreamError(
                    f"RESP: expected a bulk string, got {bytes(buf[q : q + 1])!r}", self.offset + q
                )
            nl = buf.find(b"\r\n", q, q + MAX_HEADER)
            if nl < 0:
                if len(buf) - q >= MAX_HEADER:
                    raise StreamError("RESP: bulk header too long", self.offset + q)
                return None
            size = _number(buf, q + 1, nl, self.offset + q)
            if size < 0:
                raise StreamError(f"RESP: negative bulk length {size}", self.offset + q)
            q = nl + 2 + size + 2
            if q - p > self.limit:
                break  # too large whatever follows: reported below
            if q > len(buf):
                return None
        if q - p > self.limit:
            raise StreamError(
                f"RESP: a command of {q - p} bytes exceeds the ring's limit of {self.limit}",
                self.offset + p,
            )
        return q

    def feed(self, data: bytes) -> list[bytes]:
        """Append ``data``; return the chains of whole commands now complete (maybe none)."""
        self._buf += data
        chains: list[bytes] = []
        start = p = 0
        buf = self._buf
        while p < len(buf):
            end = self._end(p)
            if end is None:
                break
            if end - start > self.limit:
                chains.append(bytes(buf[start:p]))
                start = p
            self.commands += 1
            p = end
        if p > start:
            chains.append(bytes(buf[start:p]))
        if p:
            del buf[:p]
            self.offset += p
        return chains

    def leftover(self) -> bytes:
        """Bytes of an incomplete command (handed over as-is when a connection moves)."""
        return bytes(self._buf)


# -- the client side -----------------------------------------------------------------------


def encode_command(args: Sequence[bytes | str | int]) -> bytes:
    """One command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


def parse_reply(buf: bytes | bytearray, p: int = 0) -> tuple[Any, int] | None:
    """One reply at ``p``: (value, end), or None when incomplete. Errors become RespError."""
    nl = buf.find(b"\r\n", p)
    if nl < 0:
        return None
    kind, line = buf[p : p + 1], bytes(buf[p + 1 : nl])
    q = nl + 2
    if kind == b"+":
        return line.decode(), q
    if kind == b"-":
        return RespError(line.decode(errors="replace")), q
    if kind == b":":
        return int(line), q
    if kind == b"$":
        n = int(line)
        if n < 0:
            return None, q
        if len(buf) < q + n + 2:
            return None
        return bytes(buf[q : q + n]), q + n + 2
    if kind == b"*":
        n = int(line)
        items = []
        for _ in range(max(n, 0)):
            got = parse_reply(buf, q)
            if got is None:
                return None
            item, q = got
            items.append(item)
        return (items if n >= 0 else None), q
    raise StreamError(f"RESP: unknown reply type {bytes(kind)!r}", p)


class RespClient:
    """A blocking RESP client over TCP (``host``, ``port``) or a unix socket (``path``)."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, path: str | None = None,
        timeout: float = 30.0,
    ) -> None:  # fmt: skip
        if path is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        else:
            self.sock = socket.create_connection((host, port), timeout=timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()

    def _replies(self, n: int) -> list[Any]:
        out: list[Any] = []
        p = 0
        while len(out) < n:
            got = parse_reply(self._buf, p) if p < len(self._buf) else None
            if got is None:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    raise StreamError(f"RESP: server closed after {len(out)} of {n} replies", p)
                self._buf += chunk
                continue
            value, p = got
            out.append(value)
        del self._buf[:p]
        return out

    def call(self, *args: bytes | str | int) -> Any:
        """Send one command and return its reply (an error reply is raised as RespError)."""
        self.sock.sendall(encode_command(args))
        reply = self._replies(1)[0]
        if isinstance(reply, RespError):
            raise reply
        return reply

    def pipeline(self, commands: Iterable[Sequence[bytes | str | int]]) -> list[Any]:
        """Send all commands at once, return every reply (errors as RespError values)."""
        cmds = list(commands)
        self.sock.sendall(b"".join(encode_command(c) for c in cmds))
        return self._replies(len(cmds))

    def timed_call(self, *args: bytes | str | int) -> tuple[Any, float]:
        t0 = time.perf_counter()
        reply = self.call(*args)
        return reply, time.perf_counter() - t0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RespClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
