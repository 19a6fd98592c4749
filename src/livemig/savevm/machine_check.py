"""``x-machine``: the source's machine shape, sent at setup so that a destination that cannot
take the guest refuses it before any RAM is sent.

QEMU finds a mismatch late: a vCPU or device the destination lacks shows as a section it cannot
load, after the whole RAM copy. livemig's source sends this FULL section in the setup phase,
right after the configuration (QEMU sends ``early_setup`` devices' state there the same way,
e.g. virtio-mem), with the vCPU count and every device's section identity (idstr, instance,
version). The destination compares it with its own machine and fails at once, with a message
that says what to change (``--smp``, a livemig version); RAM blocks are checked at the ``ram``
section's setup right after it (``RamLoader.check_setup``). The section is optional: a stream
without it (an older livemig, a snapshot file) loads as before, and is checked section by
section at the end. Every decoder knows the section's layout (``wire/xsections.py``).
"""

from __future__ import annotations

from typing import Any

from livemig.errors import StreamError
from livemig.wire.xsections import MACHINE_DEVICES_SIZE as DEVICES_SIZE
from livemig.wire.xsections import MACHINE_IDSTR, MACHINE_VMSD

__all__ = ["MACHINE_IDSTR", "MACHINE_VMSD", "check_machine", "describe_machine"]


def _devices(machine: Any) -> dict[tuple[str, int], int]:
    return {(d.idstr, d.instance_id): d.vmsd.version_id for d in machine.devices}


def describe_machine(machine: Any) -> dict[str, Any]:
    """The section's state for ``machine``."""
    text = ";".join(f"{i}/{n}/{v}" for (i, n), v in sorted(_devices(machine).items())).encode()
    if len(text) > DEVICES_SIZE:
        raise ValueError(f"{MACHINE_IDSTR}: device list of {len(text)} bytes does not fit")
    return {"cpus": len(machine.vcpus), "devices": text.ljust(DEVICES_SIZE, b"\0")}


def _parse_devices(raw: bytes, offset: int) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = {}
    try:
        text = bytes(raw).rstrip(b"\0").decode("ascii")
        for item in filter(None, text.split(";")):
            idstr, inst, ver = item.rsplit("/", 2)
            out[(idstr, int(inst))] = int(ver)
    except (UnicodeDecodeError, ValueError):
        raise StreamError(f"{MACHINE_IDSTR}: malformed device list {bytes(raw)[:60]!r}",
                          offset) from None  # fmt: skip
    return out


def check_machine(machine: Any, state: dict[str, Any], offset: int) -> None:
    """Refuse (``StreamError``) a source machine this one cannot take."""
    cpus = state["cpus"]
    mine = len(machine.vcpus)
    if cpus != mine:
        raise StreamError(f"machine mismatch: the source has {cpus} vCPUs, this machine {mine} "
                          f"(start the destination with --smp {cpus})", offset)  # fmt: skip
    theirs = _parse_devices(state["devices"], offset)
    here = _devices(machine)
    for (idstr, inst), ver in sorted(theirs.items()):
        have = here.get((idstr, inst))
        if have is None:
            raise StreamError(f"machine mismatch: the source has device {idstr!r} instance "
                              f"{inst}, this machine does not", offset)  # fmt: skip
        if ver > have:
            raise StreamError(f"machine mismatch: device {idstr!r} is version {ver} at the "
                              f"source, newer than this livemig's {have}", offset)  # fmt: skip
