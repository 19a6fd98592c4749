"""A small userfaultfd wrapper: write-protect dirty tracking, missing and minor faults for post-copy.

Theory of operation
-------------------
``userfaultfd(2)`` returns a file descriptor through which the kernel reports page faults on
registered ranges of this process. After the API handshake (``UFFDIO_API``, which also
negotiates the feature bits), ranges are registered in MISSING mode (a fault on a page that is
not populated waits until we install it with ``UFFDIO_COPY`` or ``UFFDIO_ZEROPAGE``) and/or WP
mode (a write to a write-protected page waits until we lift the protection with
``UFFDIO_WRITEPROTECT``; with ``UFFD_FEATURE_WP_ASYNC`` the kernel lifts it itself and nobody
waits) and/or MINOR mode (an access to a page that is in the page cache but not mapped here
waits until we map it with ``UFFDIO_CONTINUE``, after writing what it must hold through another
view of the same file). Faults are read as 32-byte ``struct uffd_msg`` records, many per
``read``.

Guest RAM here is a shared mapping of a memfd (``machine/ram.py``), which the kernel treats as
shmem: missing mode on it needs ``UFFD_FEATURE_MISSING_SHMEM``, minor mode
``UFFD_FEATURE_MINOR_SHMEM``, write-protect ``UFFD_FEATURE_WP_HUGETLBFS_SHMEM``. To make a page
fault again, ``MADV_REMOVE`` frees it (the next access is a MISSING fault); ``MADV_DONTNEED``
only unmaps it and keeps it in the page cache (the next access is a MINOR fault, three times
cheaper to cause: benchmarks/README.md, session 12).

A warning for fault handlers written in Python: a thread that faults while holding the GIL
(a numpy store from Python, a device hook writing guest RAM) blocks in the kernel *with the
GIL*, so a Python handler thread in the same process can never run to resolve it. Either only
GIL-free threads (unicorn's ``emu_start``) may fault, or the handler must live in another
process (the uffd works from any process: the ioctls act on the registering process's memory).

ioctl numbers are computed from the ``_IOWR``/``_IOR`` macros of <linux/userfaultfd.h> with the
sizes of the structs declared below.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from livemig import held
from livemig.memtrack._sys import (
    IOR,
    IOWR,
    KernelError,
    SYS_userfaultfd,
    buffer_address,
    ioctl,
    ioctl_errno,
    syscall,
)

# --- <linux/userfaultfd.h> -------------------------------------------------------------------
UFFD_API = 0xAA
UFFDIO = 0xAA  # the ioctl "type" byte

# open flags: O_CLOEXEC and O_NONBLOCK, plus UFFD_USER_MODE_ONLY (only user-mode faults).
O_CLOEXEC = os.O_CLOEXEC
O_NONBLOCK = os.O_NONBLOCK
UFFD_USER_MODE_ONLY = 1

# UFFD_FEATURE_* bits negotiated by UFFDIO_API.
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
UFFD_FEATURE_SIGBUS = 1 << 7
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_MINOR_HUGETLBFS = 1 << 9
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
UFFD_FEATURE_EXACT_ADDRESS = 1 << 11
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_POISON = 1 << 14
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFD_FEATURE_MOVE = 1 << 16

# UFFDIO_REGISTER_MODE_*
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2

# mode bits of UFFDIO_COPY / UFFDIO_ZEROPAGE / UFFDIO_WRITEPROTECT
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_COPY_MODE_WP = 1 << 1
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1
UFFDIO_CONTINUE_MODE_DONTWAKE = 1 << 0

# uffd_msg.event and uffd_msg.arg.pagefault.flags
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1
UFFD_PAGEFAULT_FLAG_MINOR = 1 << 2


class uffdio_api(ctypes.Structure):
    """``struct uffdio_api`` (24 bytes)."""

    _fields_ = (
        ("api", ctypes.c_uint64),
        ("features", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    )


class uffdio_range(ctypes.Structure):
    """``struct uffdio_range`` (16 bytes)."""

    _fields_ = (("start", ctypes.c_uint64), ("len", ctypes.c_uint64))


class uffdio_register(ctypes.Structure):
    """``struct uffdio_register`` (32 bytes)."""

    _fields_ = (("range", uffdio_range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64))


class uffdio_copy(ctypes.Structure):
    """``struct uffdio_copy`` (40 bytes); ``copy`` is written back: bytes copied or -errno."""

    _fields_ = (
        ("dst", ctypes.c_uint64),
        ("src", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("copy", ctypes.c_int64),
    )


class uffdio_zeropage(ctypes.Structure):
    """``struct uffdio_zeropage`` (32 bytes); ``zeropage`` is written back like ``copy``."""

    _fields_ = (("range", uffdio_range), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64))


class uffdio_writeprotect(ctypes.Structure):
    """``struct uffdio_writeprotect`` (24 bytes)."""

    _fields_ = (("range", uffdio_range), ("mode", ctypes.c_uint64))


class uffdio_continue(ctypes.Structure):
    """``struct uffdio_continue`` (32 bytes); ``mapped`` is written back like ``copy``."""

    _fields_ = (("range", uffdio_range), ("mode", ctypes.c_uint64), ("mapped", ctypes.c_int64))


# _UFFDIO_* command numbers and the ioctl requests built from them.
UFFDIO_API = IOWR(UFFDIO, 0x3F, ctypes.sizeof(uffdio_api))
UFFDIO_REGISTER = IOWR(UFFDIO, 0x00, ctypes.sizeof(uffdio_register))
UFFDIO_UNREGISTER = IOR(UFFDIO, 0x01, ctypes.sizeof(uffdio_range))
UFFDIO_WAKE = IOR(UFFDIO, 0x02, ctypes.sizeof(uffdio_range))
UFFDIO_COPY = IOWR(UFFDIO, 0x03, ctypes.sizeof(uffdio_copy))
UFFDIO_ZEROPAGE = IOWR(UFFDIO, 0x04, ctypes.sizeof(uffdio_zeropage))
UFFDIO_WRITEPROTECT = IOWR(UFFDIO, 0x06, ctypes.sizeof(uffdio_writeprotect))
UFFDIO_CONTINUE = IOWR(UFFDIO, 0x07, ctypes.sizeof(uffdio_continue))

# struct uffd_msg: u8 event, u8 reserved1, u16 reserved2, u32 reserved3, then a 24-byte union;
# for a pagefault: u64 flags, u64 address, u32 ptid (+4 bytes padding).
UFFD_MSG = struct.Struct("=BBHIQQQ")
assert UFFD_MSG.size == 32


class UffdEvent(NamedTuple):
    """One ``struct uffd_msg``. For PAGEFAULT: ``flags``, ``address``, ``ptid`` (with
    THREAD_ID). For REMOVE/UNMAP the args are start, end; for REMAP from, to, len."""

    event: int
    flags: int
    address: int
    arg2: int

    @property
    def is_pagefault(self) -> bool:
        return self.event == UFFD_EVENT_PAGEFAULT

    @property
    def is_write(self) -> bool:
        return bool(self.flags & UFFD_PAGEFAULT_FLAG_WRITE)

    @property
    def is_wp(self) -> bool:
        return bool(self.flags & UFFD_PAGEFAULT_FLAG_WP)

    @property
    def is_minor(self) -> bool:
        """The page is in the page cache, only not mapped (a range registered MINOR)."""
        return bool(self.flags & UFFD_PAGEFAULT_FLAG_MINOR)

    @property
    def ptid(self) -> int:
        return self.arg2 & 0xFFFFFFFF


class UffdError(KernelError):
    """A userfaultfd operation failed; ``errno`` is the kernel's answer."""


