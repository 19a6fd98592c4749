"""Byte channels over sockets, pipes and files, with a time-out on every blocking call.

Theory of operation: every channel is a non-blocking file descriptor driven with ``poll`` and
``readv``/``writev``. That gives one code path for TCP, unix sockets, inherited fds, ``exec:``
pipes and ``file:`` targets, lets a write of a batch of page buffers go out in one system call
(``writev`` takes the header and the memoryview slices of guest RAM as they are, no copy), and
bounds every wait: a stalled or vanished peer raises ``ChannelTimeout`` instead of hanging the
migration. ``shutdown()`` may be called from any thread to wake a blocked reader or writer
(that is how a cancel interrupts the data plane).

A socket channel can be read and written by two threads at once (the return path is the same
socket read in the other direction); each direction must be used by one thread at a time.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Any, TypeVar

from livemig import held, iovec
from livemig.errors import LivemigError

_R = TypeVar("_R")

IOV_MAX = 1024
DEFAULT_TIMEOUT = 30.0

Buffer = bytes | bytearray | memoryview


class ChannelError(LivemigError):
    """The channel broke: the peer closed it, the link was cut, or the disk is full."""


class ChannelTimeout(ChannelError):
    """A read or write did not make progress within the channel's time-out."""


class ChannelClosed(ChannelError):
    """The channel was shut down locally (cancel) while a call was blocked on it."""


