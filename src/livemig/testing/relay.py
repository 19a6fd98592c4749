"""A TCP relay between a source and its destination that corrupts what it carries, on purpose.

``FlipRelay(target)`` listens on a loopback port (``relay.uri``) and carries every connection
made to it on to ``target`` (a ``tcp:HOST:PORT`` destination), both ways. It flips one bit of
the bytes going from the source to the destination, once, either

* at byte ``flip_at`` of the ``conn``-th connection it accepts (0: main; a multifd source's
  channels come after), or
* with ``flip_at=None``: in the middle of the first read of at least ``min_chunk`` bytes after
  ``armed`` is set (a checkpoint's page data, say, rather than a 4-byte heartbeat).

It flips after TCP has checked the bytes and TCP checksums them again on the way out, as a
faulty router or NIC would: only the stream's own checks can see it. ``flipped`` is set when
it happened; ``close()`` ends every connection.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class FlipRelay:
    """See the module docstring."""

    def __init__(self, target: str, conn: int = 0, flip_at: int | None = None,
                 min_chunk: int = 8192) -> None:  # fmt: skip
        self.target, self.conn, self.flip_at, self.min_chunk = target, conn, flip_at, min_chunk
        self.armed = threading.Event()
        if flip_at is not None:
            self.armed.set()
        self.flipped = threading.Event()
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(8)
        self.uri = f"tcp:127.0.0.1:{self.lsock.getsockname()[1]}"
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, name="flip-relay", daemon=True).start()

    def _accept(self) -> None:
        n = 0
        while True:
            try:
                a, _ = self.lsock.accept()
            except OSError:
                return
            host, port = self.target.split(":")[1:]
            try:
                b = socket.create_connection((host, int(port)), timeout=10)
            except OSError:
                a.close()
                continue
            self.socks += [a, b]
            flips = n == self.conn
            threading.Thread(target=self._pump, args=(a, b, flips), daemon=True).start()
            threading.Thread(target=self._pump, args=(b, a, False), daemon=True).start()
            n += 1

    def _at(self, seen: int, data: bytes) -> int | None:
        """Where in ``data`` (which starts at byte ``seen``) to flip, if here."""
        if self.flipped.is_set() or not self.armed.is_set():
            return None
        if self.flip_at is not None:
            return self.flip_at - seen if seen + len(data) > self.flip_at else None
        return len(data) // 2 if len(data) >= self.min_chunk else None

    def _pump(self, src: socket.socket, dst: socket.socket, flips: bool) -> None:
        seen = 0
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                at = self._at(seen, data) if flips else None
                if at is not None:
                    buf = bytearray(data)
                    buf[at] ^= 0x04
                    data = bytes(buf)
                    self.flipped.set()
                seen += len(data)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for s in [self.lsock, *self.socks]:
            with contextlib.suppress(OSError):
                s.close()
