"""Migration capabilities and parameters: QEMU's names, defaults and range checks.

``Capabilities`` lists every capability QEMU 7.2 knows (in QEMU's order, so
``query-migrate-capabilities`` looks the same) plus the later ones livemig implements; enabling
one that livemig does not implement is refused with a message saying so, never silently
accepted. ``Parameters`` holds typed values with QEMU's defaults; a ``set`` is checked
completely before anything changes. Names starting with ``x-`` are livemig's own.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from livemig.errors import UsageError
from livemig.migration.convergence import SwitchoverRefiner

# QEMU 7.2's capability order, then later additions.
CAPABILITIES = (
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress", "events",
    "postcopy-ram", "x-colo", "release-ram", "block", "return-path",
    "pause-before-switchover", "multifd", "dirty-bitmaps", "postcopy-blocktime",
    "late-block-activate", "x-ignore-shared", "validate-uuid", "background-snapshot",
    "zero-copy-send", "postcopy-preempt", "switchover-ack", "dirty-limit", "mapped-ram",
    "x-verify",
)  # fmt: skip

# What this build of livemig really implements; the rest are listed but refused.
SUPPORTED_CAPABILITIES = frozenset(
    {
        "auto-converge",
        "events",
        "return-path",
        "pause-before-switchover",
        "x-verify",
        "multifd",
        "postcopy-ram",
        "postcopy-preempt",
        "postcopy-blocktime",
        "xbzrle",
        "mapped-ram",
        "x-colo",
    }
)

# (capability, needs) and (capability, conflicts with) pairs, checked when set.
REQUIRES = (("postcopy-preempt", "postcopy-ram"), ("switchover-ack", "return-path"),
            ("zero-copy-send", "multifd"),
            # livemig's standby answers on the return path (acks, heartbeats)
            ("x-colo", "return-path"))  # fmt: skip
CONFLICTS = (("multifd", "compress"), ("multifd", "xbzrle"), ("x-ignore-shared", "postcopy-ram"),
             ("dirty-limit", "auto-converge"), ("mapped-ram", "xbzrle"),
             ("mapped-ram", "postcopy-ram"),
             # QEMU refuses COLO with post-copy; livemig's checkpoints are pre-copy streams on
             # one channel (no multifd, XBZRLE or a file)
             ("x-colo", "postcopy-ram"), ("x-colo", "multifd"), ("x-colo", "xbzrle"),
             ("x-colo", "mapped-ram"))  # fmt: skip


class Capabilities:
    """The capability switches of one side's migration object."""

    def __init__(self) -> None:
        self._on: set[str] = set()
        self._lock = threading.Lock()

    def __contains__(self, name: str) -> bool:
        return name in self._on

    def enabled(self) -> frozenset[str]:
        return frozenset(self._on)

    def query(self) -> list[dict[str, Any]]:
        return [{"capability": c, "state": c in self._on} for c in CAPABILITIES]

    def set(self, changes: list[dict[str, Any]] | dict[str, bool]) -> None:
        """Apply ``[{"capability": name, "state": bool}, ...]`` atomically (all or nothing)."""
        items = changes.items() if isinstance(changes, dict) else _pairs(changes)
        with self._lock:
            new = set(self._on)
            for name, state in items:
                if name not in CAPABILITIES:
                    raise UsageError(f"Invalid parameter '{name}': not a migration capability")
                if state and name not in SUPPORTED_CAPABILITIES:
                    raise UsageError(f"Migration capability '{name}' is not supported by livemig")
                (new.add if state else new.discard)(name)
            for cap, need in REQUIRES:
                if cap in new and need not in new:
                    raise UsageError(f"Capability '{cap}' requires capability '{need}'")
            for a, b in CONFLICTS:
                if a in new and b in new:
                    raise UsageError(f"Capability '{a}' is not compatible with '{b}'")
            self._on = new


