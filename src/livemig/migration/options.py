"""Migration capabilities and parameters, as QEMU 10.0 has them: names, order, defaults, checks.

``Capabilities`` lists QEMU 10.0's capabilities in its order (``query-migrate-capabilities``
looks the same) plus livemig's own ``x-verify``; ``set`` runs QEMU's ``migrate_caps_check``
rule for rule, with its messages. A capability livemig does not implement is refused with
QEMU's own error for that capability when QEMU has one that is true of livemig
(``dirty-limit``: no KVM), else with QEMU's form "<capability> is not supported by livemig".
``x-colo`` is livemig's replication (``migration/colo.py``). Four are accepted with nothing to act on, exactly as a QEMU machine
without the hardware they concern accepts them: ``rdma-pin-all`` (livemig has no RDMA
transport), ``zero-blocks``, ``dirty-bitmaps``, ``late-block-activate`` (no block devices), and
``validate-uuid`` (no machine UUID is set, so none is sent or checked, as in QEMU without
``-uuid``).

``Parameters`` holds QEMU 10.0's parameters (``MigrateSetParameters``) with their QAPI types
and defaults, plus livemig's ``x-`` ones; ``set`` applies the changes to a copy of the current
values and checks the whole copy in QEMU's order (``migrate_params_check``, its messages, with
QEMU's underscored names), so a set is all or nothing. ``mode`` other than ``normal`` and
``direct-io`` are accepted as values, as QEMU does, and refused when a migration starts with
them (``check_for_migration``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from livemig.errors import UsageError
from livemig.migration.convergence import SwitchoverRefiner

# QEMU 10.0's MigrationCapability, in its order, then livemig's own.
CAPABILITIES = (
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "events", "postcopy-ram",
    "x-colo", "release-ram", "return-path", "pause-before-switchover", "multifd",
    "dirty-bitmaps", "postcopy-blocktime", "late-block-activate", "x-ignore-shared",
    "validate-uuid", "background-snapshot", "zero-copy-send", "postcopy-preempt",
    "switchover-ack", "dirty-limit", "mapped-ram",
    "x-verify", "x-checksums",
)  # fmt: skip

# What this build of livemig implements (the vacuous ones: see the module docstring).
SUPPORTED_CAPABILITIES = frozenset(
    {
        "auto-converge",
        "events",
        "return-path",
        "pause-before-switchover",
        "x-verify",
        "x-checksums",
        "multifd",
        "postcopy-ram",
        "postcopy-preempt",
        "postcopy-blocktime",
        "switchover-ack",
        "xbzrle",
        "mapped-ram",
        "rdma-pin-all",
        "zero-blocks",
        "dirty-bitmaps",
        "late-block-activate",
        "validate-uuid",
        "x-colo",
    }
)

# QEMU's refusal of a capability its build or host cannot do, where that is true of livemig.
_QEMU_REFUSALS = {
    "dirty-limit": "dirty-limit requires KVM with accelerator property 'dirty-ring-size' set",
}
_NAMES = {"background-snapshot": "Background-snapshot", "release-ram": "Release-ram",
          "x-ignore-shared": "Ignore-shared", "zero-copy-send": "Zero copy send"}  # fmt: skip


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

    def set(
        self, changes: list[dict[str, Any]] | dict[str, bool], incoming_started: bool = False
    ) -> None:
        """Apply ``[{"capability": name, "state": bool}, ...]`` atomically (all or nothing);
        ``incoming_started``: an incoming migration listens already (multifd and
        postcopy-preempt must be set before)."""
        items = changes.items() if isinstance(changes, dict) else _pairs(changes)
        with self._lock:
            new = set(self._on)
            for name, state in items:
                if name not in CAPABILITIES:
                    raise UsageError(f"Parameter 'capability' does not accept value '{name}'")
                (new.add if state else new.discard)(name)
            caps_check(self._on, new, incoming_started)
            self._on = new


_BACKGROUND_SNAPSHOT_CONFLICTS = (
    "postcopy-ram", "dirty-bitmaps", "postcopy-blocktime", "late-block-activate", "return-path",
    "multifd", "pause-before-switchover", "auto-converge", "release-ram", "rdma-pin-all",
    "xbzrle", "x-colo", "validate-uuid", "zero-copy-send",
)  # fmt: skip


def caps_check(old: set[str] | frozenset[str], new: set[str], incoming_started: bool) -> None:
    """QEMU 10.0's ``migrate_caps_check``, rule for rule and in its order, then livemig's
    refusal of what it does not implement."""
    if "x-colo" in new:
        # livemig's standby answers on the return path (acks, heartbeats); QEMU refuses COLO
        # with post-copy; livemig's checkpoints are pre-copy streams on one channel
        if "return-path" not in new:
            raise UsageError("Capability 'x-colo' requires capability 'return-path'")
        for other in ("postcopy-ram", "multifd", "xbzrle", "mapped-ram"):
            if other in new:
                raise UsageError(f"Capability 'x-colo' is not compatible with '{other}'")
    if "postcopy-ram" in new and "x-ignore-shared" in new:
        raise UsageError("Postcopy is not compatible with ignore-shared")
    # QEMU 10.0 refuses postcopy-ram with multifd ("Postcopy is not yet compatible with
    # multifd"); livemig does post-copy after a multifd pre-copy (docs/qmp-conformance.md)
    if "background-snapshot" in new:
        # QEMU's check_caps_background_snapshot first, in its order: a client told what
        # conflicts is told what QEMU says; alone, livemig does not implement it
        for other in _BACKGROUND_SNAPSHOT_CONFLICTS:
            if other in new:
                raise UsageError(f"Background-snapshot is not compatible with {other}")
        raise UsageError("Background-snapshot is not supported by livemig")
    if "zero-copy-send" in new and ("multifd" not in new or "xbzrle" in new):
        raise UsageError("Zero copy only available for non-compressed non-TLS multifd migration")
    if "postcopy-preempt" in new:
        if "postcopy-ram" not in new:
            raise UsageError("Postcopy preempt requires postcopy-ram")
        if "postcopy-preempt" not in old and incoming_started:
            raise UsageError("Postcopy preempt must be set before incoming starts")
    if "multifd" in new and "multifd" not in old and incoming_started:
        raise UsageError("Multifd must be set before incoming starts")
    if "switchover-ack" in new and "return-path" not in new:
        raise UsageError("Capability 'switchover-ack' requires capability 'return-path'")
    if "dirty-limit" in new:
        if "auto-converge" in new:
            raise UsageError("dirty-limit conflicts with auto-converge either of then available "
                             "currently")  # fmt: skip
        raise UsageError(_QEMU_REFUSALS["dirty-limit"])
    if "multifd" in new and "xbzrle" in new:
        raise UsageError("Multifd is not compatible with xbzrle")
    if "mapped-ram" in new:
        if "xbzrle" in new:
            raise UsageError("Mapped-ram migration is incompatible with xbzrle")
        if "postcopy-ram" in new:
            raise UsageError("Mapped-ram migration is incompatible with postcopy")
    for name in sorted(new - SUPPORTED_CAPABILITIES, key=CAPABILITIES.index):
        raise UsageError(f"{_NAMES.get(name, name)} is not supported by livemig")


def _pairs(changes: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    out = []
    for i, item in enumerate(changes):
        if not isinstance(item, dict):
            raise UsageError(f"Invalid parameter type for 'capabilities[{i}]', expected: object")
        for key in ("capability", "state"):
            if key not in item:
                raise UsageError(f"Parameter 'capabilities[{i}].{key}' is missing")
        if not isinstance(item["capability"], str):
            raise UsageError(f"Invalid parameter type for 'capabilities[{i}].capability', "
                             "expected: string")  # fmt: skip
        if not isinstance(item["state"], bool):
            raise UsageError(f"Invalid parameter type for 'capabilities[{i}].state', "
                             "expected: boolean")  # fmt: skip
        for key in item:
            if key not in ("capability", "state"):
                raise UsageError(f"Parameter 'capabilities[{i}].{key}' is unexpected")
        out.append((item["capability"], item["state"]))
    return out


_UINT_MAX = {"uint8": (1 << 8) - 1, "uint16": (1 << 16) - 1, "uint32": (1 << 32) - 1,
             "uint64": (1 << 64) - 1, "size": (1 << 64) - 1}  # fmt: skip


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its QAPI type (``uint8``, ``size``, ``bool``, ``StrOrNull``, an enum's
    values as ``choices``), its default; ``livemig`` for livemig's own ``x-`` ones."""

    name: str
    qtype: str
    default: Any
    choices: tuple[str, ...] | None = None

    @property
    def type(self) -> type:
        """The JSON type of its values."""
        if self.qtype == "bool":
            return bool
        if self.qtype in ("str", "StrOrNull") or self.choices is not None:
            return str
        return int

    def coerce(self, value: Any) -> Any:
        """``value`` as QEMU's QAPI input visitor takes it (negative numbers wrap for the
        unsigned types), or its error."""
        q = self.qtype
        if q == "bool":
            if not isinstance(value, bool):
                raise UsageError(f"Invalid parameter type for '{self.name}', expected: boolean")
            return value
        if q == "StrOrNull":
            if value is None:
                return ""  # QEMU rewrites null to "" for the tls-* parameters
            if not isinstance(value, str):
                raise UsageError(f"Invalid parameter type for '{self.name}', "
                                 "expected: StrOrNull")  # fmt: skip
            return value
        if self.choices is not None:
            if not isinstance(value, str):
                raise UsageError(f"Invalid parameter type for '{self.name}', expected: string")
            if value not in self.choices:
                raise UsageError(f"Parameter '{self.name}' does not accept value '{value}'")
            return value
        if q in _UINT_MAX:
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not (-(1 << 63) <= value <= (1 << 64) - 1)
            ):
                raise UsageError(f"Parameter '{self.name}' expects uint64")
            value %= 1 << 64
            if value > _UINT_MAX[q]:
                raise UsageError(f"Parameter '{self.name}' expects {q}_t")
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"Invalid parameter type for '{self.name}', expected: integer")
        return value


