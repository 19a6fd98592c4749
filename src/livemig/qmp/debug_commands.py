"""livemig's own debugging QMP commands (``x-`` prefixed, as QEMU names its unstable ones).

``x-guest-check`` checks the machine's guest from its memory and returns the report: the
memstress invariant (``livemig.guests.memstress``), or for the compute guest a comparison with
its host-side reference (``livemig.guests.compute``: ``"guest": "compute"``, the counts and
buffer digests, and ``ok`` against a reference this process keeps, recomputed from boot the
first time; ``reference: false`` returns the snapshot alone, for a checker that follows the
guest across processes with its own reference). It changes nothing: the guest must already be
stopped (``stop`` first, ``cont`` after), because both checks hold only at an instruction
boundary of every vCPU; a running guest is refused rather than silently paused, so a test
sees exactly the run-state transitions it asked for.

``x-debug-threads`` lists every Python thread by name and thread id, so a leak test can say
which thread was left behind.
"""

from __future__ import annotations

import threading
from typing import Any

from livemig.guests.compute import REPORT_KIND_COMPUTE
from livemig.machine import abi
from livemig.qmp.commands import Arg, CommandRegistry, QMPError

# Run states in which the vCPUs are stopped at an instruction boundary and memory is whole.
_STOPPED = frozenset({"paused", "postmigrate", "prelaunch", "finish-migrate", "shutdown"})


def guest_check(machine: Any, reference: bool = True) -> dict[str, Any]:
    """The check report of ``machine``'s guest (memstress or compute), as a QMP-friendly dict."""
    from livemig.guests.memstress import check_invariant

    state = str(getattr(machine.runstate, "value", machine.runstate))
    if state not in _STOPPED:
        raise QMPError(
            "GenericError",
            f"x-guest-check needs a stopped guest (run state is {state}): send 'stop' first",
        )
    if _guest_kind(machine) == REPORT_KIND_COMPUTE:
        return _compute_check(machine, reference, state)
    report = check_invariant(machine.read_guest)
    return {
        "ok": report.ok,
        "problems": list(report.problems),
        "pages": int(report.pages),
        "passes": [int(p) for p in report.passes],
        "total-passes": int(sum(report.passes)),
        "min-counter": int(report.min_counter),
        "max-counter": int(report.max_counter),
        "filling": bool(report.filling),
        "seed": int(report.seed),
        "run-state": state,
    }


def _guest_kind(machine: Any) -> int:
    magic, kind, *_ = abi.GUEST_REPORT.unpack(
        bytes(machine.read_guest(abi.GUEST_REPORT_ADDR, abi.GUEST_REPORT.size))
    )
    return int(kind) if magic == abi.REPORT_MAGIC else 0


def _compute_check(machine: Any, reference: bool, state: str) -> dict[str, Any]:
    from livemig.guests import compute

    try:
        snap = compute.snapshot(machine.read_guest)
    except compute.ComputeCheckError as exc:
        raise QMPError("GenericError", f"x-guest-check: {exc}") from None
    out: dict[str, Any] = {"guest": "compute", **snap.to_json(), "run-state": state}
    if reference:
        # One reference per machine, kept across checks: each check only advances it.
        ref = getattr(machine, "_compute_reference", None)
        if ref is None or (ref.seed, ref.buf_size, ref.ncpus) != (
            snap.seed,
            snap.buf_size,
            snap.ncpus,
        ):
            ref = compute.ComputeReference.for_snapshot(snap)
            machine._compute_reference = ref
        out.update(ref.check(snap).to_json())
    return out


def python_threads() -> list[dict[str, Any]]:
    """Every live Python thread of this process (name, thread id): to find a leaked one."""
    return [
        {"name": t.name, "thread-id": t.native_id or 0, "daemon": t.daemon}
        for t in threading.enumerate()
    ]


def register_debug_commands(registry: CommandRegistry, machine: Any) -> None:
    """Add the ``x-`` debugging commands for ``machine`` to ``registry``."""
    registry.add(
        "x-guest-check",
        lambda reference=True: guest_check(machine, reference),
        args={"reference": Arg(bool, optional=True)},
    )
    registry.add("x-debug-threads", python_threads)
