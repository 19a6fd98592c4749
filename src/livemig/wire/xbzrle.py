"""XBZRLE: QEMU's delta encoding of a page against its previously sent contents (§4.6).

``encoded := (zrun nzrun)*``: a uleb128 count of unchanged bytes, then a uleb128 count (> 0) of
changed bytes followed by those bytes of the new page. The trailing unchanged run is not
encoded. Runs are found with numpy (one comparison over the page, then the edges of the changed
runs), so the Python loop runs once per changed run, not per byte.
"""

from __future__ import annotations

import numpy as np

from livemig.errors import StreamError


def _uleb128(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode(
    old: bytes | memoryview | np.ndarray,
    new: bytes | memoryview | np.ndarray,
    limit: int | None = None,
) -> bytes | None:
    """Delta of ``new`` against ``old``; ``b""`` if equal; None if longer than ``limit``.

    ``limit`` defaults to the page size (QEMU sends a normal page on overflow).
    """
    a = np.frombuffer(old, np.uint8) if not isinstance(old, np.ndarray) else old.reshape(-1)
    b = np.frombuffer(new, np.uint8) if not isinstance(new, np.ndarray) else new.reshape(-1)
    if a.shape != b.shape:
        raise ValueError("xbzrle pages differ in size")
    limit = len(b) if limit is None else limit
    diff = np.concatenate(([False], a != b, [False]))
    edges = np.flatnonzero(diff[1:] != diff[:-1])
    out = bytearray()
    pos = 0
    raw = b.tobytes() if len(edges) else b""
    for start, end in zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True):
        out += _uleb128(start - pos)
        out += _uleb128(end - start)
        out += raw[start:end]
        if len(out) > limit:
            return None
        pos = end
    return bytes(out)


def _read_uleb(data: memoryview, i: int, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data):
            raise StreamError("XBZRLE data ends inside a run length", offset + i)
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
        if shift > 21:
            raise StreamError("XBZRLE run length longer than 3 bytes", offset + i)


def decode(
    encoded: bytes | memoryview, page: bytearray | memoryview | np.ndarray, offset: int = 0
) -> None:
    """Apply ``encoded`` to ``page`` (the old contents) in place.

    ``offset`` is the stream offset of ``encoded``, used in error messages.
    """
    data = memoryview(encoded).cast("B")
    dst = memoryview(page).cast("B") if not isinstance(page, np.ndarray) else page.reshape(-1)
    size = len(dst)
    i = pos = 0
    first = True
    while i < len(data):
        zrun, i = _read_uleb(data, i, offset)
        if zrun == 0 and not first:
            raise StreamError("XBZRLE: empty unchanged run after the first", offset + i)
        first = False
        pos += zrun
        if i >= len(data):
            raise StreamError("XBZRLE data ends after an unchanged run", offset + i)
        nzrun, i = _read_uleb(data, i, offset)
        if nzrun == 0:
            raise StreamError("XBZRLE: empty changed run", offset + i)
        if pos + nzrun > size or i + nzrun > len(data):
            raise StreamError("XBZRLE run goes past the page or the data", offset + i)
        dst[pos : pos + nzrun] = data[i : i + nzrun]
        i += nzrun
        pos += nzrun
