"""Scatter-gather lists as numpy arrays, written with one ``writev`` per IOV_MAX entries.

Why: ``os.writev`` takes one Python buffer object per entry. Pre-copy's page records alternate
an 8-byte header and a 4 KiB page, so a 1 MiB batch is 512 entries, and making those objects
(memoryview slices) and having ``os.writev`` unpack them again cost the source's migration
thread about as much CPU as the kernel's copy of the data. Here the entries are rows of an
``(n, 2)`` uint64 array laid out as ``struct iovec`` (base address, length), computed with
numpy, and libc's ``writev`` reads them as they are. ``CDLL`` releases the interpreter lock for
the call, as ``os.writev`` does.

A ``Gather`` describes bytes by address; whoever holds it keeps the memory it points into alive
(guest RAM is mapped for the whole migration; header arrays are referenced by the ``Gather``).
"""

from __future__ import annotations

import ctypes
import errno
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

IOV_MAX = 1024

_libc = ctypes.CDLL(None, use_errno=True)
_writev = _libc.writev
_writev.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
_writev.restype = ctypes.c_ssize_t


class Gather(ABC):
    """Bytes given as (address, length) rows rather than as Python buffer objects."""

    nbytes: int

    @abstractmethod
    def iov(self) -> np.ndarray:
        """The rows, ``(n, 2)`` uint64: valid while this object lives."""

    @abstractmethod
    def buffers(self) -> list[memoryview]:
        """The same bytes as buffer objects, for a channel that must see them (TLS)."""


def address(buf: Any) -> tuple[int, int, np.ndarray]:
    """(address, length, the array that keeps it valid) of a contiguous bytes-like object."""
    arr = np.frombuffer(buf, np.uint8)
    return arr.ctypes.data, arr.size, arr


def build(buffers: Sequence[Any], keep: list) -> np.ndarray:
    """One iovec array for plain buffers and ``Gather`` objects, in order; empty entries are
    left out. What the rows point into is appended to ``keep``."""
    parts = []
    plain: list[tuple[int, int]] = []
    for b in buffers:
        if isinstance(b, Gather):
            if plain:
                parts.append(np.array(plain, np.uint64))
                plain = []
            parts.append(b.iov())
            keep.append(b)
        else:
            addr, size, arr = address(b)
            if size:
                plain.append((addr, size))
                keep.append(arr)
    if plain:
        parts.append(np.array(plain, np.uint64))
    if not parts:
        return np.empty((0, 2), np.uint64)
    iov = np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
    return iov[iov[:, 1] > 0] if not iov[:, 1].all() else iov


def writev(fd: int, iov: np.ndarray, start: int) -> int:
    """One ``writev`` of rows ``start`` onwards (at most IOV_MAX); the byte count. Raises
    BlockingIOError when nothing could be written, InterruptedError, or OSError."""
    count = min(IOV_MAX, len(iov) - start)
    n = _writev(fd, iov.ctypes.data + start * 16, count)
    if n >= 0:
        return int(n)
    err = ctypes.get_errno()
    if err in (errno.EAGAIN, errno.EWOULDBLOCK):
        raise BlockingIOError(err, "writev: would block")
    if err == errno.EINTR:
        raise InterruptedError(err, "writev: interrupted")
    raise OSError(err, os.strerror(err))


def advance(iov: np.ndarray, start: int, n: int) -> int:
    """After ``n`` bytes were written from row ``start``: the first row not fully written,
    with that row trimmed in place by what of it went out."""
    cum = np.cumsum(iov[start : start + IOV_MAX, 1])
    full = int(np.searchsorted(cum, n, side="right"))
    row = start + full
    done_before = int(cum[full - 1]) if full else 0
    if row < len(iov) and n > done_before:
        part = n - done_before
        iov[row, 0] += np.uint64(part)
        iov[row, 1] -= np.uint64(part)
    return row
