"""``query-qmp-schema``: what this monitor implements, in QEMU's introspection format.

QEMU answers ``query-qmp-schema`` with a list of ``SchemaInfo`` (qapi/introspect.json): one
entry per command and event (by name), and one per type they use, the types named by numbers
("0" is the empty object) except the builtins (``str``, ``int``, ``number``, ``bool``,
``null``, ``any``). Every integer width is ``int`` there; an optional member has
``"default": null``; an enum lists its values twice (``members`` and ``values``); a list type
is named ``[N]``; ``StrOrNull`` is an alternate of ``str`` and ``null``.

livemig builds it from what it really has, so it is honest by construction: the registry's
commands with their argument specs (``Arg``), declared return types and out-of-band flags, and
the events the registry declares (``CommandRegistry.add_event``; the server refuses to emit an
undeclared one). livemig's own ``x-`` commands and members carry QEMU's ``unstable`` feature.
Types are numbered in the order they are first met; identical types share a number.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from livemig.qmp.commands import Arg, Command

BUILTINS = {"str": "string", "any": "value", "bool": "boolean", "int": "int", "null": "null",
            "number": "number"}  # fmt: skip
_JSON_BUILTIN = {str: "str", int: "int", float: "number", bool: "bool"}
_INTS = {"int", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "size"}


class _Builder:
    def __init__(self) -> None:
        self.types: list[dict[str, Any]] = []
        self._names: dict[str, str] = {}
        self.used_builtins: set[str] = set()
        self.object([])  # "0": the empty object, as QEMU numbers it

    def _add(self, body: dict[str, Any]) -> str:
        key = json.dumps(body, sort_keys=True)
        name = self._names.get(key)
        if name is None:
            name = str(len(self._names))
            self._names[key] = name
            self.types.append({"name": name, **body})
        return name

    def builtin(self, name: str) -> str:
        self.used_builtins.add(name)
        return name

    def object(self, members: list[dict[str, Any]]) -> str:
        return self._add({"members": members, "meta-type": "object"})

    def enum(self, values: Iterable[str]) -> str:
        vals = list(values)
        return self._add({"members": [{"name": v} for v in vals], "meta-type": "enum",
                          "values": vals})  # fmt: skip

    def array(self, element: str) -> str:
        name = f"[{element}]"
        if name not in self._names.values():
            self._names[f"array:{element}"] = name
            self.types.append({"name": name, "element-type": element, "meta-type": "array"})
        return name

    def alternate(self, members: list[str]) -> str:
        return self._add({"members": [{"type": m} for m in members], "meta-type": "alternate"})

    def type_of(self, arg: Arg | None) -> str:
        """The schema type name of an argument, member or return value."""
        if arg is None:
            return self.builtin("any")
        q = arg.qtype
        if arg.choices is not None:
            return self.enum(arg.choices)
        if q == "StrOrNull" or (arg.type is str and arg.nullable):
            return self.alternate([self.builtin("str"), self.builtin("null")])
        if q in _INTS:
            return self.builtin("int")
        if q == "bool":
            return self.builtin("bool")
        if arg.type is list:
            return self.array(self.type_of(arg.items))
        if arg.type is dict:
            if arg.members is None:
                return self.builtin("any")
            return self.object(self.members(arg.members))
        if arg.type is object:
            return self.builtin("any")
        return self.builtin(_JSON_BUILTIN[arg.type])

    def members(self, spec: Mapping[str, Arg]) -> list[dict[str, Any]]:
        out = []
        for name, arg in spec.items():
            entry: dict[str, Any] = {"name": name}
            if arg.optional:
                entry["default"] = None
            entry["type"] = self.type_of(arg)
            if name.startswith("x-"):
                entry["features"] = ["unstable"]
            out.append(entry)
        return out


def introspect(commands: Iterable[Command], events: Mapping[str, Mapping[str, Arg] | None]
               ) -> list[dict[str, Any]]:  # fmt: skip
    """The SchemaInfo list of ``commands`` and ``events`` (name -> data members)."""
    b = _Builder()
    entities: list[dict[str, Any]] = []
    for cmd in commands:
        entry: dict[str, Any] = {"name": cmd.name, "meta-type": "command",
                                 "arg-type": b.object(b.members(cmd.args))}  # fmt: skip
        entry["ret-type"] = b.object([]) if cmd.returns is None else b.type_of(cmd.returns)
        if cmd.allow_oob:
            entry["allow-oob"] = True
        features = list(cmd.features)
        if cmd.name.startswith("x-") and "unstable" not in features:
            features.append("unstable")
        if features:
            entry["features"] = features
        entities.append(entry)
    for name, data in events.items():
        entities.append({"name": name, "meta-type": "event",
                         "arg-type": b.object(b.members(data or {}))})  # fmt: skip
    builtins = [{"name": n, "json-type": BUILTINS[n], "meta-type": "builtin"}
                for n in BUILTINS if n in b.used_builtins]  # fmt: skip
    return entities + b.types + builtins