PARAMETERS: tuple[ParamSpec, ...] = (
    # QEMU 10.0's MigrateSetParameters, in its order
    ParamSpec("announce-initial", "size", 50),
    ParamSpec("announce-max", "size", 550),
    ParamSpec("announce-rounds", "size", 5),
    ParamSpec("announce-step", "size", 100),
    ParamSpec("throttle-trigger-threshold", "uint8", 50),
    ParamSpec("cpu-throttle-initial", "uint8", 20),
    ParamSpec("cpu-throttle-increment", "uint8", 10),
    ParamSpec("cpu-throttle-tailslow", "bool", False),
    ParamSpec("tls-creds", "StrOrNull", ""),
    ParamSpec("tls-hostname", "StrOrNull", ""),
    ParamSpec("tls-authz", "StrOrNull", ""),
    ParamSpec("max-bandwidth", "size", 134217728),
    ParamSpec("avail-switchover-bandwidth", "size", 0),
    ParamSpec("downtime-limit", "uint64", 300),
    ParamSpec("x-checkpoint-delay", "uint32", 20000),
    ParamSpec("multifd-channels", "uint8", 2),
    ParamSpec("xbzrle-cache-size", "size", 67108864),
    ParamSpec("max-postcopy-bandwidth", "size", 0),
    ParamSpec("max-cpu-throttle", "uint8", 99),
    ParamSpec(
        "multifd-compression", "MultiFDCompression", "none", choices=("none", "zlib", "zstd")
    ),
    ParamSpec("multifd-zlib-level", "uint8", 1),
    ParamSpec("multifd-qatzip-level", "uint8", 1),
    ParamSpec("multifd-zstd-level", "uint8", 1),
    ParamSpec("x-vcpu-dirty-limit-period", "uint64", 1000),
    ParamSpec("vcpu-dirty-limit", "uint64", 1),
    ParamSpec("mode", "MigMode", "normal", choices=("normal", "cpr-reboot", "cpr-transfer")),
    # QEMU 9.0: where zero pages are found. "multifd": the multifd channel threads (without
    # multifd, and in post-copy, the migration thread); "legacy": the migration thread, zero
    # pages going as ZERO records on the main channel; "none": nowhere, every page is sent.
    ParamSpec(
        "zero-page-detection", "ZeroPageDetection", "multifd", choices=("none", "legacy", "multifd")
    ),
    ParamSpec("direct-io", "bool", False),
    # livemig's own
    ParamSpec(
        "x-dirty-tracker",
        "XDirtyTracker",
        "auto",
        choices=("auto", "uffd-wp-async", "uffd-wp", "shadow"),
    ),
    # memtrack/hot.py: densely rewritten 2 MiB chunks stay writable between syncs, sparing
    # the guest a write fault per page per pass at the cost of resending a chunk that went
    # quiet; uffd-wp-async only.
    ParamSpec("x-dirty-hot-chunks", "bool", True),
    ParamSpec("x-io-timeout", "uint32", 30000),
    ParamSpec("x-postcopy-auto-recover", "uint16", 0),
    ParamSpec("x-postcopy-prefetch", "uint16", 0),
    # largest readahead window of a sequential stream of post-copy requests, in pages
    # (migration/postcopy_readahead.py); 0: no readahead
    ParamSpec("x-postcopy-readahead", "uint16", 1024),
    # destination: drop the pages the source discards at the post-copy switch with
    # MADV_DONTNEED and fill them on userfaultfd minor faults (migration/postcopy_dest.py),
    # where the kernel offers it; false: MADV_REMOVE and missing faults, as before
    ParamSpec("x-postcopy-minor-faults", "bool", True),
    # source: before the post-copy switch, with the guest still running, discard the pages
    # still to send and wait until the destination has caught up (source.py, _drain)
    ParamSpec("x-postcopy-drain", "bool", True),
    # threads that fill the multifd channels on each side (multifd.py), decoupled from the
    # channel count a QEMU peer needs; 0: one for each core the host can spare
    ParamSpec("x-multifd-threads", "uint8", 0),
    # see convergence.SwitchoverRefiner; 0 is QEMU's switch at the first chance
    ParamSpec("x-switchover-refine", "uint8", SwitchoverRefiner.DEFAULT_PASSES),
    # COLO (capability x-colo; QEMU's x-checkpoint-delay is above): livemig's own time-outs
    # (QEMU leaves detecting a dead peer to outside tools): silence from the other side for
    # this long and the standby takes over / the primary goes on unreplicated; a checkpoint
    # not acknowledged this long after it was taken means the standby cannot keep up, and the
    # primary goes on unreplicated too (saying so) rather than hold its clients' replies
    # without bound.
    ParamSpec("x-colo-heartbeat-timeout", "uint32", 1000),
    ParamSpec("x-colo-checkpoint-timeout", "uint32", 5000),
)
_SPECS = {p.name: p for p in PARAMETERS}
SIZE_MAX = (1 << 64) - 1