class Channel:
    """One bidirectional (sockets) or one-way (pipes, files) byte channel."""

    def __init__(
        self,
        name: str,
        rfd: int | None,
        wfd: int | None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        sock: socket.socket | None = None,
        proc: subprocess.Popen[bytes] | None = None,
        file: IO[bytes] | None = None,
    ) -> None:
        self.name = name
        self.timeout = timeout
        self._rfd = rfd
        self._wfd = wfd
        self._sock = sock
        self._proc = proc
        self._file = file
        self._closed = threading.Event()
        self._pipe_r, self._pipe_w = os.pipe()  # wakes pollers on shutdown()
        # Each thread's poll objects, made once: a poll set up per wait cost the post-copy
        # request path a few microseconds a hop, several times that on cold caches.
        self._pollers = threading.local()
        self._held_buf: memoryview | None = None  # the buffer a held read last used
        self._held_at: tuple[int, int, Any] = (0, 0, None)  # its (address, size, keep-alive)
        self.bytes_sent = 0
        self.bytes_received = 0
        for fd in {rfd, wfd} - {None}:
            assert fd is not None
            if not _is_regular(fd):
                os.set_blocking(fd, False)

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_socket(
        cls, sock: socket.socket, name: str, timeout: float | None = DEFAULT_TIMEOUT
    ) -> Channel:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        fd = sock.fileno()
        return cls(name, fd, fd, timeout=timeout, sock=sock)

    @property
    def readable(self) -> bool:
        return self._rfd is not None

    @property
    def writable(self) -> bool:
        return self._wfd is not None

    @property
    def is_socket(self) -> bool:
        return self._sock is not None

    def read_back(self) -> OSError | None:
        """What a read of a file's one descriptor says (QEMU's ``file:`` channel is one
        descriptor both ways, and the return path reads it): ``file:`` opens it write-only, as
        QEMU does, so this is EBADF; None where a read would not fail."""
        if self._file is None or self._wfd is None:
            return None
        try:
            os.read(self._wfd, 0)
        except OSError as exc:
            return exc
        return None

    @property
    def seekable(self) -> bool:
        """A regular file (``file:``): mapped-ram reads and writes at fixed offsets."""
        return self._file is not None

    @property
    def read_fd(self) -> int | None:
        return self._rfd

    @property
    def write_fd(self) -> int | None:
        return self._wfd

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # -- I/O ---------------------------------------------------------------------------------

    def _wait(self, fd: int, events: int, what: str) -> None:
        if self._closed.is_set():
            raise ChannelClosed(f"{self.name}: channel shut down")
        mine = self._pollers.__dict__
        poller = mine.get((fd, events))
        if poller is None:
            poller = mine[(fd, events)] = select.poll()
            poller.register(fd, events)
            poller.register(self._pipe_r, select.POLLIN)
        ms = None if self.timeout is None else int(self.timeout * 1000)
        ready = poller.poll(ms)
        if self._closed.is_set():
            raise ChannelClosed(f"{self.name}: channel shut down")
        if not ready:
            raise ChannelTimeout(f"{self.name}: no progress {what} for {self.timeout:g} s")

    def sendv(self, buffers: Sequence[Buffer], *, hold_gil: bool = False) -> int:
        """Write every buffer, in order; returns the byte count. Raises on any failure.

        ``hold_gil``: a small message on the post-copy request path (one record, one page),
        written without giving up the interpreter lock while the socket has room
        (``livemig/held.py`` says why); the rest, if it has not, the usual way."""
        if self._wfd is None:
            raise ChannelError(f"{self.name}: channel is not writable")
        if hold_gil:
            data = b"".join(buffers)
            try:
                n = held.write(self._wfd, data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                raise self._error("write", exc) from exc
            self.bytes_sent += n
            return n if n == len(data) else n + self.sendv((memoryview(data)[n:],))
        if any(isinstance(b, iovec.Gather) for b in buffers):
            return self._sendv_gather(buffers)
        # os.writev takes the buffers as they are (bytes, memoryview slices of guest RAM):
        # no per-buffer wrapping on the hot path, only after a partial write.
        views: list[Buffer] = list(buffers)
        sizes = [b.nbytes if type(b) is memoryview else len(b) for b in views]
        total = 0
        i = 0
        while i < len(views):
            end = min(i + IOV_MAX, len(views))
            n = self._write(lambda fd: os.writev(fd, views[i:end]))  # noqa: B023 - called now
            total += n
            # advance over fully written buffers; keep the rest of a partial one
            while n and i < end:
                if n >= sizes[i]:
                    n -= sizes[i]
                    i += 1
                else:
                    views[i] = memoryview(views[i]).cast("B")[n:]
                    sizes[i] -= n
                    n = 0
            while i < end and sizes[i] == 0:
                i += 1
        self.bytes_sent += total
        return total

    def _sendv_gather(self, buffers: Sequence[Any]) -> int:
        """``sendv`` of a list holding ``iovec.Gather`` objects: one numpy iovec array, libc
        ``writev`` per IOV_MAX rows (``livemig/iovec.py`` says why)."""
        assert self._wfd is not None
        keep: list = []
        iov = iovec.build(buffers, keep)
        total = 0
        row = 0
        while row < len(iov):
            n = self._write(lambda fd: iovec.writev(fd, iov, row))  # noqa: B023 - called now
            total += n
            row = iovec.advance(iov, row, n)
        self.bytes_sent += total
        return total

    def _write(self, op: Callable[[int], int]) -> int:
        assert self._wfd is not None
        return self._retry(self._wfd, select.POLLOUT, "write", op)

    def _retry(self, fd: int, events: int, what: str, op: Callable[[int], _R]) -> _R:
        """``op(fd)`` once ``fd`` is ready for ``what`` (read, write): retried on EAGAIN and
        EINTR, other errors named."""
        while True:
            try:
                return op(fd)
            except BlockingIOError:
                self._wait(fd, events, {"read": "reading", "write": "writing"}[what])
            except InterruptedError:
                continue
            except OSError as exc:
                raise self._error(what, exc) from exc

    def unsent(self) -> int:
        """Bytes written to a socket that the kernel has not put on the wire yet (SIOCOUTQ);
        0 for pipes and files. ``sendv`` returns once data is queued, so a migration that
        measures bandwidth by bytes written must subtract this, and count it as still to go."""
        if self._sock is None or self._wfd is None or self._closed.is_set():
            return 0
        try:
            raw = fcntl.ioctl(self._wfd, termios.TIOCOUTQ, b"\0\0\0\0")
        except OSError:
            return 0
        return int.from_bytes(raw, "little", signed=True)

    def send(self, data: Buffer) -> int:
        return self.sendv((data,))

    def _read(self, op: Callable[[int], _R]) -> _R:
        if self._rfd is None:
            raise ChannelError(f"{self.name}: channel is not readable")
        return self._retry(self._rfd, select.POLLIN, "read", op)

    def recv_into(self, buf: memoryview, *, hold_gil: bool = False) -> int:
        """Read at least one byte into ``buf``; 0 means the peer closed its side.

        ``hold_gil``: the post-copy request path's reads, which keep the interpreter lock
        except while they sleep in ``poll`` (``livemig/held.py``); ``buf`` must be
        writable."""
        n = self._recv_held(buf) if hold_gil else self._read(lambda fd: os.readv(fd, [buf]))
        self.bytes_received += n
        return n

    def recv_into_many(self, bufs: Sequence[memoryview]) -> int:
        """Read at least one byte into ``bufs`` filled in order (one ``readv``, at most
        ``IOV_MAX`` of them); 0 means the peer closed its side. A multifd packet's scattered
        pages arrive with one system call instead of one per run."""
        n = self._read(lambda fd: os.readv(fd, bufs))
        self.bytes_received += n
        return n

    def _recv_held(self, buf: memoryview) -> int:
        """``recv_into(buf, hold_gil=True)``. The request path reads into the same buffer
        every time: its address is resolved once, and an empty socket is a return value, not
        an exception, before the wait."""
        if self._rfd is None:
            raise ChannelError(f"{self.name}: channel is not readable")
        if buf is not self._held_buf:
            self._held_at = iovec.address(buf)
            self._held_buf = buf
        addr, size, _keep = self._held_at
        while True:
            try:
                n = held.try_read(self._rfd, addr, size)
            except OSError as exc:
                raise self._error("read", exc) from exc
            if n >= 0:
                return n
            self._wait(self._rfd, select.POLLIN, "reading")

    def wait_buffered(self, nbytes: int, timeout: float) -> None:
        """Wait at most ``timeout`` seconds until ``nbytes`` can be read at once (or the
        stream ends); then return, whatever is there. Plain sockets only (a no-op otherwise).

        For a bulk reader whose cost per read is high: the destination's main channel in
        pre-copy, where each read costs a pass through the decoder and the loader. A read as
        soon as anything has arrived took ~300-450 KiB on average at 2-3 GB/s; waiting for
        ``nbytes`` (``SO_RCVLOWAT``, which holds back ``poll`` until that much is buffered)
        makes most reads full. ``timeout`` bounds the delay a tail shorter than ``nbytes``
        can see. The mark is reset before returning, so every other wait is unchanged.
        """
        sock = self._sock
        if sock is None or self._rfd is None or type(self) is not Channel or self.closed:
            return
        mine = self._pollers.__dict__
        poller = mine.get("buffered")
        if poller is None:
            poller = mine["buffered"] = select.poll()
            poller.register(self._rfd, select.POLLIN)
            poller.register(self._pipe_r, select.POLLIN)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)
            try:
                poller.poll(max(1, int(timeout * 1000)))
            finally:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        except OSError:
            pass  # a broken socket: the read that follows reports it

    def recv(self, n: int) -> bytes:
        """Up to ``n`` bytes as a new ``bytes`` (``b""``: the peer closed its side).

        For a reader that keeps what it receives (the stream decoder holds page data until the
        loader has placed it): a reused buffer would have to be copied out of. A subclass that
        transforms the byte stream (TLS) must override this as well as ``recv_into``."""
        data = self._read(lambda fd: os.read(fd, n))
        self.bytes_received += len(data)
        return data

    def recv_exact(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or ``ChannelError`` if the stream ends first."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.recv_into(view[got:])
            if k == 0:
                raise ChannelError(f"{self.name}: peer closed after {got} of {n} bytes")
            got += k
        return bytes(buf)

    def _error(self, what: str, exc: OSError) -> ChannelError:
        if self._closed.is_set():
            return ChannelClosed(f"{self.name}: channel shut down")
        if exc.errno == errno.ENOSPC:
            return ChannelError(f"{self.name}: {what} failed: no space left on device")
        return ChannelError(f"{self.name}: {what} failed: {exc.strerror or exc}")

    # -- teardown ------------------------------------------------------------------------------

    def _mark_closed(self) -> bool:
        """Set the closed flag and wake every poller; False if it was already closed."""
        if self._closed.is_set():
            return False
        self._closed.set()
        try:
            os.write(self._pipe_w, b"x")
        except OSError:
            pass
        return True

    def shutdown(self) -> None:
        """Wake and fail every blocked call; any thread may call it."""
        if not self._mark_closed():
            return
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close_write(self) -> None:
        """Signal end of stream to the peer (half-close a socket, close a pipe)."""
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        elif self._proc is not None and self._proc.stdin is not None:
            self._proc.stdin.close()
            self._wfd = None
        elif self._file is not None and self._wfd is not None:
            self._file.flush()
            os.fsync(self._wfd)

    def close(self, wait_process: float = 10.0) -> None:
        """Release everything; idempotent. An ``exec:`` child is waited for (then killed)."""
        self.shutdown()
        for closer in (self._sock, self._file):
            if closer is not None:
                try:
                    closer.close()
                except OSError:
                    pass
        if self._proc is not None:
            for stream in (self._proc.stdin, self._proc.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
            try:
                self._proc.wait(wait_process)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._sock = self._file = self._proc = None
        for fd in (self._pipe_r, self._pipe_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._pipe_r = self._pipe_w = -1

    def wait_process(self, timeout: float, cancelled: Callable[[], bool] | None = None) -> int:
        """An ``exec:`` child's exit status once it exits, after ``close_write``: ``ChannelError``
        if it does not exit within ``timeout`` s or ``cancelled()`` turns true first."""
        proc = self._proc
        if proc is None:
            raise ChannelError(f"{self.name}: no command to wait for")
        deadline = time.monotonic() + timeout
        while True:
            try:
                return proc.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                if cancelled is not None and cancelled():
                    raise ChannelError(f"{self.name}: cancelled waiting for the command") from None
                if time.monotonic() >= deadline:
                    raise ChannelError(
                        f"{self.name}: the command did not exit within {timeout:g} s after the "
                        "stream ended (it did not take the stream)"
                    ) from None

    def process_status(self) -> int | None:
        """Exit status of an ``exec:`` child once it ended (None: still running / no child)."""
        return None if self._proc is None else self._proc.poll()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_regular(fd: int) -> bool:
    import stat

    return stat.S_ISREG(os.fstat(fd).st_mode)
