"""Every run does what it was asked: set each migration capability and parameter a migration
(``livemig.control.migrate``, ``livemig migrate``) manages, to what was asked or else to the
peer's default, and say what changed.

QEMU keeps capabilities and parameters between migrations, so a tool that only sets what it was
asked for inherits what the last run left: post-copy still on after ``--postcopy``, a
``max-bandwidth`` from an earlier ``--set``. libvirt sets them all every time; so does this.

The default is the peer's own: a livemig process reports what it started with
(``x-query-migrate-defaults``: QEMU's defaults, or ``run --cap/--set``, QEMU's ``-global
migration.x=y``); for QEMU it is QEMU's documented defaults (every capability off, and the
parameter defaults livemig shares with QEMU). Managed are every capability the peer lists and
every parameter livemig knows that the peer reports, except the TLS identity (``tls-creds``,
``tls-hostname``, ``tls-authz``), which belongs to the process, not to one run.

This is a management tool's policy over QMP, not part of the protocol: the monitor
(``livemig.qmp``) keeps whatever it is told, as QEMU's does; deciding what one run sets is the
client's business, so it lives here beside the migration it prepares.
"""

from __future__ import annotations

from typing import Any

from livemig.migration.options import PARAMETERS, UNMANAGED_PARAMETERS, default_parameters
from livemig.qmp.client import QMPClientError
from livemig.units import format_size

PARAM_SPECS = {p.name: p for p in PARAMETERS}


def peer_defaults(qmp: Any) -> tuple[dict[str, bool], dict[str, Any]]:
    """(capabilities, parameters) the peer goes back to when a run does not ask otherwise."""
    try:
        d = qmp.command("x-query-migrate-defaults")
    except QMPClientError as exc:
        if exc.error_class != "CommandNotFound":
            raise
        return {}, default_parameters()  # QEMU: every capability off
    caps = {c["capability"]: bool(c["state"]) for c in d["capabilities"]}
    return caps, dict(d["parameters"])


def _show(value: Any, name: str = "") -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    spec = PARAM_SPECS.get(name)
    if spec is not None and spec.qtype == "size" and isinstance(value, int):
        return format_size(value) + ("/s" if name.endswith("bandwidth") else "")
    return str(value)


def apply_settings(
    qmp: Any,
    caps: dict[str, bool],
    params: dict[str, Any],
    *,
    only_caps: tuple[str, ...] | None = None,
    only_params: tuple[str, ...] | None = None,
) -> list[str]:
    """Set the managed capabilities and parameters of the peer behind ``qmp`` (restricted to
    ``only_caps`` / ``only_params`` when given) to ``caps`` / ``params`` or their defaults;
    only what differs is sent. Returns the changes as ``name old -> new`` lines."""
    current_caps = {c["capability"]: bool(c["state"])
                    for c in qmp.command("query-migrate-capabilities")}  # fmt: skip
    current_params = dict(qmp.command("query-migrate-parameters"))
    def_caps, def_params = peer_defaults(qmp)
    managed_caps = [c for c in current_caps if only_caps is None or c in only_caps]
    want_caps = {c: caps.get(c, def_caps.get(c, False)) for c in managed_caps}
    want_caps.update({c: v for c, v in caps.items() if c not in want_caps})  # peer refuses
    managed = [p for p in current_params if p in def_params and p not in UNMANAGED_PARAMETERS
               and (only_params is None or p in only_params)]  # fmt: skip
    want_params = {p: params.get(p, def_params[p]) for p in managed}
    want_params.update({p: v for p, v in params.items() if p not in want_params})
    cap_changes = {c: v for c, v in want_caps.items() if current_caps.get(c) != v}
    param_changes = {p: v for p, v in want_params.items() if current_params.get(p) != v}
    if cap_changes:
        qmp.command("migrate-set-capabilities", capabilities=[
            {"capability": c, "state": v} for c, v in cap_changes.items()])  # fmt: skip
    if param_changes:
        qmp.command("migrate-set-parameters", **param_changes)
    out = [f"{c} {_show(current_caps.get(c, False))} -> {_show(v)}"
           for c, v in cap_changes.items()]  # fmt: skip
    out += [f"{p} {_show(current_params.get(p, '-'), p)} -> {_show(v, p)}"
            for p, v in param_changes.items()]  # fmt: skip
    return out
