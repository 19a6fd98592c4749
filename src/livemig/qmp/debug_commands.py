"""livemig's own debugging QMP commands (``x-`` prefixed, as QEMU names its unstable ones).

``x-guest-check`` runs the memstress invariant check (``livemig.guests.memstress``) on the
machine's guest memory and returns the report. It changes nothing: the guest must already be
stopped (``stop`` first, ``cont`` after), because the invariant holds only at an instruction
boundary of every vCPU; a running guest is refused rather than silently paused, so a test
sees exactly the run-state transitions it asked for.

``x-debug-threads`` lists every Python thread by name and thread id, so a leak test can say
which thread was left behind.
"""

from __future__ import annotations

import threading
from typing import Any

from livemig.qmp.commands import CommandRegistry, QMPError

# Run states in which the vCPUs are stopped at an instruction boundary and memory is whole.
_STOPPED = frozenset({"paused", "postmigrate", "prelaunch", "finish-migrate", "shutdown"})


def guest_check(machine: Any) -> dict[str, Any]:
    """The memstress invariant report of ``machine``'s guest, as a QMP-friendly dict."""
    from livemig.guests.memstress import check_invariant

    state = str(getattr(machine.runstate, "value", machine.runstate))
    if state not in _STOPPED:
        raise QMPError(
            "GenericError",
            f"x-guest-check needs a stopped guest (run state is {state}): send 'stop' first",
        )
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


def python_threads() -> list[dict[str, Any]]:
    """Every live Python thread of this process (name, thread id): to find a leaked one."""
    return [
        {"name": t.name, "thread-id": t.native_id or 0, "daemon": t.daemon}
        for t in threading.enumerate()
    ]


def register_debug_commands(registry: CommandRegistry, machine: Any) -> None:
    """Add the ``x-`` debugging commands for ``machine`` to ``registry``."""
    registry.add("x-guest-check", lambda: guest_check(machine))
    registry.add("x-debug-threads", python_threads)
