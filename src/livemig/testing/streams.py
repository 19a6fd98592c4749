"""Stream test helpers: codec pairs, in-memory streams, fault injection.

- ``decode_all(data, chunk=...)`` drives a ``Decoder`` whole, one byte at a time or in chunks.
- ``encode_all(events)`` joins an ``Encoder``'s buffers; ``CodecPair`` wires an encoder to a
  decoder back to back (what a source sends is what a destination decodes).
- ``flatten(events)`` splits page batches into one-page events so that two event lists that
  batch differently compare equal when they mean the same records.
- ``MemoryPipe`` is a thread-safe in-memory byte stream with time-outs (``pipe_pair()`` gives
  both directions of a connection); ``FaultyReader`` cuts or corrupts a byte stream on purpose.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from livemig.errors import StreamError
from livemig.wire import events as E
from livemig.wire.decoder import Decoder
from livemig.wire.encoder import Encoder


def decode_all(
    data: bytes, chunk: int | None = None, *, eof: bool = True, **options: Any
) -> list[E.Event]:
    """Every event of ``data`` fed in ``chunk``-byte pieces (None = whole)."""
    dec = Decoder(**options)
    out: list[E.Event] = []
    step = chunk or max(len(data), 1)
    for i in range(0, len(data), step):
        dec.receive_data(data[i : i + step])
        out.extend(dec.events())
    if eof:
        dec.receive_data(b"")
        out.extend(dec.events())
    return out


def encode_all(events: Iterable[E.Event], **options: Any) -> bytes:
    """The wire form of ``events`` from one fresh ``Encoder``."""
    enc = Encoder(**options)
    return b"".join(bytes(b) for ev in events for b in enc.send(ev))


def flatten(events: Iterable[E.Event]) -> list[Any]:
    """Events with page batches split to one page each (page bytes copied, for comparing)."""
    out: list[Any] = []
    for ev in events:
        if isinstance(ev, E.RamPages):
            for off, page in zip(ev.offsets.tolist(), ev.data, strict=True):
                out.append(("page", ev.block, off, page.tobytes()))
        elif isinstance(ev, E.RamZeroPages):
            out.extend(("zero", ev.block, off, ev.fill) for off in ev.offsets.tolist())
        else:
            out.append(ev)
    return out


class CodecPair:
    """An ``Encoder`` wired to a ``Decoder``: ``send`` returns what the decoder made of it."""

    def __init__(self, encoder: Encoder | None = None, decoder: Decoder | None = None) -> None:
        self.encoder = encoder or Encoder()
        self.decoder = decoder or Decoder()

    def send(self, *events: E.Event) -> list[E.Event]:
        for ev in events:
            for buf in self.encoder.send(ev):
                self.decoder.receive_data(bytes(buf))
        return self.decoder.events()

    def close(self) -> list[E.Event]:
        self.decoder.receive_data(b"")
        return self.decoder.events()


class MemoryPipe:
    """One direction of an in-memory byte stream; ``read`` blocks up to ``timeout`` seconds."""

    def __init__(self, limit: int = 8 << 20) -> None:
        self._buf = bytearray()
        self._closed = False
        self._cond = threading.Condition()
        self.limit = limit

    def write(self, data: bytes | memoryview) -> int:
        with self._cond:
            if self._closed:
                raise BrokenPipeError("write to a closed MemoryPipe")
            self._buf += data
            self._cond.notify_all()
            return len(data)

    def sendmsg(self, buffers: Sequence[bytes | memoryview]) -> int:
        return sum(self.write(b) for b in buffers)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def read(self, n: int = 65536, timeout: float = 5.0) -> bytes:
        """Up to ``n`` bytes; ``b""`` at the end; ``TimeoutError`` if nothing came in time."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._buf and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("MemoryPipe.read timed out")
                self._cond.wait(left)
            out = bytes(self._buf[:n])
            del self._buf[:n]
            return out


def pipe_pair() -> tuple[MemoryPipe, MemoryPipe]:
    """(source -> destination, destination -> source): a connection with its return path."""
    return MemoryPipe(), MemoryPipe()


class FaultyReader:
    """Reads ``data`` in ``chunk`` pieces, cut after ``cut_at`` bytes and with ``flips``
    (offset -> xor mask) applied: a transport that breaks mid-stream."""

    def __init__(
        self,
        data: bytes,
        *,
        chunk: int = 4096,
        cut_at: int | None = None,
        flips: dict[int, int] | None = None,
    ) -> None:
        raw = bytearray(data[:cut_at] if cut_at is not None else data)
        for off, mask in (flips or {}).items():
            if off < len(raw):
                raw[off] ^= mask
        self._data = bytes(raw)
        self._pos = 0
        self.chunk = chunk

    def read(self, n: int | None = None) -> bytes:
        n = min(n or self.chunk, self.chunk)
        out = self._data[self._pos : self._pos + n]
        self._pos += len(out)
        return out


def feed_until_error(decoder: Decoder, reader: FaultyReader) -> tuple[list[E.Event], Exception]:
    """Decode everything ``reader`` gives; returns the events and the error that ended it
    (``StreamError`` for a broken stream; anything else is a decoder bug)."""
    out: list[E.Event] = []
    try:
        while True:
            data = reader.read()
            decoder.receive_data(data)
            out.extend(decoder.events())
            if not data:
                break
    except StreamError as exc:
        return out, exc
    raise AssertionError(f"stream decoded cleanly: {len(out)} events")


def random_pages(n: int, page_size: int = 4096, seed: int = 0) -> np.ndarray:
    """``n`` pages of reproducible random bytes, shape (n, page_size)."""
    return np.random.default_rng(seed).integers(0, 256, (n, page_size), dtype=np.uint8)
