"""Thin ctypes access to the Linux system calls memtrack needs (syscall, ioctl, mmap helpers).

Theory of operation: everything is called through libc with ``use_errno=True``; ctypes releases
the GIL for the duration of each foreign call, so a blocking ioctl never stalls other Python
threads. :func:`ioctl` retries on EINTR (a signal interrupting the call is not an error) and
turns any other failure into a :class:`~livemig.errors.MachineError` naming the request and
the errno, so callers can say what the kernel refused.
"""

from __future__ import annotations

import ctypes
import errno
import os

from livemig.errors import MachineError

PAGE_SIZE = 4096
PAGE_SHIFT = 12

# x86-64 system call numbers (arch/x86/entry/syscalls/syscall_64.tbl).
SYS_userfaultfd = 323

# <asm-generic/ioctl.h>: _IOC(dir, type, nr, size) = dir<<30 | size<<16 | type<<8 | nr.
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (type_ << 8) | nr


def IOR(type_: int, nr: int, size: int) -> int:
    """``_IOR(type, nr, size)`` from <asm-generic/ioctl.h>."""
    return _IOC(_IOC_READ, type_, nr, size)


def IOWR(type_: int, nr: int, size: int) -> int:
    """``_IOWR(type, nr, size)`` from <asm-generic/ioctl.h>."""
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, size)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc.ioctl.restype = ctypes.c_int
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.madvise.restype = ctypes.c_int


class KernelError(MachineError):
    """The kernel refused a memtrack system call; ``errno`` says why."""

    def __init__(self, message: str, err: int) -> None:
        self.errno = err
        super().__init__(f"{message}: {errno.errorcode.get(err, err)} ({os.strerror(err)})")


def syscall(number: int, *args: int, what: str) -> int:
    """Call ``syscall(number, args...)``; retry on EINTR, raise KernelError on failure."""
    cargs = [ctypes.c_long(a) for a in args]
    while True:
        ret = _libc.syscall(ctypes.c_long(number), *cargs)
        if ret >= 0:
            return int(ret)
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise KernelError(what, err)


def ioctl(fd: int, request: int, arg: ctypes.Structure | int | None, *, what: str) -> int:
    """``ioctl(fd, request, &arg)``, retrying on EINTR; raise KernelError on any other errno."""
    ptr = arg if arg is None or isinstance(arg, int) else ctypes.addressof(arg)
    while True:
        ret = _libc.ioctl(fd, request, ptr)
        if ret >= 0:
            return ret
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise KernelError(what, err)


def ioctl_errno(fd: int, request: int, arg: ctypes.Structure) -> tuple[int, int]:
    """Like :func:`ioctl` but return ``(ret, errno)`` instead of raising (EINTR retried)."""
    while True:
        ret = _libc.ioctl(fd, request, ctypes.addressof(arg))
        if ret >= 0:
            return ret, 0
        err = ctypes.get_errno()
        if err != errno.EINTR:
            return ret, err


MADV_DONTNEED = 4
MADV_REMOVE = 9


def madvise(addr: int, length: int, advice: int) -> None:
    """``madvise(addr, length, advice)``; MADV_REMOVE drops shmem pages so they fault again."""
    if _libc.madvise(addr, length, advice) != 0:
        raise KernelError(f"madvise(0x{addr:x}, {length}, {advice})", ctypes.get_errno())


def buffer_address(view: memoryview) -> int:
    """Host address of a writable buffer (a memoryview over an mmap or a numpy array)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))
