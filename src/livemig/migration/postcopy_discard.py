"""The destination's discard at the post-copy switch, on a thread of its own (QEMU:
``ram_discard_range`` from ``loadvm_postcopy_ram_handle_discard``).

Theory of operation: at the switch the source sends the ranges of pages dirtied since they were
sent (POSTCOPY_RAM_DISCARD), then the package (LISTEN, device state, RUN). The destination must
drop those pages from the guest's mapping before the guest runs, and with a dirtying guest that
is most of the blackout: ``madvise`` of a 64 MiB working set takes 2-7 ms here (the first
figure with ``MADV_DONTNEED`` and minor faults, the second with ``MADV_REMOVE``), while
parsing the package, registering userfaultfd and loading the devices take ~2 ms more. QEMU's
incoming thread does all of it in turn. Here the incoming thread only marks the pages needed
(that is what the fault thread goes by) and hands the ranges to a ``Discarder`` thread, which
makes the system calls (they release the GIL) while the incoming thread goes on with the
package; ``wait`` before RUN (and before x-verify's checksum of the present pages at LISTEN)
joins it. So the discard overlaps the rest of the switch instead of preceding it.

``UFFDIO_REGISTER`` at LISTEN takes the address space's lock for writing and ``madvise`` for
reading: each call here covers at most ``CHUNK`` bytes, so that the registration waits for one
chunk (~0.1 ms), not for the whole discard. No vCPU runs before RUN, so no fault can see a page
between "needed" and "dropped". The thread runs real-time while it works, as the incoming thread
does during the blackout (``migration/priority.py``).
"""

from __future__ import annotations

import threading
import time
from collections import deque

from livemig import threads
from livemig.errors import MigrationError
from livemig.memtrack._sys import KernelError, madvise
from livemig.migration.priority import blackout_priority, restore_priority

CHUNK = 2 << 20  # bytes per madvise call


class Discarder:
    """``madvise(advice)`` of the ranges given to ``add``, on its own thread, until ``wait``."""

    def __init__(self, advice: int, name: str = "mig/dst/discard") -> None:
        self.advice = advice
        self.name = name
        self.busy = 0.0  # seconds spent in madvise
        self.waited = 0.0  # seconds ``wait`` waited for the thread
        self._jobs: deque[tuple[int, int]] = deque()
        self._pending = 0  # ranges added and not dropped yet
        self._cv = threading.Condition()
        self._closed = False
        self._error: str | None = None
        self._thread: threading.Thread | None = None

    def add(self, addr: int, length: int) -> None:
        """Drop [addr, addr+length) (page aligned, inside guest RAM: the caller checked)."""
        with self._cv:
            if self._closed:
                raise MigrationError("post-copy discard after the guest was started")
            self._jobs.append((addr, length))
            self._pending += 1
            self._cv.notify_all()
        if self._thread is None:
            self._thread = threads.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def wait(self, timeout: float) -> None:
        """Every range added so far is dropped when this returns; raises MigrationError if a
        ``madvise`` failed or the thread did not finish within ``timeout`` seconds."""
        t0 = time.monotonic()
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise MigrationError(f"post-copy discard not done after {timeout:g} s")
        self.waited += time.monotonic() - t0
        if self._error is not None:
            raise MigrationError(f"post-copy discard failed: {self._error}")

    def flush(self, timeout: float) -> None:
        """Wait until every range added so far is dropped (more may come after); a failure or
        a time-out is left for ``wait`` to report."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._pending and self._error is None and time.monotonic() < deadline:
                self._cv.wait(0.1)

    def close(self) -> None:
        """Stop taking ranges; the thread ends once it has dropped those it has (no wait)."""
        with self._cv:
            self._closed = True
            self._cv.notify()

    def _loop(self) -> None:
        saved = blackout_priority()
        try:
            while True:
                with self._cv:
                    while not self._jobs and not self._closed:
                        self._cv.wait()
                    if not self._jobs:
                        return
                    addr, length = self._jobs.popleft()
                t0 = time.perf_counter()
                try:
                    # after a failure the migration fails at ``wait``: no more calls
                    for off in range(0, length if self._error is None else 0, CHUNK):
                        madvise(addr + off, min(CHUNK, length - off), self.advice)
                except KernelError as exc:
                    self._error = str(exc)
                self.busy += time.perf_counter() - t0
                with self._cv:
                    self._pending -= 1
                    self._cv.notify_all()
        finally:
            restore_priority(saved)