def _pairs(changes: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    out = []
    for i, item in enumerate(changes):
        if not isinstance(item, dict) or set(item) != {"capability", "state"}:
            raise UsageError(f"capabilities[{i}]: expected {{'capability': str, 'state': bool}}")
        if not isinstance(item["capability"], str) or not isinstance(item["state"], bool):
            raise UsageError(f"capabilities[{i}]: 'capability' must be a string, 'state' a bool")
        out.append((item["capability"], item["state"]))
    return out


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its type, default and allowed values."""

    name: str
    type: type
    default: Any
    minimum: int | None = None
    maximum: int | None = None
    choices: tuple[str, ...] | None = None
    unit: str = ""

    def check(self, value: Any) -> Any:
        if self.type is bool:
            if not isinstance(value, bool):
                raise UsageError(f"Invalid parameter type for '{self.name}', expected: boolean")
            return value
        if self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise UsageError(f"Invalid parameter type for '{self.name}', expected: integer")
            lo = self.minimum if self.minimum is not None else 0
            hi = self.maximum
            if value < lo or (hi is not None and value > hi):
                rng = f"{lo} to {hi}" if hi is not None else f"at least {lo}"
                raise UsageError(
                    f"Parameter '{self.name}' expects {rng}{' ' + self.unit if self.unit else ''}"
                )
            return value
        if value is None and self.choices is None:
            return ""  # tls-* accept null as "unset", like QEMU
        if not isinstance(value, str):
            raise UsageError(f"Invalid parameter type for '{self.name}', expected: string")
        if self.choices is not None and value not in self.choices:
            raise UsageError(
                f"Parameter '{self.name}' does not accept value '{value}' "
                f"(one of: {', '.join(self.choices)})"
            )
        return value


PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec("throttle-trigger-threshold", int, 50, 1, 100, unit="percent"),
    ParamSpec("cpu-throttle-initial", int, 20, 1, 99, unit="percent"),
    ParamSpec("cpu-throttle-increment", int, 10, 1, 99, unit="percent"),
    ParamSpec("cpu-throttle-tailslow", bool, False),
    ParamSpec("tls-creds", str, ""),
    ParamSpec("tls-hostname", str, ""),
    ParamSpec("tls-authz", str, ""),
    ParamSpec("max-bandwidth", int, 134217728, 0, 1 << 62, unit="bytes/s"),
    ParamSpec("avail-switchover-bandwidth", int, 0, 0, 1 << 62, unit="bytes/s"),
    ParamSpec("downtime-limit", int, 300, 0, 2000000, unit="milliseconds"),
    ParamSpec("multifd-channels", int, 2, 1, 255),
    ParamSpec("multifd-compression", str, "none", choices=("none", "zlib", "zstd")),
    ParamSpec("multifd-zlib-level", int, 1, 0, 9),
    ParamSpec("multifd-zstd-level", int, 1, 0, 20),
    # QEMU 9.0: where zero pages are found. "multifd": the multifd channel threads (without
    # multifd, and in post-copy, the migration thread); "legacy": the migration thread, zero
    # pages going as ZERO records on the main channel; "none": nowhere, every page is sent.
    ParamSpec("zero-page-detection", str, "multifd", choices=("none", "legacy", "multifd")),
    ParamSpec("xbzrle-cache-size", int, 67108864, 4096, 1 << 40, unit="bytes"),
    ParamSpec("max-postcopy-bandwidth", int, 0, 0, 1 << 62, unit="bytes/s"),
    ParamSpec("max-cpu-throttle", int, 99, 1, 99, unit="percent"),
    ParamSpec(
        "x-dirty-tracker", str, "auto", choices=("auto", "uffd-wp-async", "uffd-wp", "shadow")
    ),
    # livemig's own (memtrack/hot.py): densely rewritten 2 MiB chunks stay writable between
    # syncs, sparing the guest a write fault per page per pass at the cost of resending a
    # chunk that went quiet; uffd-wp-async only.
    ParamSpec("x-dirty-hot-chunks", bool, True),
    ParamSpec("x-io-timeout", int, 30000, 100, 3600000, unit="milliseconds"),
    ParamSpec("x-postcopy-auto-recover", int, 0, 0, 1000),
    ParamSpec("x-postcopy-prefetch", int, 0, 0, 512, unit="pages"),
    # livemig's own default (QEMU has no such pass): see convergence.SwitchoverRefiner; 0 is
    # QEMU's switch at the first chance.
    ParamSpec("x-switchover-refine", int, SwitchoverRefiner.DEFAULT_PASSES, 0, 16, unit="passes"),
    # COLO (capability x-colo): QEMU's checkpoint interval and default, then livemig's own
    # time-outs (QEMU leaves detecting a dead peer to outside tools): silence from the other
    # side for this long and the standby takes over / the primary goes on unreplicated; a
    # checkpoint not acknowledged this long after it was taken means the standby cannot keep
    # up, and the primary goes on unreplicated too (saying so) rather than holding its
    # clients' replies without bound.
    ParamSpec("x-checkpoint-delay", int, 20000, 0, (1 << 32) - 1, unit="milliseconds"),
    ParamSpec("x-colo-heartbeat-timeout", int, 1000, 50, 600000, unit="milliseconds"),
    ParamSpec("x-colo-checkpoint-timeout", int, 5000, 100, 3600000, unit="milliseconds"),
)
_SPECS = {p.name: p for p in PARAMETERS}


class Parameters:
    """Current parameter values; ``set`` checks every value first, then applies them all."""

    def __init__(self) -> None:
        self._values = {p.name: p.default for p in PARAMETERS}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def query(self) -> dict[str, Any]:
        return dict(self._values)

    def set(self, changes: dict[str, Any]) -> None:
        checked = {}
        for name, value in changes.items():
            spec = _SPECS.get(name)
            if spec is None:
                raise UsageError(f"Parameter '{name}' is unexpected")
            checked[name] = spec.check(value)
        xbz = checked.get("xbzrle-cache-size")
        if xbz is not None and xbz & (xbz - 1):
            raise UsageError("Parameter 'xbzrle-cache-size' expects a power of two")
        with self._lock:
            merged = {**self._values, **checked}
            if merged["max-cpu-throttle"] < merged["cpu-throttle-initial"]:
                raise UsageError(
                    "Parameter 'max-cpu-throttle' must not be below 'cpu-throttle-initial'"
                )
            self._values = merged


# -- settings as people type them (``--set NAME=VALUE``, ``--cap NAME[=on|off]``) ----------------

# Not tuning knobs but the process's identity: set once at start (``run --tls-creds``), never
# reset by ``livemig migrate``.
UNMANAGED_PARAMETERS = frozenset({"tls-creds", "tls-hostname", "tls-authz"})


def parse_param(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` to (name, typed value): integers with size suffixes for byte counts and
    rates (``20M``), on/off for booleans, text otherwise. Unknown names keep a best-effort value
    (a QEMU source may know parameters livemig does not) and are checked by whoever sets them."""
    from livemig.units import parse_size

    name, sep, value = text.partition("=")
    if not sep or not name:
        raise UsageError(f"expected NAME=VALUE, got {text!r}")
    spec = _SPECS.get(name)
    low = value.lower()
    if spec is None or spec.type is bool:
        if low in ("on", "true", "yes"):
            return name, True
        if low in ("off", "false", "no"):
            return name, False
        if spec is not None:
            raise UsageError(f"parameter {name!r}: expected on or off, got {value!r}")
    if spec is None or spec.type is int:
        if spec is not None and spec.unit.startswith("bytes"):
            return name, parse_size(value, name)
        try:
            return name, int(value)
        except ValueError:
            if spec is not None:
                raise UsageError(f"parameter {name!r}: expected an integer, got {value!r}") \
                    from None  # fmt: skip
    return name, value


def parse_cap(text: str) -> tuple[str, bool]:
    """``NAME`` or ``NAME=on|off`` to (name, state)."""
    name, sep, value = text.partition("=")
    if not name:
        raise UsageError(f"expected NAME[=on|off], got {text!r}")
    if not sep:
        return name, True
    if value.lower() not in ("on", "off", "true", "false", "yes", "no"):
        raise UsageError(f"capability {name!r}: expected on or off, got {value!r}")
    return name, value.lower() in ("on", "true", "yes")


def default_parameters() -> dict[str, Any]:
    """QEMU's defaults (and livemig's for its own ``x-`` parameters)."""
    return {p.name: p.default for p in PARAMETERS}
