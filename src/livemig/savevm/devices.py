"""Non-iterative sections: the vCPUs, the devices and the global run state.

Each entry pairs a section identity (idstr, instance_id, version) with a vmstate description
and the two functions that read and restore the state, so the source writes FULL sections and
the destination loads them without knowing what any device is. The ``globalstate`` section is
QEMU's: it carries the source's run state so the destination knows whether to start the guest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from livemig import vmstate
from livemig.errors import StreamError
from livemig.vmstate import VMStateDescription

GLOBALSTATE_VMSD = vmstate.vmsd(
    "globalstate", 1, [vmstate.u32("size"), vmstate.buffer("runstate", 100)]
)


def encode_globalstate(runstate: str) -> dict[str, Any]:
    raw = runstate.encode() + b"\0"
    return {"size": len(raw), "runstate": raw.ljust(100, b"\0")}


def decode_globalstate(state: dict[str, Any]) -> str:
    size = state["size"]
    raw = state["runstate"]
    if not 1 <= size <= 100:
        raise StreamError(f"globalstate: run state size {size} out of range 1..100")
    try:
        return bytes(raw[: size - 1]).decode("ascii")
    except UnicodeDecodeError:
        raise StreamError(f"globalstate: run state {bytes(raw[:size])!r} is not text") from None


@dataclass
class SaveStateEntry:
    """One FULL section: identity, layout, and how to get and set the state."""

    idstr: str
    instance_id: int
    vmsd: VMStateDescription
    save: Callable[[], dict[str, Any]]
    load: Callable[[dict[str, Any]], None]

    @property
    def version_id(self) -> int:
        return self.vmsd.version_id


def machine_entries(machine: Any) -> list[SaveStateEntry]:
    """The FULL sections of a machine: one ``cpu`` per vCPU, then every device.

    vCPU state is read once (the machine must be paused) and restored as a whole list, since
    ``Machine.load_cpu_states`` takes all vCPUs at once.
    """
    from livemig.machine import CPUState

    entries: list[SaveStateEntry] = []
    ncpu = len(machine.vcpus)
    loaded: dict[int, Any] = {}
    cached: list[Any] = []

    def save_cpu(i: int) -> dict[str, Any]:
        if not cached:
            cached.extend(machine.cpu_states())
        return cached[i].to_vmstate()

    def load_cpu(i: int, state: dict[str, Any]) -> None:
        loaded[i] = CPUState.from_vmstate(state)
        if len(loaded) == ncpu:
            machine.load_cpu_states([loaded[k] for k in range(ncpu)])

    for i in range(ncpu):
        entries.append(
            SaveStateEntry(
                "cpu", i, CPUState.vmsd,
                (lambda i=i: save_cpu(i)), (lambda s, i=i: load_cpu(i, s)),
            )
        )  # fmt: skip
    for dev in machine.devices:
        entries.append(SaveStateEntry(dev.idstr, dev.instance_id, dev.vmsd, dev.get_state,
                                      dev.set_state))  # fmt: skip
    return entries


def descriptions(entries: list[SaveStateEntry]) -> dict[str, VMStateDescription]:
    """idstr -> layout, for the decoder (``globalstate`` included)."""
    out = {e.idstr: e.vmsd for e in entries}
    out["globalstate"] = GLOBALSTATE_VMSD
    return out
