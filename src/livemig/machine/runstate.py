"""The machine's run states and the legal moves between them, as one table (QEMU: runstate.c).

The names are QEMU's, so ``query-status`` and the migration code speak the same language as a
real QEMU. A move that is not in ``TRANSITIONS`` is refused with ``MachineError``: the table is
the single source of truth, and the docs' diagram can be generated from it (``to_dot``).

    prelaunch ──► running ◄──► paused
        │            │  ▲         │
        ▼            ▼  │         ▼
    inmigrate    finish-migrate ─► postmigrate
        │
        └──► running / paused / postmigrate / shutdown / internal-error / colo

    colo (COLO: a primary stopped for a checkpoint, a standby) ◄──► running

``running`` is the only state in which vCPUs execute guest code.
"""

from __future__ import annotations

from enum import StrEnum

from livemig.errors import MachineError


class RunState(StrEnum):
    """QEMU's RunState names (the strings ``query-status`` reports)."""

    PRELAUNCH = "prelaunch"
    RUNNING = "running"
    PAUSED = "paused"
    INMIGRATE = "inmigrate"
    POSTMIGRATE = "postmigrate"
    FINISH_MIGRATE = "finish-migrate"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal-error"
    GUEST_PANICKED = "guest-panicked"
    # COLO: a primary stopped for a checkpoint, or a standby waiting for checkpoints
    COLO = "colo"


_R = RunState

# The subset of QEMU's runstate_transitions_def that applies to this machine.
TRANSITIONS: frozenset[tuple[RunState, RunState]] = frozenset(
    {
        (_R.PRELAUNCH, _R.RUNNING),
        (_R.PRELAUNCH, _R.PAUSED),
        (_R.PRELAUNCH, _R.INMIGRATE),
        (_R.PRELAUNCH, _R.FINISH_MIGRATE),
        (_R.PRELAUNCH, _R.SHUTDOWN),
        (_R.INMIGRATE, _R.RUNNING),
        (_R.INMIGRATE, _R.PAUSED),
        (_R.INMIGRATE, _R.POSTMIGRATE),
        (_R.INMIGRATE, _R.PRELAUNCH),
        (_R.INMIGRATE, _R.SHUTDOWN),
        (_R.INMIGRATE, _R.INTERNAL_ERROR),
        (_R.INMIGRATE, _R.GUEST_PANICKED),
        (_R.RUNNING, _R.PAUSED),
        (_R.RUNNING, _R.FINISH_MIGRATE),
        (_R.RUNNING, _R.SHUTDOWN),
        (_R.RUNNING, _R.INTERNAL_ERROR),
        (_R.RUNNING, _R.GUEST_PANICKED),
        (_R.PAUSED, _R.RUNNING),
        (_R.PAUSED, _R.FINISH_MIGRATE),
        (_R.PAUSED, _R.POSTMIGRATE),
        (_R.PAUSED, _R.PRELAUNCH),
        (_R.PAUSED, _R.SHUTDOWN),
        # not QEMU's: a post-copy destination started paused (-S) whose migration fails holds
        # an incomplete guest; QEMU's ends the process, livemig's stops that guest for good
        # (as it does a running one) so that no ``cont`` runs it on zero-filled pages
        (_R.PAUSED, _R.INTERNAL_ERROR),
        (_R.FINISH_MIGRATE, _R.RUNNING),
        (_R.FINISH_MIGRATE, _R.PAUSED),
        (_R.FINISH_MIGRATE, _R.POSTMIGRATE),
        (_R.FINISH_MIGRATE, _R.PRELAUNCH),
        (_R.FINISH_MIGRATE, _R.SHUTDOWN),
        (_R.FINISH_MIGRATE, _R.INTERNAL_ERROR),
        (_R.FINISH_MIGRATE, _R.GUEST_PANICKED),
        (_R.POSTMIGRATE, _R.RUNNING),
        (_R.POSTMIGRATE, _R.FINISH_MIGRATE),
        (_R.POSTMIGRATE, _R.PRELAUNCH),
        (_R.POSTMIGRATE, _R.SHUTDOWN),
        (_R.SHUTDOWN, _R.PAUSED),
        (_R.SHUTDOWN, _R.FINISH_MIGRATE),
        (_R.SHUTDOWN, _R.PRELAUNCH),
        (_R.INTERNAL_ERROR, _R.PAUSED),
        (_R.INTERNAL_ERROR, _R.FINISH_MIGRATE),
        (_R.INTERNAL_ERROR, _R.PRELAUNCH),
        (_R.GUEST_PANICKED, _R.PAUSED),
        (_R.GUEST_PANICKED, _R.FINISH_MIGRATE),
        (_R.GUEST_PANICKED, _R.PRELAUNCH),
        # QEMU's COLO moves (runstate.c), plus colo -> paused: a standby taking over a guest
        # its primary had paused (livemig's standby does not run until it takes over)
        (_R.INMIGRATE, _R.COLO),
        (_R.RUNNING, _R.COLO),
        (_R.PAUSED, _R.COLO),
        (_R.FINISH_MIGRATE, _R.COLO),
        (_R.COLO, _R.RUNNING),
        (_R.COLO, _R.PAUSED),
        (_R.COLO, _R.PRELAUNCH),
        (_R.COLO, _R.SHUTDOWN),
    }
)


def is_legal(old: RunState, new: RunState) -> bool:
    """True if QEMU would allow ``old -> new`` (staying in the same state is always allowed)."""
    return old == new or (old, new) in TRANSITIONS


def check_transition(old: RunState, new: RunState) -> None:
    """Raise ``MachineError`` unless ``old -> new`` is in the table."""
    if not is_legal(old, new):
        allowed = sorted(str(b) for a, b in TRANSITIONS if a == old)
        raise MachineError(
            f"invalid run state transition {old} -> {new} (from {old}: {', '.join(allowed)})"
        )


def to_dot() -> str:
    """The transition table as a Graphviz digraph, for the docs."""
    lines = ["digraph runstate {"]
    lines += [f'  "{a}" -> "{b}";' for a, b in sorted(TRANSITIONS)]
    lines.append("}")
    return "\n".join(lines)
