"""Sans-IO codec of COLO checkpoints on the main stream (QEMU: ``migration/colo.c``).

After the first migration of a replicated guest (capability ``x-colo``: its stream carries
ENABLE_COLO and ends with EOF and the vmdesc as any other), the main stream goes on with COLO
*messages*: QEMU's ``COLOMessage`` numbers as bare big-endian 32-bit words, one of them
(VMSTATE_SIZE) followed by a big-endian 64-bit value. One checkpoint, as QEMU sends it::

    be32 CHECKPOINT_REQUEST (1)
    be32 VMSTATE_SEND (3)
    live state: SECTION_END(ram) page records ... EOS FOOTER, then EOF (0x00)
    be32 VMSTATE_SIZE (4), be64 n
    n bytes of device state: SECTION_FULL ... (cpu, devices, globalstate), then EOF

The live state and the device state are headerless pieces of QEMU's stream format, written
by the normal ``Encoder`` and read by the normal ``Decoder`` (the ``ram`` section id is the one
the first migration STARTed). Where livemig differs from QEMU (``docs/replication.md``):

* QEMU's primary waits for CHECKPOINT_REPLY before stopping its guest (the secondary runs too
  and must stop); livemig's standby never runs while it is one, so the primary does not wait
  and the standby sends no reply.
* livemig's own messages, numbers far from QEMU's (a QEMU secondary refuses them as invalid):
  ``X_HEARTBEAT`` (the primary is alive, sent when it has sent nothing else for a while) and
  ``X_EXIT`` (the primary ends replication on purpose: the standby must *not* take over). A
  primary that ends replication while it sends a checkpoint ends that checkpoint's live state
  between two records (EOS, footer, EOF) and sends X_EXIT in place of VMSTATE_SIZE: the
  checkpoint is dropped whole.

``CheckpointReader`` is the standby's side: it buffers one checkpoint until its last byte and
returns it whole (``Checkpoint``, with every decoded event), so a half-received checkpoint is
never seen by the code that applies it. The standby's answers travel on the return path as
livemig's ``XColo`` messages (``wire/returnpath.py``).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from livemig.errors import StreamError
from livemig.wire import events as E
from livemig.wire.decoder import Decoder

_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


class ColoMessage(enum.IntEnum):
    """QEMU's COLOMessage (qapi/migration.json), then livemig's own."""

    CHECKPOINT_READY = 0
    CHECKPOINT_REQUEST = 1
    CHECKPOINT_REPLY = 2
    VMSTATE_SEND = 3
    VMSTATE_SIZE = 4
    VMSTATE_RECEIVED = 5
    VMSTATE_LOADED = 6
    # livemig's own ("LMHB", "LMEX"): never sent to a peer that did not ask for x-colo from a
    # livemig source
    X_HEARTBEAT = 0x4C4D4842
    X_EXIT = 0x4C4D4558
    X_CHECKSUM = 0x4C4D434B  # "LMCK": the checkpoint's checksum, after its device state


_QEMU_MAX = 7  # COLO_MESSAGE__MAX: QEMU refuses numbers from here on
_KNOWN = frozenset(int(m) for m in ColoMessage)


def message(msg: ColoMessage) -> bytes:
    """One COLO message word (QEMU: ``colo_send_message``)."""
    return _BE32.pack(msg)


def message_value(msg: ColoMessage, value: int) -> bytes:
    """A message and its 64-bit value (QEMU: ``colo_send_message_value``)."""
    return _BE32.pack(msg) + _BE64.pack(value)


def checkpoint_head() -> bytes:
    """CHECKPOINT_REQUEST then VMSTATE_SEND: what opens a checkpoint before its live state."""
    return message(ColoMessage.CHECKPOINT_REQUEST) + message(ColoMessage.VMSTATE_SEND)


def device_state_head(size: int) -> bytes:
    """VMSTATE_SIZE and the device state's length, sent before the device state bytes."""
    return message_value(ColoMessage.VMSTATE_SIZE, size)


_CHECKSUM = struct.Struct(">IIQ")  # X_CHECKSUM, records, digest


def checksum_tail(records: int, digest: int) -> bytes:
    """X_CHECKSUM, the records the checkpoint holds and their digest (``savevm.checksum``'s,
    over its RAM records and device sections), closing a checkpoint of a checksummed stream."""
    return _CHECKSUM.pack(ColoMessage.X_CHECKSUM, records, digest)


# -- the standby's reader ----------------------------------------------------------------------


@dataclass
class Heartbeat:
    """The primary is alive (livemig's X_HEARTBEAT)."""


@dataclass
class Exit:
    """The primary ended replication on purpose (livemig's X_EXIT): do not take over.
    ``abandoned``: the checkpoint it broke off to say so (its live state ended early, and
    X_EXIT came where its device state would have)."""

    abandoned: int | None = None


