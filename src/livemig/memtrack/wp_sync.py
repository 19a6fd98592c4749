"""``uffd-wp``: synchronous userfaultfd write-protect with a fault handler, for older kernels.

Theory of operation: the regions are registered in WP mode and write-protected at start. Each
first write to a protected page stops the writing thread and queues a fault message; the
handler marks the page in a bitmap and lifts the protection, which lets the writer go on.
``sync`` write-protects again every page marked since the last sync and swaps bitmaps.

The handler runs in a child process (``_wp_handler``), not a thread: a Python thread faulting
while it holds the GIL would otherwise deadlock against a handler thread that needs the GIL.
The child inherits the userfaultfd (its ioctls act on this process's memory), shares two
bitmaps with us through a memfd, and takes commands on a socketpair. Being single-threaded, it
handles faults and syncs one at a time, so a sync is atomic with respect to faults: a page is
marked in the bitmap before its protection is lifted and re-protected before the bitmaps swap,
so every write lands in the bitmap returned by this sync or the next.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np

from livemig.errors import MachineError
from livemig.memtrack.base import TrackerBase
from livemig.memtrack.uffd import (
    UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
    UFFD_FEATURE_WP_UNPOPULATED,
    UFFDIO_REGISTER_MODE_WP,
    Userfaultfd,
    supported_features,
)

REQUIRED_FEATURES = UFFD_FEATURE_WP_HUGETLBFS_SHMEM
# How long a sync or the handler's start may take before the handler is declared dead.
HANDLER_TIMEOUT = 30.0


def wanted_features() -> int:
    return REQUIRED_FEATURES | (supported_features() & UFFD_FEATURE_WP_UNPOPULATED)


class SyncWPTracker(TrackerBase):
    """Dirty tracking by synchronous write-protect faults resolved by a handler process."""

    name = "uffd-wp"

    def __init__(self, regions: Iterable[Any]) -> None:
        super().__init__(regions)
        self._offsets: list[int] = []
        total = 0
        for r in self.regions:
            self._offsets.append(total)
            total += r.npages
        self._total = total
        self._uffd: Userfaultfd | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._ctl: socket.socket | None = None
        self._bitmaps: mmap.mmap | None = None
        self._active = 0

    # --- start / stop ----------------------------------------------------------------------
    def _start(self) -> None:
        uffd = Userfaultfd(wanted_features(), nonblocking=True)
        memfd = os.memfd_create("livemig-wp-bitmaps", os.MFD_CLOEXEC)
        ours, theirs = socket.socketpair()
        try:
            os.ftruncate(memfd, 2 * self._total)
            self._bitmaps = mmap.mmap(memfd, 2 * self._total)
            self._active = 0
            for r in self.regions:
                uffd.register(r.host_addr, r.length, UFFDIO_REGISTER_MODE_WP)
                uffd.writeprotect(r.host_addr, r.length, True)
            specs = [
                f"{r.host_addr}:{r.npages}:{off}"
                for r, off in zip(self.regions, self._offsets, strict=True)
            ]
            fds = (uffd.fileno(), memfd, theirs.fileno())
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "livemig.memtrack._wp_handler", *map(str, fds), *specs],
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
            )
            self._uffd, self._ctl = uffd, ours
            self._expect(b"R", "start")
        except BaseException:
            self._uffd, self._ctl = uffd, ours
            self._teardown()
            raise
        finally:
            os.close(memfd)
            theirs.close()

    def _expect(self, reply: bytes, what: str) -> None:
        assert self._ctl is not None and self._proc is not None
        ready, _, _ = select.select([self._ctl], [], [], HANDLER_TIMEOUT)
        try:
            got = self._ctl.recv(1) if ready else b""
        except OSError:
            got = b""
        if got != reply:
            status = self._proc.poll()
            state = f"exited with status {status}" if status is not None else "did not answer"
            raise MachineError(
                f"dirty tracker uffd-wp: fault handler process {self._proc.pid} {state} "
                f"during {what} (within {HANDLER_TIMEOUT:.0f} s)"
            )

    def _stop(self) -> None:
        self._teardown()

    def _teardown(self) -> None:
        if self._ctl is not None:
            try:
                self._ctl.sendall(b"Q")
            except OSError:
                pass  # the handler already went away; closing below is all that is left
            self._ctl.close()
            self._ctl = None
        if self._proc is not None:
            try:
                self._proc.wait(HANDLER_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._uffd is not None:
            # Closing the last reference unregisters the ranges and wakes any blocked writer.
            self._uffd.close()
            self._uffd = None
        if self._bitmaps is not None:
            self._bitmaps.close()
            self._bitmaps = None

    def _written_guest(self, name: str, first: int, end: int) -> np.ndarray:
        assert self._bitmaps is not None
        off = self._offsets[[r.name for r in self.regions].index(name)]
        # the half the handler fills now: every page it unprotected since the last sync
        live = np.frombuffer(self._bitmaps, dtype=bool, count=self._total, offset=self._active)
        out = live[off + first : off + end].copy()
        del live
        return out

    # --- sync ------------------------------------------------------------------------------
    def _sync_guest(self) -> dict[str, np.ndarray]:
        assert self._ctl is not None and self._bitmaps is not None
        try:
            self._ctl.sendall(b"S")
        except OSError:
            pass  # a dead handler: _expect below says how it ended
        self._expect(b"K", "sync")
        # The handler now fills the other half; the half it left is ours until the next sync.
        done = np.frombuffer(self._bitmaps, dtype=bool, count=self._total, offset=self._active)
        result = {
            r.name: done[off : off + r.npages].copy()
            for r, off in zip(self.regions, self._offsets, strict=True)
        }
        done[:] = False
        del done  # release the buffer export so the mmap can be closed later
        self._active = self._total - self._active
        return result
