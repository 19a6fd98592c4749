"""Short non-blocking system calls that keep the interpreter lock (the post-copy request path).

``os.read``, ``os.writev`` and ctypes' ``CDLL`` calls release the GIL around every system
call. A thread that releases it must win it back from whichever thread took it meanwhile:
on the destination the listen thread decoding the background stream, on the source the
migration thread building its next PART. That hand-over costs tens of microseconds, several
times per page request, and measured as most of a request's latency at two busy vCPUs. A
non-blocking call on a descriptor that is ready returns in a few microseconds, less than the
hand-over, so the request path makes these calls through ``PyDLL`` (which keeps the lock) and
gives the lock up only to sleep in ``poll``. Never use them for a call that can block.
"""

from __future__ import annotations

import ctypes
import errno
import os

_libc = ctypes.PyDLL(None, use_errno=True)
_read = _libc.read
_read.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
_read.restype = ctypes.c_ssize_t
_write = _libc.write
_write.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)
_write.restype = ctypes.c_ssize_t
_pwrite = _libc.pwrite
_pwrite.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long)
_pwrite.restype = ctypes.c_ssize_t
_ioctl = _libc.ioctl
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_ioctl.restype = ctypes.c_int


def _fail(what: str) -> OSError:
    err = ctypes.get_errno()
    if err in (errno.EAGAIN, errno.EWOULDBLOCK):
        return BlockingIOError(err, f"{what}: would block")
    if err == errno.EINTR:
        return InterruptedError(err, f"{what}: interrupted")
    return OSError(err, f"{what}: {os.strerror(err)}")


def read(fd: int, address: int, size: int) -> int:
    """``read`` into ``size`` bytes at ``address``; BlockingIOError when nothing is there."""
    n = _read(fd, address, size)
    if n < 0:
        raise _fail("read")
    return n


def try_read(fd: int, address: int, size: int) -> int:
    """``read`` that reports an empty descriptor as -1 instead of raising BlockingIOError.

    The request path's reads mostly find nothing (the thread has just served the last
    message), and building that exception cost more than the read itself."""
    while True:
        n = _read(fd, address, size)
        if n >= 0:
            return n
        err = ctypes.get_errno()
        if err in (errno.EAGAIN, errno.EWOULDBLOCK):
            return -1
        if err != errno.EINTR:
            raise _fail("read")


def write(fd: int, data: bytes) -> int:
    """``write`` of ``data``; returns the bytes written (maybe fewer); BlockingIOError when
    none fit."""
    n = _write(fd, data, len(data))
    if n < 0:
        raise _fail("write")
    return n


def pwrite(fd: int, address: int, size: int, offset: int) -> int:
    """``pwrite`` of ``size`` bytes at ``address`` to ``offset`` of a memory file (a RAM
    block's memfd: it never blocks); returns the bytes written."""
    while True:
        n = _pwrite(fd, address, size, offset)
        if n >= 0:
            return n
        if ctypes.get_errno() != errno.EINTR:
            raise _fail("pwrite")


def ioctl(fd: int, request: int, address: int) -> tuple[int, int]:
    """``ioctl(fd, request, address)``: (return value, errno when it failed)."""
    ret = _ioctl(fd, request, address)
    return ret, (ctypes.get_errno() if ret < 0 else 0)
