"""Device state declared as typed fields: QEMU's VMStateDescription idea.

A device says once what its state is made of (a ``VMStateDescription``: a name, a version and a
list of ``Field``s, plus optional subsections); saving, loading and the JSON description that
trails a migration stream (the "vmdesc") are all derived from that one declaration. The binary
encoding is QEMU's: fields concatenated without tags, integers big-endian at their natural
width, arrays as consecutive elements, structs inline, then optional subsections::

    u8 0x05 | u8 len | name (starts with the parent's name) | be32 version | fields...

A description can also be rebuilt from a vmdesc entry (``VMStateDescription.from_vmdesc``), which
is how streams written by QEMU, whose devices we do not implement, are still decoded: types we do
not know ("pci config", ...) come back as opaque bytes of the size the vmdesc states.

Values are plain Python: ``int`` for integers, ``bool``, ``float``, ``bytes`` for buffers, a
``list`` for an array, a ``dict`` for a struct. A subsection is present in a state dict under its
own name exactly when it is sent.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from livemig.errors import VMStateError

SUBSECTION = 0x05


class VMStateTruncated(VMStateError):
    """The payload ended before its declared fields did (more input may complete it)."""


# vmdesc type name -> (struct format, is_integer)
_SCALARS: dict[str, str] = {
    "uint8": ">B",
    "uint16": ">H",
    "uint32": ">I",
    "uint64": ">Q",
    "int8": ">b",
    "int16": ">h",
    "int32": ">i",
    "int64": ">q",
    "uint8 equal": ">B",
    "uint16 equal": ">H",
    "uint32 equal": ">I",
    "uint64 equal": ">Q",
    "int32 equal": ">i",
    "int32 le": ">i",
    "timer": ">q",
    "bool": ">?",
    "float64": ">d",
}
_CODECS = {name: struct.Struct(fmt) for name, fmt in _SCALARS.items()}
_OPAQUE = ("buffer", "unused_buffer")


@dataclass(frozen=True)
class Field:
    """One declared field. ``size`` is the encoded size of one element in bytes."""

    name: str
    type: str
    size: int
    array_len: int | None = None
    struct: VMStateDescription | None = None
    # a variable-size buffer (QEMU's VMSTATE_VBUFFER_UINT32): its length is the value of the
    # earlier integer field ``size_field``; ``size`` is then the most it may hold
    size_field: str | None = None

    def __post_init__(self) -> None:
        if self.type == "struct":
            if self.struct is None:
                raise ValueError(f"struct field {self.name!r} needs a description")
        elif self.type in _CODECS and _CODECS[self.type].size != self.size:
            raise ValueError(f"field {self.name!r}: {self.type} is {_CODECS[self.type].size} bytes")

    @property
    def count(self) -> int:
        return 1 if self.array_len is None else self.array_len

    def describe(self, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
        size = self.size
        if self.size_field is not None:  # as QEMU: the size this save has
            size = int(values[self.size_field]) if values is not None else 0
        out: dict[str, Any] = {"name": self.name, "type": self.type, "size": size}
        if self.array_len is not None:
            out["array_len"] = self.array_len
        if self.struct is not None:
            out["struct"] = self.struct.describe_layout()
        return out


@dataclass(frozen=True)
class VMStateDescription:
    """A device's declared state layout (QEMU: ``VMStateDescription``)."""

    name: str
    version_id: int
    fields: tuple[Field, ...]
    minimum_version_id: int = 0
    subsections: tuple[VMStateDescription, ...] = field(default=())

    # -- binary -------------------------------------------------------------------------------

    def encode(self, values: Mapping[str, Any]) -> bytes:
        """The binary payload of ``values`` (fields, then present subsections)."""
        out = bytearray()
        self._encode_into(out, values)
        return bytes(out)

    def _encode_into(self, out: bytearray, values: Mapping[str, Any]) -> None:
        start = len(out)
        try:
            self._encode_fast(out, values)
        except (KeyError, ValueError, TypeError, struct.error):
            # the field-by-field walk below names the field and what is wrong with it
            del out[start:]
            self._encode_fields(out, values)

    def _encode_fast(self, out: bytearray, values: Mapping[str, Any]) -> None:
        """``_encode_fields`` with each run of scalar fields packed by one ``struct``: a vCPU's
        section has ~150 integers, packed one call each inside a switch-over's downtime."""
        plan = self.__dict__.get("_plan")
        if plan is None:
            plan = _encode_plan(self.fields)
            object.__setattr__(self, "_plan", plan)  # derived from the frozen fields: a cache
        for run, names in plan:
            if run is None:
                for f in names:
                    self._encode_field(out, f, values)
                continue
            flat: list[Any] = []
            for name, alen in names:
                value = values[name]
                if alen is None:
                    flat.append(value)
                elif len(value) == alen:
                    flat.extend(value)
                else:
                    raise ValueError(name)
            out += run.pack(*flat)
        self._encode_subsections(out, values)

    def _encode_fields(self, out: bytearray, values: Mapping[str, Any]) -> None:
        for f in self.fields:
            self._encode_field(out, f, values)
        self._encode_subsections(out, values)

    def _encode_field(self, out: bytearray, f: Field, values: Mapping[str, Any]) -> None:
        """One field, checked: what is wrong is named with the field."""
        try:
            value = values[f.name]
        except KeyError:
            raise KeyError(f"{self.name}: no value for field {f.name!r}") from None
        items = value if f.array_len is not None else (value,)
        if f.array_len is not None and len(items) != f.array_len:
            raise ValueError(f"{self.name}.{f.name}: expected {f.array_len} elements")
        if f.size_field is not None:
            raw = bytes(value)
            if len(raw) != values[f.size_field] or len(raw) > f.size:
                raise ValueError(f"{self.name}.{f.name}: {len(raw)} bytes, {f.size_field} "
                                 f"says {values[f.size_field]} (at most {f.size})")  # fmt: skip
            out += raw
            return
        for item in items:
            _encode_one(out, self.name, f, item)

    def _encode_subsections(self, out: bytearray, values: Mapping[str, Any]) -> None:
        for sub in self.subsections:
            if sub.name in values:
                name = sub.name.encode()
                out += bytes((SUBSECTION, len(name))) + name + sub.version_id.to_bytes(4, "big")
                sub._encode_into(out, values[sub.name])

    def decode(
        self,
        data: bytes | memoryview,
        offset: int = 0,
        version_id: int | None = None,
        *,
        base: int = 0,
    ) -> tuple[dict[str, Any], int]:
        """Decode a payload starting at ``data[offset]``; returns ``(values, end_offset)``.

        ``version_id`` is the version announced by the stream (checked against this
        description's range). ``base`` is added to offsets in error messages so they name the
        absolute stream position.
        """
        view = memoryview(data)
        if version_id is not None and not (
            self.minimum_version_id <= version_id <= self.version_id
        ):
            raise VMStateError(
                f"{self.name}: version {version_id} not in supported range "
                f"{self.minimum_version_id}..{self.version_id}",
                base + offset,
            )
        values: dict[str, Any] = {}
        for f in self.fields:
            if f.size_field is not None:
                n = values[f.size_field]
                if n > f.size:
                    raise VMStateError(f"{self.name}.{f.name}: {n} bytes (at most {f.size})",
                                       base + offset)  # fmt: skip
                values[f.name], offset = _decode_one(view, offset, self.name,
                                                     Field(f.name, "buffer", n), base)  # fmt: skip
            elif f.array_len is None:
                values[f.name], offset = _decode_one(view, offset, self.name, f, base)
            else:
                items = []
                for _ in range(f.array_len):
                    item, offset = _decode_one(view, offset, self.name, f, base)
                    items.append(item)
                values[f.name] = items
        while (
            offset + 2 <= len(view)
            and view[offset] == SUBSECTION
            and offset + 2 + view[offset + 1] <= len(view)
            and bytes(view[offset + 2 : offset + 2 + view[offset + 1]]).startswith(
                self.name.encode()
            )
        ):
            start = offset
            n = view[offset + 1]
            raw = bytes(view[offset + 2 : offset + 2 + n])
            offset += 2 + n
            if offset + 4 > len(view):
                raise VMStateTruncated(f"{self.name}: subsection header truncated", base + start)
            version = int.from_bytes(view[offset : offset + 4], "big")
            offset += 4
            name = _text(raw, base + start)
            sub = next((s for s in self.subsections if s.name == name), None)
            if sub is None:
                raise VMStateError(f"{self.name}: unknown subsection {name!r}", base + start)
            values[name], offset = sub.decode(view, offset, version, base=base)
        return values, offset

    def fixed_size(self) -> int:
        """Encoded size of the fields alone (subsections excluded; a variable-size buffer at
        its largest)."""
        return sum(f.size * f.count for f in self.fields)

    # -- vmdesc JSON --------------------------------------------------------------------------

    def describe_layout(self) -> dict[str, Any]:
        """The ``{"vmsd_name", "version", "fields"[, "subsections"]}`` part of a vmdesc entry."""
        return {
            "vmsd_name": self.name,
            "version": self.version_id,
            "fields": [f.describe() for f in self.fields],
        }

    def describe(self, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """As ``describe_layout``, listing only the subsections present in ``values`` (and a
        variable-size buffer at the size it has in them)."""
        out = self.describe_layout()
        if values is not None and any(f.size_field for f in self.fields):
            out["fields"] = [f.describe(values) for f in self.fields]
        present = [s for s in self.subsections if values is not None and s.name in values]
        if present:
            out["subsections"] = [s.describe(values[s.name]) for s in present]  # type: ignore[index]
        return out

    @classmethod
    def from_vmdesc(cls, desc: Mapping[str, Any]) -> VMStateDescription:
        """Rebuild a description from a vmdesc device entry (QEMU's or ours)."""
        try:
            name = desc.get("vmsd_name") or desc["name"]
            fields = tuple(_field_from_vmdesc(f) for f in desc.get("fields", ()))
            subs = tuple(cls.from_vmdesc(s) for s in desc.get("subsections", ()))
            version = int(desc.get("version", 0))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise VMStateError(f"malformed vmdesc entry: {exc!r}") from exc
        return cls(name=str(name), version_id=version, fields=fields, subsections=subs)


def _field_from_vmdesc(f: Mapping[str, Any]) -> Field:
    ftype = str(f["type"])
    size = int(f["size"])
    array_len = f.get("array_len")
    if size < 0 or (array_len is not None and int(array_len) < 0):
        raise ValueError(f"negative size in field {f.get('name')!r}")
    sub = VMStateDescription.from_vmdesc(f["struct"]) if ftype == "struct" else None
    if ftype in _CODECS and _CODECS[ftype].size != size:
        ftype = "buffer"  # a type whose width differs from ours: keep the bytes, lose nothing
    return Field(str(f["name"]), ftype, size, None if array_len is None else int(array_len), sub)


def _encode_plan(fields: tuple[Field, ...]) -> list[tuple[struct.Struct | None, Any]]:
    """``fields`` as runs: (one ``struct.Struct`` for consecutive scalar fields, their
    (name, array_len)), or (None, the other fields of a run, encoded one by one)."""
    plan: list[tuple[struct.Struct | None, Any]] = []
    fmt = ""
    names: list[tuple[str, int | None]] = []
    others: list[Field] = []
    for f in fields:
        codec = _CODECS.get(f.type)
        if codec is not None and f.size_field is None:
            if others:
                plan.append((None, others))
                others = []
            fmt += codec.format[1:] * f.count
            names.append((f.name, f.array_len))
        else:
            if names:
                plan.append((struct.Struct(">" + fmt), names))
                fmt, names = "", []
            others.append(f)
    if names:
        plan.append((struct.Struct(">" + fmt), names))
    if others:
        plan.append((None, others))
    return plan


def _encode_one(out: bytearray, owner: str, f: Field, value: Any) -> None:
    codec = _CODECS.get(f.type)
    if codec is not None:
        try:
            out += codec.pack(value)
        except struct.error as exc:
            raise ValueError(f"{owner}.{f.name}: {value!r} does not fit {f.type}") from exc
    elif f.type == "struct":
        assert f.struct is not None
        f.struct._encode_into(out, value)
    else:
        raw = bytes(value)
        if len(raw) != f.size:
            raise ValueError(f"{owner}.{f.name}: {len(raw)} bytes given, {f.size} declared")
        out += raw


def _decode_one(view: memoryview, offset: int, owner: str, f: Field, base: int) -> tuple[Any, int]:
    codec = _CODECS.get(f.type)
    if f.type == "struct":
        assert f.struct is not None
        return f.struct.decode(view, offset, base=base)
    if offset + f.size > len(view):
        raise VMStateTruncated(
            f"{owner}.{f.name}: {f.type} needs {f.size} bytes, {len(view) - offset} left",
            base + offset,
        )
    if codec is not None:
        return codec.unpack_from(view, offset)[0], offset + f.size
    return bytes(view[offset : offset + f.size]), offset + f.size


def _text(raw: bytes, offset: int) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise VMStateError(f"subsection name {raw!r} is not text", offset) from None


# -- declaration helpers: what a device writes ------------------------------------------------


def _scalar(ftype: str) -> Any:
    size = _CODECS[ftype].size

    def make(name: str, array_len: int | None = None) -> Field:
        return Field(name, ftype, size, array_len)

    make.__name__ = ftype.replace(" ", "_")
    return make


u8 = _scalar("uint8")
u16 = _scalar("uint16")
u32 = _scalar("uint32")
u64 = _scalar("uint64")
i32 = _scalar("int32")
i64 = _scalar("int64")
boolean = _scalar("bool")
float64 = _scalar("float64")


def buffer(name: str, size: int, array_len: int | None = None) -> Field:
    """Raw bytes of a fixed size."""
    return Field(name, "buffer", size, array_len)


def vbuffer(name: str, size_field: str, max_size: int) -> Field:
    """Raw bytes whose count is the earlier integer field ``size_field`` (at most ``max_size``;
    QEMU's ``VMSTATE_VBUFFER_UINT32``). The vmdesc describes it as a buffer of the size it has
    in the state described."""
    return Field(name, "buffer", max_size, size_field=size_field)


def struct_field(name: str, vmsd: VMStateDescription, array_len: int | None = None) -> Field:
    """An inline struct (or an array of them)."""
    return Field(name, "struct", vmsd.fixed_size(), array_len, vmsd)


def vmsd(
    name: str,
    version_id: int,
    fields: Iterable[Field],
    *,
    minimum_version_id: int | None = None,
    subsections: Iterable[VMStateDescription] = (),
) -> VMStateDescription:
    """Declare a device's state."""
    return VMStateDescription(
        name=name,
        version_id=version_id,
        fields=tuple(fields),
        minimum_version_id=version_id if minimum_version_id is None else minimum_version_id,
        subsections=tuple(subsections),
    )
