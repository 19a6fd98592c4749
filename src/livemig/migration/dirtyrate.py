"""QEMU's ``calc-dirty-rate`` / ``query-dirty-rate``, measured with livemig's dirty tracker.

QEMU samples a few hundred pages per GiB and hashes them; livemig has the kernel's exact dirty
log, so it measures every page (mode ``dirty-bitmap``): it starts write-protect logging (with
the vCPUs held for the moment it takes, like a migration's setup), syncs every 100 ms for
``calc-time`` seconds, and reports the mean rate of newly dirtied pages. Beyond QEMU it also
reports the working set (distinct pages written in the whole window) and the populated bytes,
which the convergence planner needs.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from livemig import threads
from livemig.machine.abi import PAGE_SIZE

INTERVAL = 0.1


class DirtyRateMeasurement:
    """One background measurement; ``query`` gives QEMU's ``query-dirty-rate`` reply."""

    def __init__(self, machine: Any, calc_time: float, backend: str = "auto") -> None:
        self.machine = machine
        self.calc_time = calc_time
        self.backend = backend
        self.status = "unstarted"
        self.start_time = 0
        self.result: dict[str, Any] = {}
        self.error: str | None = None
        self.thread = threads.Thread(target=self._run, name="dirtyrate", daemon=True)

    def start(self) -> None:
        self.status = "measuring"
        self.start_time = int(time.monotonic())
        self.thread.start()

    def _run(self) -> None:
        from livemig.memtrack import open_tracker, present_pages

        blocks = self.machine.ram_blocks
        tracker = None
        try:
            tracker = open_tracker(blocks, backend=self.backend)
            with self.machine.quiesced():
                populated = sum(int(np.count_nonzero(present_pages(b.host_addr, b.size)))
                                for b in blocks)  # fmt: skip
                tracker.start()
            union = {b.idstr: np.zeros(b.npages, dtype=bool) for b in blocks}
            counts: list[int] = []
            t0 = time.monotonic()
            last = t0
            while time.monotonic() - t0 < self.calc_time:
                time.sleep(max(0.0, INTERVAL - (time.monotonic() - last)))
                bitmaps = tracker.sync()
                now = time.monotonic()
                n = 0
                for name, bm in bitmaps.items():
                    n += int(np.count_nonzero(bm))
                    np.logical_or(union[name], bm, out=union[name])
                counts.append(int(n / (now - last)))
                last = now
            rate = float(np.mean(counts)) * PAGE_SIZE if counts else 0.0
            ws = sum(int(np.count_nonzero(u)) for u in union.values()) * PAGE_SIZE
            self.result = {
                "dirty-rate": int(rate / 2**20),
                "x-dirty-rate-bytes": int(rate),
                "x-working-set": ws,
                "x-populated": populated * PAGE_SIZE,
                "x-dirty-tracker": tracker.name,
            }
            self.status = "measured"
        except Exception as exc:  # reported through query-dirty-rate, never a crash
            self.error = str(exc)
            self.status = "measured"
            self.result = {"dirty-rate": 0, "x-error": self.error}
        finally:
            if tracker is not None:
                tracker.stop()

    def query(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": self.status,
            "start-time": self.start_time,
            "calc-time": int(self.calc_time),
            "sample-pages": 0,
            "mode": "dirty-bitmap",
        }
        if self.status == "measured":
            out.update(self.result)
        return out
