"""Character device back-ends for the serial console (QEMU: chardev).

A ``Chardev`` takes the bytes the guest writes (``write``) and delivers bytes typed by the user
to the device through the handler set with ``set_input_handler``. Back-ends, by spec string
(``open_chardev``):

- ``stdio``: output to stdout, input from stdin (a reader thread, by default only when stdin
  is a terminal);
- ``file:PATH``: output appended to a file;
- ``unix:PATH``: a unix socket server; one client at a time gets the output and may type input;
  output written while no client is connected is dropped, as QEMU does;
- ``null``: output discarded;
- ``BufferChardev``: output kept in memory, input fed by ``feed`` (tests, the demo).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import BinaryIO

from livemig import threads
from livemig.errors import MachineError, UsageError
from livemig.sockpath import clear_socket_path

InputHandler = Callable[[bytes], None]


class Chardev:
    """Base back-end: discards output, never produces input."""

    def __init__(self) -> None:
        self._input: InputHandler | None = None

    def set_input_handler(self, handler: InputHandler | None) -> None:
        self._input = handler

    def _deliver(self, data: bytes) -> None:
        if self._input is not None and data:
            self._input(data)

    def write(self, data: bytes) -> None:
        """Bytes the guest sent."""

    def close(self) -> None:
        """Stop threads and release files and sockets."""


NullChardev = Chardev


class BufferChardev(Chardev):
    """Keeps all output in memory; ``feed`` plays the role of a user typing."""

    def __init__(self) -> None:
        super().__init__()
        self._data = bytearray()
        self._cond = threading.Condition()

    @property
    def data(self) -> bytes:
        with self._cond:
            return bytes(self._data)

    def write(self, data: bytes) -> None:
        with self._cond:
            self._data += data
            self._cond.notify_all()

    def feed(self, data: bytes) -> None:
        self._deliver(data)

    def wait_for(self, needle: bytes, timeout: float, start: int = 0) -> int:
        """Block until ``needle`` appears at or after ``start``; returns its end offset."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                pos = self._data.find(needle, start)
                if pos >= 0:
                    return pos + len(needle)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"serial output did not show {needle!r} within {timeout} s "
                        f"(last bytes: {bytes(self._data[-200:])!r})"
                    )
                self._cond.wait(left)


class StreamChardev(Chardev):
    """Output to a binary stream (stdout, a file), flushed at once so marks show up live."""

    def __init__(self, stream: BinaryIO, *, close_stream: bool = False) -> None:
        super().__init__()
        self._stream = stream
        self._close_stream = close_stream
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            try:
                self._stream.write(data)
                self._stream.flush()
            except (OSError, ValueError):
                pass  # a closed stdout must not crash a vCPU thread; output is best effort

    def close(self) -> None:
        if self._close_stream:
            with self._lock:
                self._stream.close()


class StdioChardev(StreamChardev):
    """Output to stdout; input from stdin when ``read_input`` (a daemon reader thread)."""

    def __init__(self, *, read_input: bool = False) -> None:
        super().__init__(sys.stdout.buffer)
        if read_input:
            threads.Thread(target=self._reader, name="chardev-stdin", daemon=True).start()

    def _reader(self) -> None:
        fd = sys.stdin.fileno()
        while True:
            try:
                data = os.read(fd, 4096)
            except OSError:
                return
            if not data:
                return
            self._deliver(data)


class SocketChardev(Chardev):
    """A unix socket server: the connected client sees the output and may send input."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            clear_socket_path(path)
            self._server.bind(path)
        except OSError as exc:
            self._server.close()
            raise MachineError(f"serial: cannot listen on unix socket {path}: {exc}") from exc
        self._server.listen(1)
        self._client: socket.socket | None = None
        self._lock = threading.Lock()
        self._closed = False
        threads.Thread(target=self._accept_loop, name=f"chardev-{path}", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                if self._client is not None:
                    self._client.close()
                self._client = conn
            while True:
                try:
                    data = conn.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    break
                self._deliver(data)
            with self._lock:
                if self._client is conn:
                    self._client = None
            conn.close()

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._client is None:
                return
            try:
                self._client.sendall(data)
            except OSError:
                self._client.close()
                self._client = None

    def close(self) -> None:
        self._closed = True
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
        # shutdown wakes the accept() of the listener thread; close alone may not.
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def open_chardev(spec: str | Chardev | None, *, read_input: bool | None = None) -> Chardev:
    """Build a back-end from ``stdio``, ``null``, ``file:PATH`` or ``unix:PATH``.

    ``read_input`` (stdio only): read keyboard input from stdin; by default only when stdin is
    a terminal, so a machine run from a script or a test never steals its stdin.
    """
    if isinstance(spec, Chardev):
        return spec
    if spec is None or spec == "stdio":
        if read_input is None:
            read_input = sys.stdin is not None and sys.stdin.isatty()
        return StdioChardev(read_input=read_input)
    if spec in ("null", "none"):
        return NullChardev()
    kind, sep, arg = spec.partition(":")
    if sep and arg and kind == "file":
        try:
            return StreamChardev(open(arg, "ab"), close_stream=True)
        except OSError as exc:
            raise UsageError(f"serial file:{arg}: {exc.strerror}") from exc
    if sep and arg and kind == "unix":
        return SocketChardev(arg)
    raise UsageError(f"serial back-end {spec!r}: expected stdio, null, file:PATH or unix:PATH")
