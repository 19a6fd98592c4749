"""The device model: port-I/O devices whose migratable state is declared once as typed fields.

A device subclass sets ``idstr`` (its section name in a migration stream), ``ports`` (the I/O
ports it answers) and ``vmsd`` (QEMU's VMStateDescription idea, from ``livemig.vmstate``). Each
field of ``vmsd`` names an attribute of the device, so ``save_state`` / ``load_state`` (and from
them the binary ``save`` / ``load`` and the vmdesc JSON) are derived from the declaration and
never written by hand. ``pre_save`` and ``post_load`` are the hooks QEMU has for state that
must be computed on the way out or re-derived on the way in.

``PortIOBus`` routes the guest's IN/OUT instructions to the device owning the port; unknown
ports read as all ones and ignore writes, as on a PC.
"""

from __future__ import annotations

from typing import Any, ClassVar

from livemig.errors import MachineError, VMStateError
from livemig.vmstate import VMStateDescription


class Device:
    """Base of every port-I/O device."""

    idstr: ClassVar[str]
    instance_id: int = 0
    ports: ClassVar[tuple[range, ...]] = ()
    vmsd: ClassVar[VMStateDescription]

    def io_read(self, cpu: int, port: int, size: int) -> int:
        """The value an ``in`` of ``size`` bytes from ``port`` returns on vCPU ``cpu``."""
        return (1 << (8 * size)) - 1

    def io_write(self, cpu: int, port: int, size: int, value: int) -> None:
        """Handle an ``out`` of ``size`` bytes to ``port`` from vCPU ``cpu``."""

    def vm_state_change(self, running: bool) -> None:
        """Called when the vCPUs start (``True``) or stop (``False``); QEMU: vmstate change."""

    def pre_save(self) -> None:
        """Bring the declared attributes up to date before they are read."""

    def post_load(self) -> None:
        """Re-derive internal state after the declared attributes were loaded."""

    def close(self) -> None:
        """Release host resources (threads, files, sockets)."""

    # -- derived from vmsd --------------------------------------------------------------------

    def save_state(self) -> dict[str, Any]:
        """The declared fields' current values (call only while the vCPUs are stopped)."""
        self.pre_save()
        return {f.name: _copy(getattr(self, f.name)) for f in self.vmsd.fields}

    def load_state(self, values: dict[str, Any]) -> None:
        """Set the declared fields from ``values`` (as ``save_state`` or ``vmsd.decode`` give)."""
        missing = [f.name for f in self.vmsd.fields if f.name not in values]
        if missing:
            raise MachineError(f"device {self.idstr}: state lacks fields {', '.join(missing)}")
        for f in self.vmsd.fields:
            setattr(self, f.name, _copy(values[f.name]))
        self.post_load()

    # The names the savevm layer uses for the two directions.
    def get_state(self) -> dict[str, Any]:
        return self.save_state()

    def set_state(self, values: dict[str, Any]) -> None:
        self.load_state(values)

    def save(self) -> bytes:
        """The device's section payload."""
        return self.vmsd.encode(self.save_state())

    def load(self, data: bytes | memoryview, version_id: int | None = None) -> None:
        """Load a section payload; trailing bytes are a format error."""
        values, end = self.vmsd.decode(data, 0, version_id)
        if end != len(data):
            raise VMStateError(f"{self.idstr}: {len(data) - end} unexpected bytes after state", end)
        self.load_state(values)


def _copy(value: Any) -> Any:
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


class PortIOBus:
    """The I/O port space: maps each port to the device that claimed it."""

    def __init__(self) -> None:
        self._owners: dict[int, Device] = {}

    def attach(self, device: Device) -> None:
        for rng in device.ports:
            for port in rng:
                other = self._owners.get(port)
                if other is not None:
                    raise MachineError(
                        f"port {port:#x} claimed by both {other.idstr} and {device.idstr}"
                    )
                self._owners[port] = device

    def read(self, cpu: int, port: int, size: int) -> int:
        dev = self._owners.get(port)
        if dev is None:
            return (1 << (8 * size)) - 1
        return dev.io_read(cpu, port, size) & ((1 << (8 * size)) - 1)

    def write(self, cpu: int, port: int, size: int, value: int) -> None:
        dev = self._owners.get(port)
        if dev is not None:
            dev.io_write(cpu, port, size, value & ((1 << (8 * size)) - 1))