def _open_fd(flags: int) -> int:
    return syscall(SYS_userfaultfd, flags, what="userfaultfd()")


def open_raw(*, nonblocking: bool = True, user_mode_only: bool | None = None) -> int:
    """Open a userfaultfd descriptor (no handshake). ``user_mode_only=None`` tries without
    ``UFFD_USER_MODE_ONLY`` first (kernel faults are reported too) and falls back to it when the
    kernel answers EPERM (unprivileged, ``vm.unprivileged_userfaultfd=0``)."""
    flags = O_CLOEXEC | (O_NONBLOCK if nonblocking else 0)
    if user_mode_only:
        return _open_fd(flags | UFFD_USER_MODE_ONLY)
    try:
        return _open_fd(flags)
    except KernelError as exc:
        if user_mode_only is None and exc.errno == errno.EPERM:
            return _open_fd(flags | UFFD_USER_MODE_ONLY)
        raise


_supported: int | None = None


def supported_features() -> int:
    """The UFFD_FEATURE_* bits this kernel offers (probed once with a throw-away fd)."""
    global _supported
    if _supported is None:
        fd = open_raw()
        try:
            api = uffdio_api(api=UFFD_API, features=0)
            ioctl(fd, UFFDIO_API, api, what="UFFDIO_API probe")
            _supported = int(api.features)
        finally:
            os.close(fd)
    return _supported


