"""Dirty-page tracking for guest RAM (which pages changed since the last sync) and userfaultfd.

Theory of operation
-------------------
One contract, :class:`DirtyTracker` (``start`` / ``sync`` / ``mark_dirty`` / ``stop``), three
backends registered by name in :data:`TRACKERS`, in order of preference:

``uffd-wp-async``
    userfaultfd asynchronous write-protect + ``PAGEMAP_SCAN`` (Linux 6.7+): the kernel marks
    written pages itself; no user-space work per guest write.
``uffd-wp``
    synchronous userfaultfd write-protect; a handler process records each first write.
``shadow``
    a copy of RAM compared page by page with numpy; works anywhere.

``open_tracker(regions, backend="auto")`` picks the first backend whose probe succeeds on this
kernel (probed once; each fallback's reason goes to the debug log) or the one named. ``sync``
returns ``{region name: numpy bool array}``, one entry per 4 KiB page (see ``base`` for why bool
rather than packed bits); iterate dirty pages with ``numpy.flatnonzero``.

``open_tracker(..., hot=True)`` (the migration source, parameter ``x-dirty-hot-chunks``) leaves
2 MiB chunks that the guest rewrites densely at every pass writable between syncs and counts
them dirty whole (``hot``): the guest is spared a write fault per page per pass.

``uffd`` is the userfaultfd wrapper (post-copy's missing mode uses it too) and ``pagemap`` has
``present_pages`` for skipping never-populated pages in a first pass.
"""

from __future__ import annotations

import functools
import logging
import mmap
from collections.abc import Callable, Iterable
from typing import Any

from livemig.errors import LivemigError, UsageError
from livemig.memtrack._sys import buffer_address
from livemig.memtrack.base import DirtyTracker, Region, TrackerBase, as_region
from livemig.memtrack.pagemap import present_pages
from livemig.memtrack.shadow import ShadowTracker
from livemig.memtrack.wp_async import AsyncWPTracker
from livemig.memtrack.wp_sync import SyncWPTracker

__all__ = [
    "TRACKERS",
    "DirtyTracker",
    "Region",
    "TrackerBase",
    "as_region",
    "available_backends",
    "open_tracker",
    "present_pages",
    "probe",
]

log = logging.getLogger(__name__)

TrackerFactory = Callable[[Iterable[Any]], TrackerBase]

#: Backends by name, in order of preference for ``auto``.
TRACKERS: dict[str, TrackerFactory] = {
    AsyncWPTracker.name: AsyncWPTracker,
    SyncWPTracker.name: SyncWPTracker,
    ShadowTracker.name: ShadowTracker,
}


@functools.cache
def probe(backend: str) -> str | None:
    """Try ``backend`` on a small shared anonymous mapping: None if it works, else the reason.

    The probe writes a page and checks that exactly that page is reported, so a kernel that
    accepts the ioctls but does not track is refused too. Cached: probed once per process.
    """
    if backend not in TRACKERS:
        raise UsageError(f"memtrack: unknown backend {backend!r}; known: {', '.join(TRACKERS)}")
    size = 4 * mmap.PAGESIZE
    area = mmap.mmap(-1, size, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    view = memoryview(area)
    try:
        tracker = TRACKERS[backend]([("probe", buffer_address(view), size, view)])
        try:
            tracker.start()
            view[2 * mmap.PAGESIZE] = 1
            dirty = tracker.sync()["probe"]
            if dirty.tolist() != [False, False, True, False]:
                return f"a write to page 2 was reported as {dirty.tolist()}"
        finally:
            tracker.stop()
    except LivemigError as exc:
        return str(exc)
    # The mapping is unmapped when the last view of it (the tracker's) is garbage.
    return None


def available_backends() -> list[str]:
    """The backends that work on this kernel, in order of preference."""
    return [name for name in TRACKERS if probe(name) is None]


def open_tracker(regions: Iterable[Any], backend: str = "auto", hot: bool = False) -> TrackerBase:
    """A tracker over ``regions`` (``Region``s, ``(name, host_addr, length, view)`` tuples or
    RamBlocks), not yet started. ``backend`` is ``"auto"`` or a name from :data:`TRACKERS`;
    a named backend is used as is (its own errors say what the kernel refused). ``hot``: leave
    densely rewritten chunks writable between syncs (``memtrack.hot``; ``uffd-wp-async``
    only, the other backends ignore it)."""
    regions = list(regions)

    def make(factory: TrackerFactory) -> TrackerBase:
        if hot and factory is AsyncWPTracker:
            return AsyncWPTracker(regions, hot=True)
        return factory(regions)

    if backend != "auto":
        factory = TRACKERS.get(backend)
        if factory is None:
            raise UsageError(
                f"memtrack: unknown backend {backend!r}; choose auto or one of {', '.join(TRACKERS)}"
            )
        return make(factory)
    for name, factory in TRACKERS.items():
        reason = probe(name)
        if reason is None:
            log.debug("dirty tracking: using %s", name)
            return make(factory)
        log.debug("dirty tracking: %s unavailable: %s", name, reason)
    raise LivemigError("memtrack: no dirty-tracking backend works here (not even shadow)")
