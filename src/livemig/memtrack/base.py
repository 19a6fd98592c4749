"""The dirty-tracker contract, the region type, and the part every backend shares.

A tracker watches a set of RAM regions (QEMU's RAMBlocks: ``idstr``, host address, length,
writable view). Dirtiness has two sources, and a tracker merges both (never lose a dirty page):

* guest writes, seen by the backend's mechanism (kernel write-protect or a shadow compare);
* host writes (loader, devices, QMP, incoming pages), declared with ``mark_dirty``.

Bitmaps are ``numpy`` bool arrays, one byte per 4 KiB page: a 1 GiB block is a 256 KiB array,
``numpy.flatnonzero`` on it runs at memory speed, and the kernel's run lists and the shadow
compare's per-page ``any`` produce bool arrays directly, with no pack/unpack step (a packed
uint64 bitmap would be 8x smaller but every consumer would have to unpack it first).
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from livemig.errors import MachineError, UsageError
from livemig.memtrack._sys import PAGE_SHIFT, PAGE_SIZE, buffer_address


class Region(NamedTuple):
    """One tracked RAM block: ``name`` (idstr), ``host_addr``, ``length`` (bytes, a multiple of
    4 KiB) and a writable ``view`` over exactly that memory."""

    name: str
    host_addr: int
    length: int
    view: memoryview

    @property
    def npages(self) -> int:
        return self.length >> PAGE_SHIFT


def as_region(obj: Any) -> Region:
    """Accept a ``Region``, a ``(name, host_addr, length, view)`` tuple, or a RamBlock-like
    object with ``idstr``, ``host_addr``, ``size`` and ``view``."""
    if isinstance(obj, Region):
        region = obj
    elif isinstance(obj, tuple) and len(obj) == 4:
        region = Region(str(obj[0]), int(obj[1]), int(obj[2]), memoryview(obj[3]))
    elif hasattr(obj, "idstr") and hasattr(obj, "host_addr"):
        region = Region(obj.idstr, int(obj.host_addr), int(obj.size), memoryview(obj.view))
    else:
        raise UsageError(f"memtrack: cannot track {obj!r}: need (name, host_addr, length, view)")
    view = region.view.cast("B") if region.view.format != "B" else region.view
    if region.length <= 0 or region.length % PAGE_SIZE or region.host_addr % PAGE_SIZE:
        raise UsageError(
            f"memtrack: region {region.name!r} at 0x{region.host_addr:x} length {region.length} "
            f"is not page aligned (page size {PAGE_SIZE})"
        )
    if view.nbytes != region.length or view.readonly:
        raise UsageError(
            f"memtrack: region {region.name!r}: view is {view.nbytes} bytes"
            f"{' read-only' if view.readonly else ''}, expected {region.length} writable"
        )
    if buffer_address(view) != region.host_addr:
        raise UsageError(
            f"memtrack: region {region.name!r}: view starts at 0x{buffer_address(view):x}, "
            f"not at host address 0x{region.host_addr:x}"
        )
    return region._replace(view=view)


@runtime_checkable
class DirtyTracker(Protocol):
    """Start/sync/stop dirty logging over a fixed set of regions."""

    name: str

    def start(self) -> None:
        """Start logging: every page counts as clean from now on."""

    def sync(self) -> dict[str, np.ndarray]:
        """Pages written since start() or the previous sync(), per region name (bool arrays,
        one entry per page); re-arms tracking so that no write is ever lost."""

    def final_sync(self) -> dict[str, np.ndarray]:
        """``sync`` for the last time, with the guest stopped for good (a post-copy switch):
        the same pages, but without re-arming what a backend need not. Should tracking go on
        after all, the next sync reports these pages again: a superset, never a lost write."""

    def mark_dirty(self, name: str, offset: int, length: int) -> None:
        """Declare a host-side write of ``length`` bytes at ``offset`` into region ``name``."""

    def mark_dirty_pages(self, name: str, pages: np.ndarray) -> None:
        """Put pages back (a bool bitmap or page indexes), e.g. after a failed send."""

    def written(self, name: str, pages: np.ndarray) -> np.ndarray:
        """Which of ``pages`` (ascending page indexes of region ``name``) were written since
        the last sync, without re-arming anything (the next sync still reports them). Any
        thread may ask between two syncs: the migration checks with it that a page it has
        just sent and hashed did not change meanwhile (``livemig.savevm.checksum``)."""

    def stop(self) -> None:
        """Stop logging and release fds, threads and protections; idempotent."""


class TrackerBase(abc.ABC):
    """Region bookkeeping, the host-side dirty bitmaps behind ``mark_dirty``, and the
    started/stopped state shared by all backends. Subclasses implement ``_start``,
    ``_sync_guest`` (the guest-write bitmaps, re-arming) and ``_stop``."""

    name = "base"

    def __init__(self, regions: Iterable[Any]) -> None:
        self.regions = [as_region(r) for r in regions]
        self._by_name = {r.name: r for r in self.regions}
        if len(self._by_name) != len(self.regions):
            raise UsageError("memtrack: two regions share one name")
        self._host_lock = threading.Lock()
        self._host_dirty = {r.name: np.zeros(r.npages, dtype=bool) for r in self.regions}
        self._host_marked = False  # anything in _host_dirty since the last sync
        self._sync_lock = threading.Lock()
        self.running = False
        self.sync_count = 0

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.name} {state} regions={list(self._by_name)}>"

    def __enter__(self) -> TrackerBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self.running:
            raise MachineError(f"dirty tracker {self.name}: start() while already running")
        with self._host_lock:
            for bitmap in self._host_dirty.values():
                bitmap[:] = False
            self._host_marked = False
        self._start()
        self.running = True

    def sync(self) -> dict[str, np.ndarray]:
        return self._sync(self._sync_guest)

    def final_sync(self) -> dict[str, np.ndarray]:
        return self._sync(self._final_sync_guest)

    def _sync(self, guest_sync: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        if not self.running:
            raise MachineError(f"dirty tracker {self.name}: sync() before start()")
        with self._sync_lock:
            guest = guest_sync()
            # Swap the host bitmaps under their lock after the guest sync: a mark_dirty racing
            # this sync lands either in the returned bitmap or in the next one.
            with self._host_lock:
                marked, self._host_marked = self._host_marked, False
                if marked:  # most syncs find nothing marked: no new bitmaps, no OR
                    host, self._host_dirty = (
                        self._host_dirty,
                        {r.name: np.zeros(r.npages, dtype=bool) for r in self.regions},
                    )
            if marked:
                for name, bitmap in guest.items():
                    np.logical_or(bitmap, host[name], out=bitmap)
            self.sync_count += 1
            return guest

    def mark_dirty(self, name: str, offset: int, length: int) -> None:
        region = self._by_name.get(name)
        if region is None:
            raise UsageError(f"memtrack: mark_dirty on unknown region {name!r}")
        if offset < 0 or length < 0 or offset + length > region.length:
            raise UsageError(
                f"memtrack: mark_dirty {name!r} offset {offset} length {length} is outside the "
                f"region ({region.length} bytes)"
            )
        if length == 0:
            return
        first, last = offset >> PAGE_SHIFT, (offset + length - 1) >> PAGE_SHIFT
        with self._host_lock:
            self._host_dirty[name][first : last + 1] = True
            self._host_marked = True

    def mark_dirty_pages(self, name: str, pages: np.ndarray) -> None:
        region = self._by_name.get(name)
        if region is None:
            raise UsageError(f"memtrack: mark_dirty_pages on unknown region {name!r}")
        pages = np.asarray(pages)
        if pages.dtype == bool:
            if pages.shape != (region.npages,):
                raise UsageError(
                    f"memtrack: mark_dirty_pages {name!r}: bitmap of {pages.size} pages, "
                    f"region has {region.npages}"
                )
            with self._host_lock:
                np.logical_or(self._host_dirty[name], pages, out=self._host_dirty[name])
                self._host_marked = True
            return
        if pages.size and (pages.min() < 0 or pages.max() >= region.npages):
            raise UsageError(
                f"memtrack: mark_dirty_pages {name!r}: page index outside 0..{region.npages - 1}"
            )
        with self._host_lock:
            self._host_dirty[name][pages] = True
            self._host_marked = True

    def written(self, name: str, pages: np.ndarray) -> np.ndarray:
        pages = np.asarray(pages)
        if len(pages) == 0:
            return np.zeros(0, bool)
        if not self.running:
            raise MachineError(f"dirty tracker {self.name}: written() before start()")
        first, end = int(pages.min()), int(pages.max()) + 1
        out = self._written_guest(name, first, end)[pages - first]
        with self._host_lock:
            out |= self._host_dirty[name][pages]
        return out

    def stop(self) -> None:
        if self.running:
            self.running = False
            with self._sync_lock:
                self._stop()

    # --- backend hooks -----------------------------------------------------------------------
    @abc.abstractmethod
    def _start(self) -> None:
        """Arm the backend's mechanism over every region."""

    @abc.abstractmethod
    def _sync_guest(self) -> dict[str, np.ndarray]:
        """The guest-write bitmaps since the last call, re-arming as it reads them."""

    def _final_sync_guest(self) -> dict[str, np.ndarray]:
        """``_sync_guest`` when no sync follows; re-arming is optional (``final_sync``)."""
        return self._sync_guest()

    @abc.abstractmethod
    def _written_guest(self, name: str, first: int, end: int) -> np.ndarray:
        """Guest writes to pages [first, end) of ``name`` since the last sync (bool array),
        read without re-arming."""

    @abc.abstractmethod
    def _stop(self) -> None:
        """Disarm and release the backend's resources."""