def _range(name: str, text: str) -> UsageError:
    return UsageError(f"Parameter '{name}' expects {text}")


def params_check(v: dict[str, Any]) -> None:
    """QEMU 10.0's ``migrate_params_check`` on the merged values, in its order and words,
    then livemig's own parameters."""
    if not 1 <= v["throttle-trigger-threshold"] <= 100:
        raise _range("throttle_trigger_threshold", "an integer in the range of 1 to 100")
    if not 1 <= v["cpu-throttle-initial"] <= 99:
        raise _range("cpu_throttle_initial", "an integer in the range of 1 to 99")
    if not 1 <= v["cpu-throttle-increment"] <= 99:
        raise _range("cpu_throttle_increment", "an integer in the range of 1 to 99")
    if v["downtime-limit"] > 2000 * 1000:
        raise _range("downtime_limit", "an integer in the range of 0 to (2000 * 1000) ms")
    if v["multifd-channels"] < 1:
        raise _range("multifd_channels", "a value between 1 and 255")
    if v["multifd-zlib-level"] > 9:
        raise _range("multifd_zlib_level", "a value between 0 and 9")
    if not 1 <= v["multifd-qatzip-level"] <= 9:
        raise _range("multifd_qatzip_level", "a value between 1 and 9")
    if v["multifd-zstd-level"] > 20:
        raise _range("multifd_zstd_level", "a value between 0 and 20")
    x = v["xbzrle-cache-size"]
    if x < 4096 or x & (x - 1):
        raise _range("xbzrle_cache_size", "a power of two no less than the target page size")
    if not v["cpu-throttle-initial"] <= v["max-cpu-throttle"] <= 99:
        raise _range("max_cpu_throttle", "an integer in the range of cpu_throttle_initial to 99")
    if v["announce-initial"] > 100000:
        raise _range("announce_initial", "a value between 0 and 100000")
    if v["announce-max"] > 100000:
        raise _range("announce_max", "a value between 0 and 100000")
    if v["announce-rounds"] > 1000:
        raise _range("announce_rounds", "a value between 0 and 1000")
    if not 1 <= v["announce-step"] <= 10000:
        raise _range("announce_step", "a value between 0 and 10000")
    if not 1 <= v["x-vcpu-dirty-limit-period"] <= 1000:
        raise _range("x-vcpu-dirty-limit-period", "a value between 1 and 1000")
    if v["vcpu-dirty-limit"] < 1:
        raise UsageError("Parameter 'vcpu_dirty_limit' must be greater than 1 MB/s")
    if not 100 <= v["x-io-timeout"] <= 3600000:
        raise _range("x-io-timeout", "a value between 100 and 3600000 (milliseconds)")
    if v["x-postcopy-auto-recover"] > 1000:
        raise _range("x-postcopy-auto-recover", "a value between 0 and 1000")
    if v["x-postcopy-prefetch"] > 512:
        raise _range("x-postcopy-prefetch", "a value between 0 and 512 (pages)")
    if v["x-postcopy-readahead"] > 8192:
        raise _range("x-postcopy-readahead", "a value between 0 and 8192 (pages)")
    if v["x-switchover-refine"] > 16:
        raise _range("x-switchover-refine", "a value between 0 and 16 (passes)")
    if not 50 <= v["x-colo-heartbeat-timeout"] <= 600000:
        raise _range("x-colo-heartbeat-timeout", "a value between 50 and 600000 (milliseconds)")
    if not 100 <= v["x-colo-checkpoint-timeout"] <= 3600000:
        raise _range("x-colo-checkpoint-timeout",
                     "a value between 100 and 3600000 (milliseconds)")  # fmt: skip


