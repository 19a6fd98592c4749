"""The fault-handler process of the ``uffd-wp`` backend (run as ``python -m`` by ``wp_sync``).

Why a separate process: a thread that writes a write-protected page while holding the GIL (a
numpy store in Python, a device hook) blocks in the kernel with the GIL held, so a handler
*thread* could never run and the process would deadlock. A handler process has its own
interpreter; the userfaultfd it inherited acts on the tracked process's memory from here.

Protocol: argv carries the userfaultfd, the memfd holding two bitmaps (one byte per page,
``2 * total pages``), the control socket, and ``host_addr:npages:offset`` per region. The
process is single-threaded, which is what makes sync atomic: it handles fault batches (mark the
page in the *active* bitmap, then lift the protection, which wakes the writer) and control
commands one at a time. ``S`` (sync): write-protect again every page marked in the active
bitmap, make the other bitmap active, answer ``K``. ``Q`` or EOF: exit.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import select
import signal
import socket
import sys

from livemig.memtrack._sys import PAGE_SHIFT
from livemig.memtrack.uffd import Userfaultfd

PR_SET_PDEATHSIG = 1


class _Handler:
    def __init__(self, uffd: Userfaultfd, bitmaps: mmap.mmap, regions: list[tuple[int, int, int]]):
        self.uffd = uffd
        self.bitmaps = bitmaps
        self.regions = sorted(regions)
        self.starts = [r[0] for r in self.regions]
        self.total = len(bitmaps) // 2
        self.active = 0  # byte offset of the active bitmap: 0 or total

    def _locate(self, address: int) -> int | None:
        i = bisect.bisect_right(self.starts, address) - 1
        if i < 0:
            return None
        start, npages, offset = self.regions[i]
        page = (address - start) >> PAGE_SHIFT
        return offset + page if page < npages else None

    def on_faults(self) -> None:
        pages = set()
        for ev in self.uffd.read_events():
            if not ev.is_pagefault:
                continue
            index = self._locate(ev.address)
            if index is not None:
                # Mark before unprotecting: once unprotected, a sync could otherwise miss it.
                self.bitmaps[self.active + index] = 1
                pages.add(ev.address >> PAGE_SHIFT)
        # Lift the protections of the batch in runs of adjacent pages: one ioctl per run.
        run_start = prev = None
        for page in sorted(pages):
            if prev is not None and page == prev + 1:
                prev = page
                continue
            if run_start is not None:
                self._unprotect(run_start, prev)
            run_start = prev = page
        if run_start is not None:
            self._unprotect(run_start, prev)

    def _unprotect(self, first: int, last: int) -> None:
        self.uffd.writeprotect(first << PAGE_SHIFT, (last - first + 1) << PAGE_SHIFT, False)

    def on_sync(self) -> None:
        bm, base = self.bitmaps, self.active
        for start, npages, offset in self.regions:
            pos, end = base + offset, base + offset + npages
            while pos < end:
                first = bm.find(b"\x01", pos, end)
                if first < 0:
                    break
                stop = bm.find(b"\x00", first, end)
                stop = end if stop < 0 else stop
                addr = start + ((first - base - offset) << PAGE_SHIFT)
                self.uffd.writeprotect(addr, (stop - first) << PAGE_SHIFT, True)
                pos = stop
        self.active = self.total - self.active


def main(argv: list[str]) -> int:
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    uffd_fd, memfd, sock_fd = (int(x) for x in argv[:3])
    regions = [tuple(int(x) for x in spec.split(":")) for spec in argv[3:]]
    uffd = Userfaultfd.adopt(uffd_fd)
    bitmaps = mmap.mmap(memfd, os.fstat(memfd).st_size)
    os.close(memfd)
    ctl = socket.socket(fileno=sock_fd)
    handler = _Handler(uffd, bitmaps, regions)  # type: ignore[arg-type]
    poller = select.poll()
    poller.register(uffd_fd, select.POLLIN)
    poller.register(sock_fd, select.POLLIN)
    ctl.sendall(b"R")  # ready
    while True:
        for fd, _mask in poller.poll():
            if fd == uffd_fd:
                handler.on_faults()
                continue
            cmd = ctl.recv(1)
            if cmd == b"S":
                handler.on_sync()
                ctl.sendall(b"K")
            elif cmd in (b"Q", b""):
                return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
