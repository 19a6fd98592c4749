"""Post-copy readahead on the source: which pages to push next after a page request.

A guest that sweeps its memory in order (memstress, QEMU's baseline dirtier, a copy, a scan)
faults on the page just past the last one it was given: a request for page ``p`` right after
one for ``p - 1`` (or for the page after the last readahead window) is a sequential stream,
and the pages after ``p`` are what it touches next. As Linux's file readahead does, each hit
doubles the stream's window (``first`` pages, then 2x, up to ``limit``), and the source sends
that window next: its head on the request path, the rest from the push, ahead of its RAM-order
walk. (QEMU's page search continues after the last requested page; this does it only for a
stream, so a guest whose vCPUs fault in two places does not drag the push back and forth
between them.) A request that continues no
stream starts one with no window: random faults cost nothing extra. A guest that sweeps on
through pages it already has (the walk pushed them) and faults again further on is still the
same stream: its window does not start over.

Pure bookkeeping (no locks, no I/O): ``PostcopySource`` calls ``on_request`` under its bitmap
lock and takes the returned range in PART-sized pieces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

FIRST_WINDOW = 8  # pages: the window of a stream's second request
MAX_WINDOW = 1024  # pages (4 MiB): the window stops doubling here
SLACK = 16  # pages past a stream's window end that still continue it (a guest skipping a few)
STREAMS = 8  # streams remembered (one per vCPU sweeping, with room)
MAX_GAP = 1 << 16  # pages (256 MiB): the longest run of sent pages a stream continues across


@dataclass
class _Stream:
    block: str
    start: int  # first page of the stream's last request
    end: int  # first page after its last window (exclusive)
    window: int


class Readahead:
    """Sequential streams of page requests and their readahead windows."""

    def __init__(self, first: int = FIRST_WINDOW, limit: int = MAX_WINDOW) -> None:
        self.limit = max(0, limit)
        self.first = min(max(0, first), self.limit)
        self._streams: list[_Stream] = []  # most recently used last

    def on_request(self, block: str, page: int, npages: int = 1,
                   sent: Callable[[int, int], bool] | None = None) -> tuple[int, int] | None:  # fmt: skip
        """A request for ``npages`` pages at ``page`` of ``block``: the range ``(start, end)``
        of pages to push next (after the requested ones), or None when it starts no window.

        ``sent(a, b)``, when given, says whether pages ``a`` to ``b`` (exclusive) of the block
        have all been sent: a request further on than ``SLACK`` past a stream's window still
        continues it when the guest went there through pages it had (at most ``MAX_GAP``), so
        a sweep that crosses what the walk already pushed keeps its window."""
        req_end = page + npages
        for i, s in enumerate(self._streams):
            if (
                s.block == block
                and s.start < page
                and (
                    page <= s.end + SLACK
                    or (sent is not None and page - s.end <= MAX_GAP and sent(s.end, page))
                )
            ):
                window = min(self.limit, max(self.first, 2 * s.window))
                s.start, s.window = page, window
                s.end = max(s.end, req_end + window)  # a fault inside the window: extend it
                self._streams.append(self._streams.pop(i))
                return (req_end, s.end) if window else None
        self._streams.append(_Stream(block, page, req_end, 0))
        if len(self._streams) > STREAMS:
            self._streams.pop(0)
        return None

    def clear(self) -> None:
        self._streams.clear()
