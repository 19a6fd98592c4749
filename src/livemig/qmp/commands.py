"""QMP command registry and argument checking, with QEMU's QAPI error texts.

A command is a name, a handler and an argument spec: a mapping from QMP argument names to
``Arg``. Before a handler runs, the ``arguments`` object is checked the way QEMU's generated
marshallers do (members in declared order: missing or mistyped first, then unexpected ones), so
the error texts match QEMU 7.2's::

    Parameter 'uri' is missing
    Invalid parameter type for 'resume', expected: boolean
    Parameter 'bogus' is unexpected
    Parameter 'capability' does not accept value 'nope'

Handlers are called with keyword arguments whose names are the QMP names with ``-`` turned into
``_`` (``exit-on-error`` -> ``exit_on_error``); optional arguments the client left out are not
passed, so a handler's own defaults apply. A handler returns something JSON-serialisable (``None``
becomes ``{}``) or raises ``QMPError`` (or any ``LivemigError``, reported as ``GenericError``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from livemig.errors import LivemigError

#: Error classes QEMU still emits (qapi/error.json).
ERROR_CLASSES = frozenset(
    {"GenericError", "CommandNotFound", "DeviceNotActive", "DeviceNotFound", "KVMMissingCap"}
)

_INT64_MIN = -(1 << 63)
_UINT64_MAX = (1 << 64) - 1

# QAPI's names for JSON types, as they appear in "expected: ..." messages.
_TYPE_NAMES: dict[type, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    dict: "object",
    list: "array",
}


class QMPError(LivemigError):
    """A command failed; becomes ``{"error": {"class": error_class, "desc": desc}}``."""

    def __init__(self, error_class: str, desc: str) -> None:
        if error_class not in ERROR_CLASSES:
            raise LivemigError(f"unknown QMP error class {error_class!r} (for: {desc})")
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"{error_class}: {desc}")

    def to_qmp(self) -> dict[str, str]:
        """The ``error`` member of a reply."""
        return {"class": self.error_class, "desc": self.desc}


@dataclass(frozen=True)
class Arg:
    """The type of one QMP argument (or of a member of a nested object / list element).

    ``type`` is one of ``str int float bool dict list object``; ``object`` accepts any JSON
    value (QAPI's ``any``). ``choices`` makes a ``str`` an enum; ``items`` types a list's
    elements; ``members`` types a dict's members (a QAPI struct: unknown members are refused);
    ``nullable`` also accepts JSON ``null`` (QAPI's ``StrOrNull``-style alternates).
    """

    type: type
    optional: bool = False
    choices: tuple[str, ...] | None = None
    items: Arg | None = None
    members: Mapping[str, Arg] | None = None
    nullable: bool = False
    # QAPI's type, where ``type`` says less: an integer's width and sign (``int``, ``uint8``
    # ... ``uint64``, ``size``; QEMU's messages differ by it), an enum's or alternate's name
    # (``MigrationCapability``, ``StrOrNull``). For the checks and for query-qmp-schema.
    qtype: str | None = None

    def __post_init__(self) -> None:
        if self.type not in _TYPE_NAMES and self.type is not object:
            raise LivemigError(f"unsupported QMP argument type {self.type!r}")
        if self.type is int and self.qtype not in (None, *_INT_TYPES):
            raise LivemigError(f"unknown QAPI integer type {self.qtype!r}")

    def check(self, name: str, value: Any) -> Any:
        """Return ``value`` converted for the handler, or raise ``QMPError`` naming ``name``."""
        if value is None and self.nullable:
            return None
        if self.type is object:
            return value
        if self.type is int and self.qtype not in (None, "int", "int64"):
            return _check_sized_int(name, value, self.qtype)
        if not self._has_type(value):
            raise QMPError(
                "GenericError",
                f"Invalid parameter type for '{name}', expected: {_TYPE_NAMES[self.type]}",
            )
        if self.type is float:
            return float(value)
        if self.choices is not None and value not in self.choices:
            leaf = _visited_name(name)
            raise QMPError("GenericError", f"Parameter '{leaf}' does not accept value '{value}'")
        if self.type is list and self.items is not None:
            return [self.items.check(f"{name}[{i}]", v) for i, v in enumerate(value)]
        if self.type is dict and self.members is not None:
            return check_members(self.members, value, prefix=f"{name}.")
        return value

    def _has_type(self, value: Any) -> bool:
        if self.type is int:
            # bool is an int subclass in Python but not in JSON; QEMU rejects out-of-range ints.
            return (
                isinstance(value, int)
                and not isinstance(value, bool)
                and _INT64_MIN <= value <= _UINT64_MAX
            )
        if self.type is float:
            return isinstance(value, int | float) and not isinstance(value, bool)
        return isinstance(value, self.type)


_INT_TYPES = {
    "int": (-(1 << 63), (1 << 63) - 1), "int8": (-(1 << 7), (1 << 7) - 1),
    "int16": (-(1 << 15), (1 << 15) - 1), "int32": (-(1 << 31), (1 << 31) - 1),
    "int64": (-(1 << 63), (1 << 63) - 1), "uint8": (0, (1 << 8) - 1),
    "uint16": (0, (1 << 16) - 1), "uint32": (0, (1 << 32) - 1), "uint64": (0, (1 << 64) - 1),
    "size": (0, (1 << 64) - 1),
}  # fmt: skip


def _visited_name(name: str) -> str:
    """The name QEMU's checks after the type check give a value: a struct member's own name
    (not its path), and for a list element, which the QAPI visitor visits without a name,
    'null' (``qmp_capabilities`` with ``enable: ["nope"]``: "Parameter 'null' does not accept
    value 'nope'", where the type check said 'enable[0]')."""
    if name.endswith("]"):
        return "null"
    return name.rsplit(".", 1)[-1]


def _check_sized_int(name: str, value: Any, qtype: str | None) -> int:
    """QEMU's QAPI input visitor on a sized integer: the unsigned ones take any JSON integer
    that fits 64 bits (a negative one wraps, "for backward compatibility"), then their width;
    the signed ones want an integer in int64, then their width."""
    assert qtype is not None
    lo, hi = _INT_TYPES[qtype]
    leaf = _visited_name(name)
    ok = isinstance(value, int) and not isinstance(value, bool)
    if lo == 0:
        if not ok or not -(1 << 63) <= value <= (1 << 64) - 1:
            raise QMPError("GenericError", f"Parameter '{name}' expects uint64")
        value %= 1 << 64
    elif not ok or not -(1 << 63) <= value < 1 << 63:
        raise QMPError("GenericError", f"Invalid parameter type for '{name}', expected: integer")
    if not lo <= value <= hi:
        raise QMPError("GenericError", f"Parameter '{leaf}' expects {qtype}_t")
    return int(value)


def check_members(spec: Mapping[str, Arg], given: Mapping[str, Any], prefix: str = "") -> dict:
    """Check an object against ``spec`` in declared order; return the checked members."""
    out: dict[str, Any] = {}
    for key, arg in spec.items():
        if key not in given:
            if not arg.optional:
                raise QMPError("GenericError", f"Parameter '{prefix}{key}' is missing")
            continue
        out[key] = arg.check(f"{prefix}{key}", given[key])
    for key in given:
        if key not in spec:
            raise QMPError("GenericError", f"Parameter '{prefix}{key}' is unexpected")
    return out


#: ``returns=`` for a command whose reply is ``{}`` (QAPI: no 'returns').
EMPTY = Arg(dict, members={})
#: ``returns=`` for a reply of no declared type (the schema says ``any``).
ANY = Arg(object)


@dataclass(frozen=True)
class Command:
    """One registered command; ``returns`` types its reply for query-qmp-schema (``EMPTY``:
    ``{}``), ``features`` are QAPI's (``deprecated``, ``unstable``)."""

    name: str
    handler: Callable[..., Any]
    args: Mapping[str, Arg] = field(default_factory=dict)
    allow_oob: bool = False
    returns: Arg | None = None
    features: tuple[str, ...] = ()

    @property
    def is_async(self) -> bool:
        """Coroutine handlers run on the server's event loop, others in a worker thread."""
        return inspect.iscoroutinefunction(self.handler)

    def parse_arguments(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Check ``arguments`` and return the handler's keyword arguments."""
        checked = check_members(self.args, arguments)
        return {key.replace("-", "_"): value for key, value in checked.items()}


def _builtin_qmp_capabilities(**_: Any) -> None:
    # The server answers qmp_capabilities itself: it changes the connection's state.
    raise QMPError("GenericError", "qmp_capabilities is handled by the QMP server")


class CommandRegistry:
    """The set of commands a server offers (``qmp_capabilities`` is always present)."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}
        #: the events the server may emit: name -> data members (None: no data)
        self.events: dict[str, Mapping[str, Arg] | None] = {}
        self.add(
            "qmp_capabilities",
            _builtin_qmp_capabilities,
            args={"enable": Arg(list, optional=True, items=Arg(str, choices=("oob",)))},
            returns=EMPTY,
        )

    def add(
        self,
        name: str,
        handler: Callable[..., Any],
        args: Mapping[str, Arg] | None = None,
        allow_oob: bool = False,
        returns: Arg | None = ANY,
        features: tuple[str, ...] = (),
    ) -> Command:
        """Register ``handler`` under the QMP name ``name``; a name can be registered once.
        ``returns``: the reply's type for query-qmp-schema (``EMPTY`` for ``{}``)."""
        if name in self._commands:
            raise LivemigError(f"QMP command '{name}' is already registered")
        for key, arg in (args or {}).items():
            if not isinstance(arg, Arg):
                raise LivemigError(f"QMP command '{name}': argument '{key}' is not an Arg")
        command = Command(name, handler, dict(args or {}), allow_oob, returns, features)
        self._commands[name] = command
        return command

    def add_event(self, name: str, data: Mapping[str, Arg] | None = None) -> None:
        """Declare an event the server emits, with its data members (query-qmp-schema)."""
        self.events[name] = dict(data) if data is not None else None

    def remove(self, name: str) -> None:
        """Unregister a command (no error if it is absent)."""
        if name != "qmp_capabilities":
            self._commands.pop(name, None)

    def get(self, name: str) -> Command | None:
        """The command called ``name``, or ``None``."""
        return self._commands.get(name)

    def names(self) -> list[str]:
        """Every registered command name, in registration order."""
        return list(self._commands)

    def __contains__(self, name: object) -> bool:
        return name in self._commands

    def __iter__(self) -> Iterator[Command]:
        return iter(list(self._commands.values()))

    def __len__(self) -> int:
        return len(self._commands)
