"""The front link: how a client front (``livemig front``) talks to the process that runs the
guest, so that its clients survive that process (sans-IO: frames in, frames out).

A front holds its clients' connections itself and carries each one's bytes to the guest's
process over one link, as *offsets* in the connection's two byte streams, as TCP would:
requests from byte ``off`` on, replies from byte ``off`` on. Either end can therefore resend,
and the other drops what it already has:

* the guest's process acknowledges (``ACK``) request bytes only once they are *committed*:
  taken into the guest (in its ring) in a checkpoint the standby holds (or, unreplicated, once
  the guest took them); the front keeps every request byte until then, and after a failover
  resends from there;
* the front acknowledges (``ACK``) reply bytes it has written to the client; the guest's
  process keeps replies until then (they travel in its checkpoints), and after a failover the
  standby resends them.

So a failover loses no request and answers none twice: the standby continues the guest's
stream of replies exactly where its checkpoint left it. ``SUCCESSOR`` tells the front where
the guest goes on if this process dies (the standby's service address; empty: nowhere, the
guest is not replicated), and the front fails over only there.

Wire: the front opens with ``LINK_MAGIC``; then both ways frames ``<B type><Q conn><Q off><I
len>`` and ``len`` bytes of payload. The guest's process answers the magic with ``STATUS``
(off 1: serving, the link is up; 0: refused, payload says why, then it closes).

    type       front -> guest's process              guest's process -> front
    OPEN       a connection (off: reply bytes it     -
               has; 0 for a new one)
    DATA       request bytes at off                  reply bytes at off
    ACK        reply bytes it has, up to off          request bytes committed, up to off
    CLOSE      the client closed                     the connection is over (protocol error)
    SYNCED     all OPENs of a reconnect are sent      -
               (off: its tag, the high 32 bits of
               its connection ids)
    SUCCESSOR  -                                      payload: where to fail over ("": none)
    STATUS     -                                      see above
    HEARTBEAT  both ways when idle (either end gives up on a silent link)

``encode_service_state`` / ``decode_service_state`` are the service's part of a COLO
checkpoint: per front connection its committed request offset, the reply bytes produced, and
the reply bytes from the front's last ``ACK`` to there.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from livemig.errors import StreamError

LINK_MAGIC = b"LMFRONT1\n"
FRAME = struct.Struct("<BQQI")
OPEN, DATA, ACK, CLOSE, SYNCED, SUCCESSOR, STATUS, HEARTBEAT = range(1, 9)
NAMES = {OPEN: "OPEN", DATA: "DATA", ACK: "ACK", CLOSE: "CLOSE", SYNCED: "SYNCED",
         SUCCESSOR: "SUCCESSOR", STATUS: "STATUS", HEARTBEAT: "HEARTBEAT"}  # fmt: skip
MAX_PAYLOAD = 16 << 20
HEARTBEAT_S = 0.25  # an idle link carries a heartbeat this often


def frame(kind: int, conn: int = 0, off: int = 0, payload: bytes = b"") -> bytes:
    return FRAME.pack(kind, conn, off, len(payload)) + payload


@dataclass(frozen=True)
class Frame:
    kind: int
    conn: int
    off: int
    payload: bytes

    def __repr__(self) -> str:
        return f"Frame({NAMES.get(self.kind, self.kind)}, {self.conn:#x}, {self.off}, " \
               f"{len(self.payload)} B)"  # fmt: skip


class LinkDecoder:
    """Bytes in, ``Frame``s out; ``StreamError`` on a malformed frame (offset in the link)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._base = 0

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def frames(self) -> list[Frame]:
        out = []
        buf = self._buf
        p = 0
        while len(buf) - p >= FRAME.size:
            kind, conn, off, n = FRAME.unpack_from(buf, p)
            if kind not in NAMES:
                raise StreamError(f"front link: frame type {kind} unknown", self._base + p)
            if n > MAX_PAYLOAD:
                raise StreamError(f"front link: frame of {n} bytes (at most {MAX_PAYLOAD})",
                                  self._base + p)  # fmt: skip
            if len(buf) - p - FRAME.size < n:
                break
            out.append(Frame(kind, conn, off, bytes(buf[p + FRAME.size : p + FRAME.size + n])))
            p += FRAME.size + n
        del buf[:p]
        self._base += p
        return out


# -- the service's state in a checkpoint --------------------------------------------------------

_STATE_HEAD = struct.Struct("<II")  # version, connections
_CONN = struct.Struct("<QQQQI")  # conn, committed, produced, log_start, log length
STATE_VERSION = 1


@dataclass
class ConnState:
    """One front connection as a checkpoint holds it."""

    conn: int
    committed: int  # request bytes taken in by the guest
    produced: int  # reply bytes the guest produced
    log_start: int  # reply offset the front had acknowledged
    log: bytes  # replies from log_start to produced


def encode_service_state(conns: list[ConnState]) -> bytes:
    out = bytearray(_STATE_HEAD.pack(STATE_VERSION, len(conns)))
    for c in conns:
        if c.log_start + len(c.log) != c.produced or c.log_start > c.produced:
            raise ValueError(f"connection {c.conn:#x}: reply log does not end at {c.produced}")
        out += _CONN.pack(c.conn, c.committed, c.produced, c.log_start, len(c.log)) + c.log
    return bytes(out)


def decode_service_state(raw: bytes) -> list[ConnState]:
    if len(raw) < _STATE_HEAD.size:
        raise StreamError("service state: shorter than its header")
    version, count = _STATE_HEAD.unpack_from(raw)
    if version != STATE_VERSION:
        raise StreamError(f"service state version {version}, expected {STATE_VERSION}")
    p = _STATE_HEAD.size
    out = []
    for _ in range(count):
        if len(raw) - p < _CONN.size:
            raise StreamError("service state: a connection record is cut short", p)
        conn, committed, produced, log_start, n = _CONN.unpack_from(raw, p)
        p += _CONN.size
        if len(raw) - p < n or log_start + n != produced:
            raise StreamError(f"service state: connection {conn:#x}'s reply log is malformed", p)
        out.append(ConnState(conn, committed, produced, log_start, raw[p : p + n]))
        p += n
    if p != len(raw):
        raise StreamError(f"service state: {len(raw) - p} bytes after the last connection", p)
    return out