def check_for_migration(params: dict[str, Any], caps: frozenset[str]) -> None:
    """What a migration refuses to start with: the parameters livemig takes as values only,
    and QEMU's checks that need the capabilities."""
    if params["mode"] != "normal":
        raise UsageError(f"migration mode '{params['mode']}' is not supported by livemig "
                         "(normal only)")  # fmt: skip
    if params["direct-io"]:
        raise UsageError("direct-io is not supported by livemig")
    if "mapped-ram" in caps and (params["multifd-compression"] != "none"
                                 or params["tls-creds"]):  # fmt: skip
        raise UsageError("Mapped-ram only available for non-compressed non-TLS multifd "
                         "migration")  # fmt: skip


class Parameters:
    """Current parameter values; ``set`` checks the merged values first, then applies them."""

    def __init__(self) -> None:
        self._values = {p.name: p.default for p in PARAMETERS}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def query(self) -> dict[str, Any]:
        return dict(self._values)

    def set(self, changes: dict[str, Any]) -> None:
        # as QEMU's input visitor: the declared members in order, then any unexpected one
        checked = {p.name: p.coerce(changes[p.name]) for p in PARAMETERS if p.name in changes}
        for name in changes:
            if name not in _SPECS:
                raise UsageError(f"Parameter '{name}' is unexpected")
        with self._lock:
            merged = {**self._values, **checked}
            params_check(merged)
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
        if spec is not None and spec.qtype == "size":  # QAPI's byte counts and rates
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