class Userfaultfd:
    """An open userfaultfd after the API handshake. Use as a context manager or call close().

    ``features`` are the UFFD_FEATURE_* bits required; the kernel refusing any of them raises
    :class:`UffdError` naming the missing ones. ``self.features`` holds what was granted.
    """

    def __init__(
        self,
        features: int = 0,
        *,
        nonblocking: bool = True,
        user_mode_only: bool | None = None,
    ) -> None:
        missing = features & ~supported_features()
        if missing:
            raise UffdError(
                f"userfaultfd: kernel lacks features 0x{missing:x} (asked 0x{features:x})",
                errno.EINVAL,
            )
        self.fd = open_raw(nonblocking=nonblocking, user_mode_only=user_mode_only)
        try:
            api = uffdio_api(api=UFFD_API, features=features)
            self._ioctl(UFFDIO_API, api, f"UFFDIO_API features=0x{features:x}")
        except BaseException:
            os.close(self.fd)
            raise
        self.features = int(api.features)
        self.ioctls = int(api.ioctls)
        self._reader_state()

    @classmethod
    def adopt(cls, fd: int, features: int = 0) -> Userfaultfd:
        """Wrap a descriptor that already went through the handshake (e.g. inherited by a
        handler process); ``features`` records what was granted to it."""
        self = cls.__new__(cls)
        self.fd, self.features, self.ioctls = fd, features, 0
        self._reader_state()
        return self

    def _reader_state(self) -> None:
        """The event buffer (never resized, so its address is taken once, for held reads) and
        each waiting thread's poll object, made on its first wait."""
        self._buf = bytearray(UFFD_MSG.size * 256)
        self._buf_addr = buffer_address(memoryview(self._buf))
        self._pollers: dict[int, Any] = {}  # thread id -> select.poll()

    # --- plumbing ----------------------------------------------------------------------------
    def _ioctl(self, request: int, arg: ctypes.Structure, what: str) -> int:
        if self.fd < 0:
            raise UffdError(f"{what}: userfaultfd is closed", errno.EBADF)
        try:
            return ioctl(self.fd, request, arg, what=what)
        except KernelError as exc:
            raise UffdError(f"userfaultfd {what}", exc.errno) from None

    def _ioctl_retry(self, request: int, arg: ctypes.Structure, what: str) -> None:
        # EAGAIN means the address space is changing (mremap, fork): retrying is the documented
        # answer.
        while True:
            ret, err = ioctl_errno(self.fd, request, arg)
            if ret >= 0:
                return
            if err != errno.EAGAIN:
                raise UffdError(f"userfaultfd {what}", err)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        """Close the fd; the kernel unregisters every range and wakes any waiting fault."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            self._pollers.clear()  # they watch the old number
            os.close(fd)

    def __enter__(self) -> Userfaultfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- ranges --------------------------------------------------------------------------------
    def register(self, start: int, length: int, mode: int) -> int:
        """Register [start, start+length) with UFFDIO_REGISTER_MODE_* bits; returns the bitmask
        of ioctls allowed on the range."""
        reg = uffdio_register(range=uffdio_range(start, length), mode=mode)
        self._ioctl(UFFDIO_REGISTER, reg, f"UFFDIO_REGISTER 0x{start:x}+0x{length:x} mode={mode}")
        return int(reg.ioctls)

    def unregister(self, start: int, length: int) -> None:
        rng = uffdio_range(start, length)
        self._ioctl(UFFDIO_UNREGISTER, rng, f"UFFDIO_UNREGISTER 0x{start:x}+0x{length:x}")

    def wake(self, start: int, length: int) -> None:
        """Wake threads waiting on faults in the range (after a DONTWAKE operation)."""
        self._ioctl(UFFDIO_WAKE, uffdio_range(start, length), f"UFFDIO_WAKE 0x{start:x}")

    def copy(
        self,
        dst: int,
        src: int,
        length: int,
        *,
        mode: int = 0,
        exist_ok: bool = False,
        hold_gil: bool = False,
    ) -> int:
        """Atomically install pages at ``dst`` from the buffer at address ``src`` and wake the
        faulting threads. Returns bytes installed. With ``exist_ok``, EEXIST (a page already
        there: a racing fault or an earlier copy) counts as success and returns 0.
        ``hold_gil``: one page on the post-copy request path (``livemig/held.py``)."""
        return self._install(
            UFFDIO_COPY,
            "UFFDIO_COPY dst=",
            dst,
            length,
            exist_ok,
            hold_gil,
            lambda done: uffdio_copy(dst=dst + done, src=src + done, len=length - done, mode=mode),
            "copy",
        )

    def continue_(
        self, start: int, length: int, *, exist_ok: bool = False, hold_gil: bool = False
    ) -> int:
        """Map the pages of [start, start+length) from the page cache (minor mode: their bytes
        were written through another view of the file) and wake the threads faulting on them,
        MISSING faults included. Returns bytes mapped; with ``exist_ok``, EEXIST (a page
        mapped already) stops it there and returns what was mapped before."""
        return self._install(
            UFFDIO_CONTINUE,
            "UFFDIO_CONTINUE ",
            start,
            length,
            exist_ok,
            hold_gil,
            lambda done: uffdio_continue(range=uffdio_range(start + done, length - done), mode=0),
            "mapped",
        )

    def _install(
        self,
        request: int,
        label: str,
        start: int,
        length: int,
        exist_ok: bool,
        hold_gil: bool,
        make: Callable[[int], ctypes.Structure],
        field: str,
    ) -> int:
        """The loop ``copy`` and ``continue_`` share. ``make(done)`` builds the argument for the
        range still left; the kernel writes its progress into ``field`` (a partial install comes
        back as EAGAIN with it set: go on after it). EINTR (a held ioctl) and EAGAIN retry;
        EEXIST with ``exist_ok`` ends it. Returns bytes installed."""
        done = 0
        while done < length:
            arg = make(done)
            if hold_gil:
                ret, err = held.ioctl(self.fd, request, ctypes.addressof(arg))
                if err == errno.EINTR:
                    continue
            else:
                ret, err = ioctl_errno(self.fd, request, arg)
            progress = int(getattr(arg, field))
            if ret >= 0:
                return done + progress
            if progress > 0:
                done += progress
                continue
            if err == errno.EAGAIN:
                continue
            if err == errno.EEXIST and exist_ok:
                return done
            raise UffdError(f"userfaultfd {label}0x{start + done:x} len={length}", err)
        return done

    def zeropage(self, start: int, length: int, *, mode: int = 0, exist_ok: bool = False) -> None:
        """Install zero pages over the range (a page known to be zero needs no transfer)."""
        arg = uffdio_zeropage(range=uffdio_range(start, length), mode=mode)
        while True:
            ret, err = ioctl_errno(self.fd, UFFDIO_ZEROPAGE, arg)
            if ret >= 0 or (err == errno.EEXIST and exist_ok):
                return
            if err != errno.EAGAIN:
                raise UffdError(f"userfaultfd UFFDIO_ZEROPAGE 0x{start:x}+0x{length:x}", err)

    def writeprotect(
        self, start: int, length: int, protect: bool, *, dontwake: bool = False
    ) -> None:
        """Set (``protect=True``) or lift write protection on a range registered in WP mode.
        Lifting wakes the threads waiting on it unless ``dontwake``."""
        mode = (UFFDIO_WRITEPROTECT_MODE_WP if protect else 0) | (
            UFFDIO_WRITEPROTECT_MODE_DONTWAKE if dontwake else 0
        )
        arg = uffdio_writeprotect(range=uffdio_range(start, length), mode=mode)
        self._ioctl_retry(
            UFFDIO_WRITEPROTECT, arg, f"UFFDIO_WRITEPROTECT 0x{start:x}+0x{length:x} mode={mode}"
        )

    # --- events --------------------------------------------------------------------------------
    def wait(self, timeout: float | None) -> bool:
        """Wait until events can be read (or ``timeout`` seconds pass); True if readable."""
        if self.fd < 0:
            raise UffdError("wait: userfaultfd is closed", errno.EBADF)
        # one poll object per thread, made once (the post-copy fault thread waits per fault)
        poller = self._pollers.get(threading.get_ident())
        if poller is None:
            poller = self._pollers[threading.get_ident()] = select.poll()
            poller.register(self.fd, select.POLLIN)
        ms = None if timeout is None else max(0, int(timeout * 1000))
        return bool(poller.poll(ms))

    def read_events(self, max_events: int = 256, *, hold_gil: bool = False) -> list[UffdEvent]:
        """Read up to ``max_events`` queued messages in one ``read``; [] if none are queued
        (non-blocking fd). ``hold_gil``: the post-copy fault thread (``livemig/held.py``)."""
        size = UFFD_MSG.size * min(max_events, len(self._buf) // UFFD_MSG.size)
        view = memoryview(self._buf)[:size]
        while True:
            try:
                if hold_gil:
                    n = held.read(self.fd, self._buf_addr, size)
                else:
                    n = os.readv(self.fd, [view])
                break
            except InterruptedError:
                continue
            except BlockingIOError:
                return []
            except OSError as exc:
                raise UffdError("userfaultfd read", exc.errno or errno.EIO) from None
        return [
            UffdEvent(ev, flags, addr, arg2)
            for ev, _r1, _r2, _r3, flags, addr, arg2 in UFFD_MSG.iter_unpack(view[:n])
        ]
