"""The power port: an ``out`` to ``POWER_PORT`` ends the guest with that exit status.

The write comes from a vCPU thread, which cannot wait for itself to stop, so the device only
records the status and calls the machine's ``on_poweroff`` callback; the machine stops the vCPUs
from another thread and moves to the ``shutdown`` run state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from livemig import vmstate as vs
from livemig.machine.abi import POWER_PORT
from livemig.machine.devices.base import Device


class PowerPort(Device):
    """Guest-initiated power-off with an exit status."""

    idstr: ClassVar[str] = "livemig-power"
    ports: ClassVar[tuple[range, ...]] = (range(POWER_PORT, POWER_PORT + 1),)
    # exit_status is -1 until the guest powers off; migrating it keeps a power-off that raced
    # with the switchover from being lost.
    vmsd = vs.vmsd("livemig-power", 1, [vs.i32("exit_status")])

    def __init__(self, on_poweroff: Callable[[int, int], None] | None = None) -> None:
        self.exit_status = -1
        self._on_poweroff = on_poweroff

    def io_write(self, cpu: int, port: int, size: int, value: int) -> None:
        self.exit_status = value & 0xFF
        if self._on_poweroff is not None:
            self._on_poweroff(cpu, self.exit_status)
