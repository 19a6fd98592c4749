"""A TCP relay between a source and its destination that corrupts what it carries, on purpose.

``FlipRelay(target)`` listens on a loopback port (``relay.uri``) and carries every connection
made to it on to ``target`` (a ``tcp:HOST:PORT`` destination), both ways. It damages the bytes
going from the source to the destination, once, either

* at byte ``flip_at`` of the ``conn``-th connection it accepts (0: main; a multifd source's
  channels, or a post-copy source's preempt channel, come after), or
* with ``flip_at=None``: in the middle of the first read of at least ``min_chunk`` bytes after
  ``armed`` is set (a checkpoint's page data, say, rather than a 4-byte heartbeat).

The damage (``mode``): ``flip`` one bit (``bit``, 2 unless told), ``zero`` the next ``PAGE``
bytes (across reads if need be), or ``cut`` the connection there: what came before that byte
is delivered, then both directions of that connection are closed (a link that drops, seen by
both peers as a reset or an end of stream at that point).

It corrupts after TCP has checked the bytes and TCP checksums them again on the way out, as a
faulty router or NIC would: only the stream's own checks can see it. ``flipped`` is set when
it happened (``what`` says where); ``carried[i]`` counts the bytes the ``i``-th connection has
carried from the source so far; ``close()`` ends every connection.
"""

from __future__ import annotations

import contextlib
import socket
import threading

PAGE = 4096
MODES = ("flip", "zero", "cut")


class FlipRelay:
    """See the module docstring."""

    def __init__(self, target: str, conn: int = 0, flip_at: int | None = None,
                 min_chunk: int = 8192, mode: str = "flip", bit: int = 2) -> None:  # fmt: skip
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        self.target, self.conn, self.flip_at, self.min_chunk = target, conn, flip_at, min_chunk
        self.mode, self.bit = mode, bit
        self.armed = threading.Event()
        if flip_at is not None:
            self.armed.set()
        self.flipped = threading.Event()
        self.what = ""
        self.carried: list[int] = []
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
            b.settimeout(None)
            self.socks += [a, b]
            self.carried.append(0)
            threading.Thread(target=self._pump, args=(a, b, n, n == self.conn),
                             daemon=True).start()  # fmt: skip
            threading.Thread(target=self._pump, args=(b, a, None, False), daemon=True).start()
            n += 1

    def _at(self, seen: int, data: bytes) -> int | None:
        """Where in ``data`` (which starts at byte ``seen``) to corrupt, if here."""
        if self.flipped.is_set() or not self.armed.is_set():
            return None
        if self.flip_at is not None:
            return self.flip_at - seen if seen + len(data) > self.flip_at else None
        return len(data) // 2 if len(data) >= self.min_chunk else None

    def _pump(self, src: socket.socket, dst: socket.socket, index: int | None,
              flips: bool) -> None:  # fmt: skip
        seen = 0
        zero_left = 0  # ``zero``: bytes still to clear in the next reads
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if zero_left:
                    n = min(zero_left, len(data))
                    data = bytes(n) + data[n:]
                    zero_left -= n
                at = self._at(seen, data) if flips else None
                if at is not None:
                    self.flipped.set()
                    where = seen + at
                    if self.mode == "cut":
                        self.what = f"connection {index}: cut at byte {where}"
                        dst.sendall(data[:at])
                        self.carried[index] += at  # type: ignore[index]
                        for s in (src, dst):
                            with contextlib.suppress(OSError):
                                s.shutdown(socket.SHUT_RDWR)
                        return
                    buf = bytearray(data)
                    if self.mode == "flip":
                        buf[at] ^= 1 << self.bit
                        self.what = f"connection {index}: flip bit {self.bit} of byte {where}"
                    else:
                        n = min(PAGE, len(buf) - at)
                        buf[at : at + n] = bytes(n)
                        zero_left = PAGE - n
                        self.what = f"connection {index}: zero 4 KiB at byte {where}"
                    data = bytes(buf)
                seen += len(data)
                if index is not None:
                    self.carried[index] = seen
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for s in [self.lsock, *self.socks]:
            with contextlib.suppress(OSError):
                s.close()