@dataclass
class Checkpoint:
    """One complete checkpoint: number (1, 2, ... on this connection), the live state's events
    (RAM records), the device state's events (FULL sections) and its size on the wire."""

    number: int
    live: list[E.Event] = field(default_factory=list)
    devices: list[E.Event] = field(default_factory=list)
    size: int = 0
    checksum: tuple[int, int] | None = None  # (records, digest) with x-checksums


ColoEvent = Heartbeat | Exit | Checkpoint


class CheckpointReader:
    """Feed the main stream after the first migration's end; get whole checkpoints.

    ``live_decoder(offset)`` and ``device_decoder(offset)`` make the ``Decoder`` of each part
    (headerless, ``stop_at_eof=True``, the RAM blocks and device layouts of this machine,
    ``start_offset=offset`` so that its errors name stream offsets).
    ``max_checkpoint`` caps the bytes one checkpoint may occupy before it is complete: a peer
    cannot make the standby buffer without bound. ``checked``: the stream carries livemig's
    checksums, so every checkpoint must end with X_CHECKSUM (its ``checksum``; the standby
    compares it before applying anything). Errors are ``StreamError`` with the offset in the
    COLO part of the stream (from its first byte).
    """

    def __init__(
        self,
        live_decoder: Callable[[int], Decoder],
        device_decoder: Callable[[int], Decoder],
        max_checkpoint: int,
        start_offset: int = 0,
        checked: bool = False,
    ) -> None:
        self.checked = checked
        self._live_decoder = live_decoder
        self._device_decoder = device_decoder
        self.max_checkpoint = max_checkpoint
        self._buf = bytearray()
        self._base = start_offset  # stream offset of _buf[0]
        self._end = start_offset  # stream offset just past the last byte received
        self._state = "message"
        self._dec: Decoder | None = None
        self._current: Checkpoint | None = None
        self._started_at = 0  # offset of the current checkpoint's first byte
        self._device_size = 0
        self.checkpoints = 0
        self.eof = False

    @property
    def offset(self) -> int:
        return self._base

    @property
    def in_checkpoint(self) -> bool:
        """A checkpoint has begun and is not complete yet."""
        return self._current is not None

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            self.eof = True
            return
        self._end += len(data)
        if self._state == "live":
            assert self._dec is not None
            self._dec.receive_data(bytes(data))
        else:
            self._buf += data
        if self._current is not None and self._end - self._started_at > self.max_checkpoint:
            raise StreamError(
                f"checkpoint {self._current.number} exceeds {self.max_checkpoint} bytes before "
                "it is complete",
                self._started_at,
            )

    def next_event(self) -> ColoEvent | E._NeedData:
        """The next heartbeat, exit or *complete* checkpoint, or ``NEED_DATA``."""
        while True:
            if self._state == "message":
                ev = self._message()
            elif self._state == "live":
                ev = self._live()
            elif self._state == "size":
                ev = self._size()
            elif self._state == "checksum":
                ev = self._checksum()
            else:
                ev = self._device()
            if ev is None:
                continue
            if ev is E.NEED_DATA and self.eof and self._current is not None:
                raise StreamError(f"stream ended inside checkpoint {self._current.number}",
                                  self.offset)  # fmt: skip
            return ev

    def events(self) -> list[ColoEvent]:
        out: list[ColoEvent] = []
        while (ev := self.next_event()) is not E.NEED_DATA:
            out.append(ev)  # type: ignore[arg-type]
        return out

    # -- steps: None = state changed, go on -------------------------------------------------

    def _take(self, n: int) -> bytes | None:
        if len(self._buf) < n:
            return None
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self._base += n
        return out

    def _word(self, expect: ColoMessage | None = None) -> ColoMessage | None:
        if len(self._buf) < 4:
            return None
        raw = _BE32.unpack_from(self._buf)[0]
        if raw not in _KNOWN:
            raise StreamError(f"unknown COLO message {raw:#x}", self._base)
        msg = ColoMessage(raw)
        if expect is not None and msg != expect:
            raise StreamError(f"COLO message {msg.name} where {expect.name} was expected",
                              self._base)  # fmt: skip
        return msg

    def _message(self) -> ColoEvent | E._NeedData | None:
        msg = self._word()
        if msg is None:
            return E.NEED_DATA
        if msg == ColoMessage.X_HEARTBEAT:
            self._take(4)
            return Heartbeat()
        if msg == ColoMessage.X_EXIT:
            self._take(4)
            return Exit()
        if msg != ColoMessage.CHECKPOINT_REQUEST:
            raise StreamError(f"COLO message {msg.name} outside a checkpoint", self._base)
        if len(self._buf) < 8:
            return E.NEED_DATA
        self._started_at = self._base
        self._take(4)
        if self._word(ColoMessage.VMSTATE_SEND) is None:
            return E.NEED_DATA  # unreachable: 8 bytes were there
        self._take(4)
        self.checkpoints += 1
        self._current = Checkpoint(self.checkpoints)
        self._dec = self._live_decoder(self._base)
        rest, self._buf = bytes(self._buf), bytearray()
        if rest:
            self._dec.receive_data(rest)
        self._state = "live"
        return None

    def _drain(self, dec: Decoder, into: list[E.Event]) -> bool:
        """Events of ``dec`` into ``into``; True once its EOF was decoded."""
        while (ev := dec.next_event()) is not E.NEED_DATA:
            into.append(ev)  # type: ignore[arg-type]
            if isinstance(ev, E.Eof):
                return True
        return False

    def _live(self) -> E._NeedData | None:
        dec, cp = self._dec, self._current
        assert dec is not None and cp is not None
        try:
            ended = self._drain(dec, cp.live)
        except StreamError as exc:
            raise StreamError(f"the live state of checkpoint {cp.number}: {exc.reason}",
                              exc.offset) from exc  # fmt: skip
        if not ended:
            return E.NEED_DATA
        for ev in cp.live:
            if not isinstance(ev, (E.SectionEnd, E.SectionPart, E.RamPages, E.RamZeroPages,
                                   E.RamEos, E.SectionFooter, E.Eof)):  # fmt: skip
                raise StreamError(f"{type(ev).__name__} in the live state of checkpoint "
                                  f"{cp.number} (RAM records only)", dec.offset)  # fmt: skip
        self._base = dec.offset
        self._buf = bytearray(dec.unparsed())
        self._dec = None
        self._state = "size"
        return None

    def _size(self) -> ColoEvent | E._NeedData | None:
        if len(self._buf) >= 4 and _BE32.unpack_from(self._buf)[0] == ColoMessage.X_EXIT:
            # the primary abandoned this checkpoint (its live state ended early) and ends
            # replication: the checkpoint is dropped whole
            self._take(4)
            cp, self._current = self._current, None
            self._state = "message"
            return Exit(abandoned=cp.number if cp is not None else None)
        if self._word(ColoMessage.VMSTATE_SIZE) is None or len(self._buf) < 12:
            return E.NEED_DATA
        size = _BE64.unpack_from(self._buf, 4)[0]
        if size > self.max_checkpoint:
            raise StreamError(f"device state of {size} bytes (at most {self.max_checkpoint})",
                              self._base + 4)  # fmt: skip
        self._take(12)
        self._device_size = size
        self._state = "device"
        return None

    def _device(self) -> Checkpoint | E._NeedData:
        start = self._base
        raw = self._take(self._device_size)
        if raw is None:
            return E.NEED_DATA
        cp = self._current
        assert cp is not None
        dec = self._device_decoder(start)
        dec.receive_data(raw)
        dec.receive_data(b"")
        try:
            ended = self._drain(dec, cp.devices)
        except StreamError as exc:
            raise StreamError(f"the device state of checkpoint {cp.number}: {exc.reason}",
                              exc.offset) from exc  # fmt: skip
        if not ended or dec.unparsed():
            raise StreamError(f"the device state of checkpoint {cp.number} does not end with "
                              "its EOF", start + self._device_size)  # fmt: skip
        for ev in cp.devices:
            if not isinstance(ev, (E.SectionFull, E.Eof)):
                raise StreamError(f"{type(ev).__name__} in the device state of checkpoint "
                                  f"{cp.number} (device sections only)", start)  # fmt: skip
        if self.checked:
            self._state = "checksum"
            return None
        return self._complete(cp)

    def _checksum(self) -> Checkpoint | E._NeedData:
        cp = self._current
        assert cp is not None
        if len(self._buf) >= 4 and _BE32.unpack_from(self._buf)[0] != ColoMessage.X_CHECKSUM:
            raise StreamError(f"checkpoint {cp.number} of a checksummed stream ends without "
                              "its X_CHECKSUM", self._base)  # fmt: skip
        raw = self._take(_CHECKSUM.size)
        if raw is None:
            return E.NEED_DATA
        _word, records, digest = _CHECKSUM.unpack(raw)
        cp.checksum = (records, digest)
        return self._complete(cp)

    def _complete(self, cp: Checkpoint) -> Checkpoint:
        cp.size = self._base - self._started_at
        self._current = None
        self._state = "message"
        return cp


def is_qemu_message(value: int) -> bool:
    """A number QEMU's COLO code knows (livemig's own are refused by a QEMU peer)."""
    return 0 <= value < _QEMU_MAX


def describe(ev: Any) -> str:
    if isinstance(ev, Checkpoint):
        return f"checkpoint {ev.number} ({ev.size} bytes)"
    return type(ev).__name__
