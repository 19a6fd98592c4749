"""x-verify for CPU and device state: the destination holds what the source stopped with.

RAM digests (``x-verify``) prove the memory; they say nothing of the registers a vCPU resumes
with or of a device's state. With x-verify on, the source adds one more FULL section,
``x-verify-state``, after the device sections: for every device section it sent (one ``cpu``
per vCPU, then the devices) a 128-bit XXH3 digest of that section's encoded state, named
``idstr.instance``. The destination, once it has loaded every section and before the guest
runs, saves its own machine's state again (fresh, from the vCPUs and devices as loaded) and
compares digest for digest: a register the backend did not take, a device field lost on the
way in, a vCPU swapped for another all show up by name, and the guest is not resumed.

Like ``x-verify`` it is livemig's own section (QEMU's analyze-migration.py lists it as a device
with buffer fields); QEMU peers never see it, since x-verify is a livemig capability.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import xxhash

from livemig import vmstate

STATE_IDSTR = "x-verify-state"


def _key(entry: Any) -> str:
    return f"{entry.idstr}.{entry.instance_id}"


def state_vmsd(entries: Iterable[Any]) -> vmstate.VMStateDescription:
    """The section's layout: one 16-byte digest per device section, in save order."""
    return vmstate.vmsd(STATE_IDSTR, 1, [vmstate.buffer(_key(e), 16) for e in entries])


def digest_of(vmsd: vmstate.VMStateDescription, values: Mapping[str, Any]) -> bytes:
    """The digest of one section's state, over its encoding in the stream."""
    return xxhash.xxh3_128_digest(vmsd.encode(values))


def state_digests(states: Iterable[tuple[Any, Mapping[str, Any]]]) -> dict[str, bytes]:
    """``idstr.instance`` -> digest, for (entry, saved values) pairs."""
    return {_key(e): digest_of(e.vmsd, values) for e, values in states}


def compare(source: Mapping[str, Any], entries: Iterable[Any]) -> list[str]:
    """Save ``entries`` (the destination's machine, as loaded) and list the sections whose
    state differs from the source's digests (or that one side lacks)."""
    mine = state_digests((e, e.save()) for e in entries)
    theirs = {k: bytes(v) for k, v in source.items()}
    return sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))


def mismatch_message(differ: list[str]) -> str:
    return (
        "verification failed: after loading, the state of "
        + ", ".join(differ)
        + " differs from what the source stopped with; the guest is not resumed"
    )
