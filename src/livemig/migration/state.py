"""The migration state machine: QEMU's MigrationStatus names and the legal moves, as tables.

One table per side. ``MigrationState.move`` refuses a move that is not in its table, notifies
listeners (which emit QMP ``MIGRATION`` events) and keeps the history, so ``query-migrate`` and
the events are right by construction. The diagram in the docs is ``to_dot()``'s output.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import StrEnum

from livemig.errors import MigrationError


class MigrationStatus(StrEnum):
    """QEMU 10.0's MigrationStatus values, in its order."""

    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER_SETUP = "postcopy-recover-setup"  # a source's resume, connecting
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"  # x-colo: the primary and the standby while they replicate (migration/colo.py)
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"  # never entered here


_S = MigrationStatus
FINAL = frozenset({_S.COMPLETED, _S.FAILED, _S.CANCELLED})
RUNNING = frozenset(
    {
        _S.SETUP,
        _S.ACTIVE,
        _S.PRE_SWITCHOVER,
        _S.DEVICE,
        _S.POSTCOPY_ACTIVE,
        _S.POSTCOPY_PAUSED,
        _S.POSTCOPY_RECOVER_SETUP,
        _S.POSTCOPY_RECOVER,
        _S.CANCELLING,
        _S.COLO,
    }
)

SOURCE_TRANSITIONS: frozenset[tuple[MigrationStatus, MigrationStatus]] = frozenset(
    {
        (_S.NONE, _S.SETUP),
        (_S.SETUP, _S.ACTIVE),
        (_S.SETUP, _S.FAILED),
        (_S.SETUP, _S.CANCELLING),
        (_S.ACTIVE, _S.COMPLETED),
        (_S.ACTIVE, _S.FAILED),
        (_S.ACTIVE, _S.CANCELLING),
        (_S.ACTIVE, _S.PRE_SWITCHOVER),
        (_S.ACTIVE, _S.DEVICE),
        (_S.ACTIVE, _S.POSTCOPY_ACTIVE),
        (_S.PRE_SWITCHOVER, _S.DEVICE),
        (_S.PRE_SWITCHOVER, _S.POSTCOPY_ACTIVE),
        (_S.PRE_SWITCHOVER, _S.FAILED),
        (_S.PRE_SWITCHOVER, _S.CANCELLING),
        (_S.DEVICE, _S.COMPLETED),
        (_S.DEVICE, _S.FAILED),
        (_S.DEVICE, _S.CANCELLING),
        (_S.DEVICE, _S.POSTCOPY_ACTIVE),
        (_S.POSTCOPY_ACTIVE, _S.COMPLETED),
        (_S.POSTCOPY_ACTIVE, _S.FAILED),
        (_S.POSTCOPY_ACTIVE, _S.POSTCOPY_PAUSED),
        # QEMU 10.0: migrate resume=true enters postcopy-recover-setup while it connects,
        # back to postcopy-paused when that fails
        (_S.POSTCOPY_PAUSED, _S.POSTCOPY_RECOVER_SETUP),
        (_S.POSTCOPY_RECOVER_SETUP, _S.POSTCOPY_RECOVER),
        (_S.POSTCOPY_RECOVER_SETUP, _S.POSTCOPY_PAUSED),
        (_S.POSTCOPY_RECOVER_SETUP, _S.FAILED),
        (_S.POSTCOPY_RECOVER_SETUP, _S.CANCELLING),
        (_S.POSTCOPY_PAUSED, _S.FAILED),
        (_S.POSTCOPY_RECOVER, _S.POSTCOPY_ACTIVE),
        (_S.POSTCOPY_RECOVER, _S.POSTCOPY_PAUSED),
        # 7.2 accepts migrate_cancel in post-copy (the guest stays on the destination)
        (_S.POSTCOPY_ACTIVE, _S.CANCELLING),
        (_S.POSTCOPY_PAUSED, _S.CANCELLING),
        (_S.CANCELLING, _S.CANCELLED),
        (_S.CANCELLING, _S.FAILED),
        # COLO (x-colo): after the first migration the primary keeps its guest and sends
        # checkpoints; replication ends in completed (the guest goes on here, unreplicated)
        (_S.ACTIVE, _S.COLO),
        (_S.DEVICE, _S.COLO),
        (_S.COLO, _S.COMPLETED),
        (_S.COLO, _S.CANCELLING),
        # a finished migration may be followed by a new one on the same object
        (_S.COMPLETED, _S.SETUP),
        (_S.FAILED, _S.SETUP),
        (_S.CANCELLED, _S.SETUP),
    }
)

