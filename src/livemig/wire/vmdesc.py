"""The JSON vmstate description ("vmdesc") that trails a precopy stream, both ways.

Building: ``build_vmdesc`` writes QEMU 9.0+'s format (``{"configuration": {...}, "page_size":
4096, "devices": [...]}``, with QEMU's ``", "``/``": "`` separators) for the configuration
section and the FULL sections we send, so QEMU's ``scripts/analyze-migration.py`` can read a
livemig stream. Parsing: ``find_vmdesc`` locates the
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


def _field(name: str, ftype: str, size: int, count: int = 1) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name}
    if count > 1:
        out["array_len"] = count  # QEMU's compressed array: the size is one element's
    out.update({"type": ftype, "size": size})
    return out


def configuration_entry(
    machine_type: str,
    capabilities: tuple[str, ...] | None = None,
    target_page_bits: int | None = None,
    uuid: bytes | None = None,
) -> dict[str, Any]:
    """The ``configuration`` key QEMU 9.0+ writes first in its vmdesc: the layout of the
    stream's configuration section (``vmstate_configuration`` in QEMU's savevm.c) with the
    subsections the section carries. Without it QEMU's analyze-migration.py reads the section
    by the pre-9.0 rule (length and name only) and fails on a capabilities subsection."""
    entry: dict[str, Any] = {
        "vmsd_name": "configuration",
        "version": 1,
        "fields": [_field("len", "uint32", 4),
                   _field("name", "buffer", len(machine_type.encode()))],
    }  # fmt: skip
    subs: list[dict[str, Any]] = []
    if target_page_bits is not None:
        subs.append({"vmsd_name": "configuration/target-page-bits", "version": 1,
                     "fields": [_field("target_page_bits", "uint32", 4)]})  # fmt: skip
    if capabilities is not None:
        first = 1 + len(capabilities[0].encode()) if capabilities else 0
        fields = [_field("caps_count", "uint32", 4)]
        if capabilities:
            fields.append(_field("capabilities", "capability", first, len(capabilities)))
        subs.append({"vmsd_name": "configuration/capabilities", "version": 1, "fields": fields})
    if uuid is not None:
        subs.append({"vmsd_name": "configuration/uuid", "version": 1,
                     "fields": [_field("uuid.data", "uint8", 1, len(uuid))]})  # fmt: skip
    if subs:
        entry["subsections"] = subs
    return entry


def build_vmdesc(
    devices: Iterable[tuple[str, int, VMStateDescription, Mapping[str, Any] | None]],
    page_size: int = TARGET_PAGE_SIZE,
    configuration: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The description of the FULL sections ``(idstr, instance_id, vmsd, state)`` in order;
    ``configuration`` (from ``configuration_entry``) comes first, as QEMU 9.0+ writes it."""
    out: dict[str, Any] = {} if configuration is None else {"configuration": dict(configuration)}
    out["page_size"] = page_size
    out["devices"] = [device_entry(i, n, v, s) for i, n, v, s in devices]
    return out


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
