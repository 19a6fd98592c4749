"""The JSON vmstate description ("vmdesc") that trails a precopy stream, both ways.

Building: ``build_vmdesc`` writes QEMU's format (``{"page_size": 4096, "devices": [...]}``, with
QEMU's ``", "``/``": "`` separators) for the FULL sections we send, so QEMU's
``scripts/analyze-migration.py`` can read a livemig stream. Parsing: ``find_vmdesc`` locates the
trailer from the end of a whole stream as QEMU's analyzer does (last NUL byte, then the first
``{`` after it, and the 0x06 type byte five bytes before it), ``descriptions_from_vmdesc`` turns
its device entries into ``VMStateDescription``s keyed by ``(idstr, instance_id)`` for the
decoder.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Iterable, Mapping
from typing import Any

from livemig.errors import StreamError, VMStateError
from livemig.vmstate import VMStateDescription
from livemig.wire.constants import QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION, TARGET_PAGE_SIZE


def device_entry(
    idstr: str, instance_id: int, vmsd: VMStateDescription, state: Mapping[str, Any] | None
) -> dict[str, Any]:
    """One ``devices`` entry: QEMU puts ``name`` and ``instance_id`` before the layout."""
    entry: dict[str, Any] = {"name": idstr, "instance_id": instance_id}
    entry.update(vmsd.describe(state))
    return entry


def build_vmdesc(
    devices: Iterable[tuple[str, int, VMStateDescription, Mapping[str, Any] | None]],
    page_size: int = TARGET_PAGE_SIZE,
) -> dict[str, Any]:
    """The description of the FULL sections ``(idstr, instance_id, vmsd, state)`` in order."""
    return {
        "page_size": page_size,
        "devices": [device_entry(i, n, v, s) for i, n, v, s in devices],
    }


def configuration_entry(ev: Any) -> dict[str, Any] | None:
    """The vmdesc ``configuration`` member for a configuration section with subsections (as
    QEMU 8.2+ writes it): without it QEMU's ``analyze-migration.py`` reads only the machine
    type and trips over the first subsection. None when there are none to describe."""
    subs = []
    if ev.target_page_bits is not None:
        subs.append({"vmsd_name": "configuration/target-page-bits", "version": 1,
                     "fields": [{"name": "target_page_bits", "type": "uint32", "size": 4}]})  # fmt: skip
    if ev.capabilities is not None:
        caps: dict[str, Any] = {"name": "capabilities", "type": "capability", "size": 4}
        if len(ev.capabilities) > 1:
            caps["array_len"] = len(ev.capabilities)
        fields = [{"name": "caps_count", "type": "uint32", "size": 4}]
        if ev.capabilities:
            fields.append(caps)
        subs.append({"vmsd_name": "configuration/capabilities", "version": 1, "fields": fields})
    if ev.uuid is not None:
        subs.append({"vmsd_name": "configuration/uuid", "version": 1,
                     "fields": [{"name": "uuid", "type": "buffer", "size": 16}]})  # fmt: skip
    if not subs:
        return None
    return {"vmsd_name": "configuration", "version": 1, "fields": [
        {"name": "len", "type": "uint32", "size": 4},
        {"name": "name", "type": "buffer", "size": len(ev.machine_type.encode())},
    ], "subsections": subs}  # fmt: skip


def dump_vmdesc(desc: Mapping[str, Any]) -> bytes:
    """Serialise as QEMU does (its JSON writer's separators)."""
    return json.dumps(desc, separators=(", ", ": ")).encode()


def find_vmdesc(data: bytes | memoryview) -> dict[str, Any] | None:
    """The vmdesc JSON trailing a complete stream, or None when it has none.

    Raises ``StreamError`` if a trailer is framed but does not parse.
    """
    view = memoryview(data)
    raw = bytes(view[-(1 << 24) :]) if len(view) > (1 << 24) else bytes(view)
    shift = len(view) - len(raw)
    nul = raw.rfind(b"\x00")
    if nul < 0:
        return None
    brace = raw.find(b"{", nul)
    if brace < 5 or raw[brace - 5] != QEMU_VM_VMDESCRIPTION:
        return None
    length = struct.unpack_from(">I", raw, brace - 4)[0]
    if brace + length != len(raw) or raw[brace - 6] != QEMU_VM_EOF:
        return None
    try:
        desc = json.loads(raw[brace:])
    except (UnicodeDecodeError, ValueError) as exc:
        raise StreamError(f"vmdesc trailer is not valid JSON: {exc}", shift + brace) from None
    if not isinstance(desc, dict) or not isinstance(desc.get("devices", []), list):
        raise StreamError("vmdesc trailer is not a QEMU description object", shift + brace)
    return desc


def descriptions_from_vmdesc(
    desc: Mapping[str, Any],
) -> dict[tuple[str, int], VMStateDescription]:
    """Device layouts of a vmdesc, by ``(idstr, instance_id)``."""
    out: dict[tuple[str, int], VMStateDescription] = {}
    devices = desc.get("devices", [])
    if not isinstance(devices, list):
        raise VMStateError("vmdesc 'devices' is not a list")
    for entry in devices:
        if not isinstance(entry, dict) or "name" not in entry:
            raise VMStateError(f"vmdesc device entry without a name: {entry!r:.80}")
        vmsd = VMStateDescription.from_vmdesc(entry)
        if "version" not in entry:
            # A legacy (non-vmsd) handler described as one opaque buffer: any version.
            vmsd = dataclasses.replace(vmsd, version_id=0xFFFFFFFF)
        out[(str(entry["name"]), int(entry.get("instance_id", 0)))] = vmsd
    return out