DESTINATION_TRANSITIONS: frozenset[tuple[MigrationStatus, MigrationStatus]] = frozenset(
    {
        (_S.NONE, _S.SETUP),
        (_S.NONE, _S.ACTIVE),
        (_S.SETUP, _S.ACTIVE),
        (_S.SETUP, _S.FAILED),
        (_S.SETUP, _S.CANCELLED),
        (_S.ACTIVE, _S.COMPLETED),
        (_S.ACTIVE, _S.FAILED),
        (_S.ACTIVE, _S.POSTCOPY_ACTIVE),
        (_S.POSTCOPY_ACTIVE, _S.COMPLETED),
        (_S.POSTCOPY_ACTIVE, _S.FAILED),
        (_S.POSTCOPY_ACTIVE, _S.POSTCOPY_PAUSED),
        (_S.POSTCOPY_PAUSED, _S.POSTCOPY_RECOVER),
        (_S.POSTCOPY_PAUSED, _S.FAILED),
        (_S.POSTCOPY_RECOVER, _S.POSTCOPY_ACTIVE),
        (_S.POSTCOPY_RECOVER, _S.POSTCOPY_PAUSED),
        # COLO: the standby loads checkpoints; completed when it took over (failover), failed
        # when replication ended without it taking over
        (_S.ACTIVE, _S.COLO),
        (_S.COLO, _S.COMPLETED),
        (_S.COLO, _S.FAILED),
    }
)

Listener = Callable[[MigrationStatus, MigrationStatus], None]


class MigrationState:
    """The status of one side's migration object; thread-safe."""

    def __init__(self, side: str) -> None:
        if side not in ("source", "destination"):
            raise ValueError(side)
        self.side = side
        self._table = SOURCE_TRANSITIONS if side == "source" else DESTINATION_TRANSITIONS
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._status = MigrationStatus.NONE
        self._listeners: list[Listener] = []
        self.history: list[tuple[float, MigrationStatus]] = [(time.time(), self._status)]
        self.error: str | None = None

    @property
    def status(self) -> MigrationStatus:
        return self._status

    def add_listener(self, cb: Listener) -> None:
        self._listeners.append(cb)

    def can_move(self, new: MigrationStatus) -> bool:
        return (self._status, new) in self._table

    def move(self, new: MigrationStatus, *, error: str | None = None) -> None:
        """Make a legal move; an illegal one is a bug and raises ``MigrationError``."""
        with self._lock:
            old = self._status
            if (old, new) not in self._table:
                raise MigrationError(f"{self.side}: illegal migration state change {old} -> {new}")
            self._status = new
            if new == MigrationStatus.SETUP:
                self.error = None
            if error is not None:
                self.error = error
            self.history.append((time.time(), new))
            self._cond.notify_all()
        for cb in list(self._listeners):
            cb(old, new)

    def try_move(
        self,
        expected: frozenset[MigrationStatus] | MigrationStatus,
        new: MigrationStatus,
        *,
        error: str | None = None,
    ) -> bool:
        """Move only if the current status is ``expected``; False otherwise (races with cancel)."""
        allowed = expected if isinstance(expected, frozenset) else frozenset({expected})
        with self._lock:
            if self._status not in allowed or (self._status, new) not in self._table:
                return False
        self.move(new, error=error)
        return True

    def wait_for(self, statuses: frozenset[MigrationStatus], timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._status in statuses, timeout)


def to_dot(side: str = "source") -> str:
    """The state diagram in Graphviz's dot language, generated from the table."""
    table = SOURCE_TRANSITIONS if side == "source" else DESTINATION_TRANSITIONS
    lines = [f'digraph "{side}" {{']
    lines += [f'  "{a}" -> "{b}";' for a, b in sorted(table)]
    lines.append("}")
    return "\n".join(lines)
