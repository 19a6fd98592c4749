"""The guest clock: nanoseconds, monotonic, counting only while the guest runs.

Like QEMU's virtual clock under TCG, it stops while the vCPUs are stopped, so a pause (or the
blackout of a migration) is invisible to the guest: it never sees time jump, and a workload
pacing itself by the clock does not try to catch up afterwards. Its value is part of the
migrated state, so it continues on the destination from where it stopped on the source.

Ports (``abi.py``): an ``in`` from ``CLOCK_PORT_LO`` latches the clock and returns the low 32
bits; ``CLOCK_PORT_HI`` returns the high half of that latch. The latch is per vCPU (two vCPUs
reading at once must not mix halves) and is migrated too: a pause may fall between the two
reads. An ``out`` to ``SLEEP_PORT`` sleeps that many microseconds on the host, cut short when
the machine stops so that a pause is never delayed by a sleeping guest.
"""

from __future__ import annotations

import threading
import time
from typing import ClassVar

from livemig import vmstate as vs
from livemig.machine.abi import CLOCK_PORT_HI, CLOCK_PORT_LO, MAX_CPUS, SLEEP_PORT
from livemig.machine.devices.base import Device

MAX_SLEEP_S = 1.0  # one guest sleep is capped so the vCPU thread stays responsive


class GuestClock(Device):
    """Guest-visible monotonic nanosecond clock with a sleep port."""

    idstr: ClassVar[str] = "livemig-clock"
    ports: ClassVar[tuple[range, ...]] = (
        range(CLOCK_PORT_LO, CLOCK_PORT_LO + 4),
        range(CLOCK_PORT_HI, CLOCK_PORT_HI + 4),
        range(SLEEP_PORT, SLEEP_PORT + 4),
    )
    vmsd = vs.vmsd("livemig-clock", 1, [vs.u64("clock_ns"), vs.u64("latch", MAX_CPUS)])

    def __init__(self) -> None:
        self.clock_ns = 0
        self.latch = [0] * MAX_CPUS
        self._base_ns = 0  # guest time when the clock last started
        self._host_start: int | None = None  # host monotonic ns at that moment; None = stopped
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._wake.set()  # stopped until the machine runs

    def now_ns(self) -> int:
        """The current guest time in nanoseconds."""
        with self._lock:
            if self._host_start is None:
                return self._base_ns
            return self._base_ns + time.monotonic_ns() - self._host_start

    def vm_state_change(self, running: bool) -> None:
        with self._lock:
            if running and self._host_start is None:
                self._host_start = time.monotonic_ns()
            elif not running and self._host_start is not None:
                self._base_ns += time.monotonic_ns() - self._host_start
                self._host_start = None
        if running:
            self._wake.clear()
        else:
            self._wake.set()

    def pre_save(self) -> None:
        self.clock_ns = self.now_ns()

    def post_load(self) -> None:
        with self._lock:
            self._base_ns = self.clock_ns
            if self._host_start is not None:
                self._host_start = time.monotonic_ns()

    def io_read(self, cpu: int, port: int, size: int) -> int:
        if port == CLOCK_PORT_LO:
            self.latch[cpu] = self.now_ns()
            return self.latch[cpu] & 0xFFFF_FFFF
        if port == CLOCK_PORT_HI:
            return self.latch[cpu] >> 32
        return super().io_read(cpu, port, size)

    def io_write(self, cpu: int, port: int, size: int, value: int) -> None:
        if port == SLEEP_PORT:
            self._wake.wait(min(value / 1e6, MAX_SLEEP_S))
