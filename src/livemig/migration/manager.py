"""The migration object of one livemig process, and its QMP commands.

Like QEMU's ``MigrationState`` singleton, it owns the capabilities and parameters, the source
and destination state machines, and at most one outgoing and one incoming migration at a time.
``register_migration_commands`` exposes it over QMP with QEMU's command names, arguments and
error messages; MIGRATION and MIGRATION_PASS events go out when capability ``events`` is on.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from livemig import threads
from livemig.errors import LivemigError, UsageError
from livemig.machine.runstate import RunState
from livemig.migration import multifd
from livemig.migration.destination import IncomingMigration
from livemig.migration.dirtyrate import DirtyRateMeasurement
from livemig.migration.options import PARAMETERS, Capabilities, Parameters
from livemig.migration.source import OutgoingMigration, SourceConfig
from livemig.migration.state import RUNNING, MigrationState, MigrationStatus
from livemig.transport import parse_uri
from livemig.transport.tls import creds_from_params, set_migration_tls

log = logging.getLogger(__name__)

Emit = Callable[..., None]


class MigrationManager:
    """Capabilities, parameters, and the current outgoing / incoming migration."""

    def __init__(
        self, machine: Any, emit: Emit | None = None, autostart: Callable[[], bool] | None = None
    ) -> None:
        self.machine = machine
        self.caps = Capabilities()
        self.params = Parameters()
        self._emit = emit or (lambda name, data=None: None)
        self._autostart = autostart or (lambda: True)
        self.source = MigrationState("source")
        self.dest = MigrationState("destination")
        self.outgoing: OutgoingMigration | None = None
        self.incoming: IncomingMigration | None = None
        self.incoming_deferred = False
        self.dirty_rate_job: DirtyRateMeasurement | None = None
        self._lock = threading.Lock()
        self._done_callbacks: list[Callable[[str, bool], None]] = []
        # host-side state that travels with COLO checkpoints (the service front registers)
        self.colo_participants: list[Any] = []
        self.colo_last_mode = "none"
        self.mark_defaults()
        for st in (self.source, self.dest):
            st.add_listener(self._on_status)

    def mark_defaults(self) -> None:
        """What the process started with (QEMU's defaults, or ``run --cap/--set``, QEMU's
        ``-global migration.x=y``) is this process's default: ``x-query-migrate-defaults``
        tells ``livemig migrate`` what to go back to for what it was not asked."""
        self.defaults = {"capabilities": self.caps.query(), "parameters": self.params.query()}

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        self._emit(name, data)

    def _on_status(self, old: MigrationStatus, new: MigrationStatus) -> None:
        if "events" in self.caps:
            self.emit("MIGRATION", {"status": new.value})

    def _emit_pass(self, name: str, data: dict[str, Any] | None = None) -> None:
        if name != "MIGRATION_PASS" or "events" in self.caps:
            self.emit(name, data)

    def on_done(self, cb: Callable[[str, bool], None]) -> None:
        """``cb(side, ok)`` when a migration on ``side`` ends (for ``exit-on-error``, demo)."""
        self._done_callbacks.append(cb)

    def _busy(self) -> bool:
        return self.source.status in RUNNING or self.dest.status in RUNNING

    # -- source ----------------------------------------------------------------------------

    def migrate(
        self,
        uri: str,
        resume: bool = False,
        detach: bool = True,
        blk: bool = False,
        inc: bool = False,
        verify: bool | None = None,
    ) -> None:
        if blk or inc:
            raise UsageError("block migration (blk/inc) is not supported: livemig has no disks")
        if resume:
            from livemig.migration.postcopy_source import resume_outgoing

            return resume_outgoing(self, uri)
        state = self.machine.runstate
        if state in (RunState.INMIGRATE, RunState.POSTMIGRATE):
            raise UsageError(f"Guest is waiting for an incoming migration or has migrated "
                             f"already (run state {state.value}): migrate refused")  # fmt: skip
        if state in (RunState.SHUTDOWN, RunState.INTERNAL_ERROR):
            raise UsageError(f"The guest is not running (run state {state.value})")
        with self._lock:
            if self._busy():
                raise UsageError("There's a migration process in progress")
            job = self.dirty_rate_job
            if job is not None and job.status == "measuring":
                raise UsageError("a dirty rate calculation is running: wait for it to finish")
            multifd.check_uri(parse_uri(uri), self.caps.enabled())
            # tls-creds: every channel this migration opens is a TLS client (bad creds: refused
            # here, before any state change)
            set_migration_tls("client", creds_from_params(self.params.query(), "client"))
            config = SourceConfig(
                uri=uri,
                capabilities=self.caps.enabled(),
                params=self.params.query(),
                verify=("x-verify" in self.caps) if verify is None else verify,
            )
            self.source.move(MigrationStatus.SETUP)
            self.outgoing = OutgoingMigration(self.machine, config, self.source,
                                              emit=self._emit_pass)  # fmt: skip
            self.outgoing.colo_participants = self.colo_participants
            self.outgoing.start()
            threads.Thread(target=self._watch_outgoing, args=(self.outgoing,),
                           name="migration watcher", daemon=True).start()  # fmt: skip

    def _watch_outgoing(self, mig: OutgoingMigration) -> None:
        mig.join()
        ok = self.source.status == MigrationStatus.COMPLETED
        for cb in list(self._done_callbacks):
            cb("source", ok)

    def cancel(self) -> None:
        """``migrate_cancel``: idempotent, valid in every state."""
        mig = self.outgoing
        if mig is None:
            return
        st = self.source
        if st.status in RUNNING and st.status != MigrationStatus.CANCELLING:
            st.try_move(frozenset({st.status}), MigrationStatus.CANCELLING)
        mig.cancel()

    def cancel_qmp(self) -> None:
        """QMP ``migrate_cancel``: refused in post-copy, as current QEMU does (7.2 accepted it
        and stranded the guest); everywhere else as ``cancel``."""
        status = self.source.status
        if status in (MigrationStatus.POSTCOPY_ACTIVE, MigrationStatus.POSTCOPY_PAUSED,
                      MigrationStatus.POSTCOPY_RECOVER):  # fmt: skip
            raise UsageError(
                f"migrate_cancel is refused in {status.value}: the destination already runs the "
                "guest and the source no longer holds all of its memory, so cancelling would "
                "lose it; a broken link is survived with migrate-pause / migrate-recover and "
                "migrate resume=true"
            )
        self.cancel()

    def migrate_continue(self, state: str) -> None:
        if self.source.status.value != state:
            raise UsageError(f"Migration not in expected state: {self.source.status.value}")
        if self.outgoing is not None:
            self.outgoing.continue_()

    # -- destination -------------------------------------------------------------------------

    def incoming_start(self, uri: str, exit_on_error: bool = True) -> str:
        """Listen for an incoming migration (``-incoming URI`` or ``migrate-incoming``)."""
        if self.machine.runstate != RunState.INMIGRATE:
            raise UsageError("'-incoming' was not specified on the command line")
        with self._lock:
            if self.incoming is not None:
                raise UsageError("The incoming migration has already been started")
            multifd.check_uri(parse_uri(uri), self.caps.enabled())
            set_migration_tls("server", creds_from_params(self.params.query(), "server"))
            self.exit_on_error = exit_on_error
            self.incoming = IncomingMigration(
                self.machine, uri, self.dest, self.params.query(),
                autostart=self._autostart, emit=self.emit, on_done=self._incoming_done,
            )  # fmt: skip
            self.incoming.capabilities = self.caps.enabled()
            self.incoming.colo_participants = self.colo_participants  # the front may come later
            self.incoming.start()
            return self.incoming.uri

    def incoming_start_qmp(self, uri: str, exit_on_error: bool = True) -> None:
        """QMP ``migrate-incoming``: only for a destination started with ``-incoming defer``."""
        if not self.incoming_deferred:
            raise UsageError("'-incoming' was not specified on the command line")
        self.incoming_start(uri, exit_on_error)

    def _incoming_done(self, ok: bool) -> None:
        for cb in list(self._done_callbacks):
            cb("destination", ok)

    # -- COLO ------------------------------------------------------------------------------

    def _colo(self) -> tuple[str, Any]:
        """("primary", ColoPrimary) / ("secondary", ColoSecondary) while replicating, else
        ("none", the last one or None)."""
        out = self.outgoing.colo if self.outgoing is not None else None
        inc = self.incoming.colo if self.incoming is not None else None
        if out is not None and out.active:
            return "primary", out
        if inc is not None and inc.active:
            return "secondary", inc
        return "none", out if out is not None and out.ended else inc

    def query_colo_status(self) -> dict[str, Any]:
        """QEMU's query-colo-status (mode, last-mode, reason), plus livemig's figures."""
        mode, colo = self._colo()
        if colo is None:
            return {"mode": "none", "last-mode": "none", "reason": "none"}
        last = "primary" if colo is getattr(self.outgoing, "colo", None) else "secondary"
        out: dict[str, Any] = {"mode": mode, "last-mode": last if colo.ended else "none",
                               "reason": colo.reason}  # fmt: skip
        out.update(colo.query())
        return out

    def colo_checkpoints(self) -> list[dict[str, Any]]:
        """``x-query-colo-checkpoints``: the primary's last checkpoints, one record each
        (number, pause, bytes, acknowledgement time), for benchmarks."""
        colo = self.outgoing.colo if self.outgoing is not None else None
        if colo is None:
            raise UsageError("this process has not been a COLO primary")
        return colo.stats.records()

    def colo_lost_heartbeat(self) -> None:
        """``x-colo-lost-heartbeat``: a standby takes over now; a primary stops replicating."""
        mode, colo = self._colo()
        if mode == "none":
            raise UsageError("VM is not in COLO mode")
        if mode == "primary":
            colo.request_exit("x-colo-lost-heartbeat: the standby is given up")
        else:
            colo.request_takeover("x-colo-lost-heartbeat")

    # -- capabilities and parameters -----------------------------------------------------

    def set_capabilities(self, capabilities: list[dict[str, Any]]) -> None:
        if self._busy():
            raise UsageError("There's a migration process in progress")
        self.caps.set(capabilities)

    def set_parameters(self, changes: dict[str, Any]) -> None:
        self.params.set(changes)
        if "max-bandwidth" in changes and self.outgoing is not None:
            self.outgoing.set_max_bandwidth(changes["max-bandwidth"])
        if self.outgoing is not None:
            # QEMU applies these to a running migration at its next iteration
            for name in (
                "downtime-limit",
                "avail-switchover-bandwidth",
                "x-checkpoint-delay",
                "x-colo-heartbeat-timeout",
                "x-colo-checkpoint-timeout",
            ):
                if name in changes:
                    self.outgoing.config.params[name] = self.params[name]

    # -- queries -----------------------------------------------------------------------------

    def query_migrate(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.incoming is not None:
            out.update(self.incoming.query())
        if self.outgoing is not None and self.source.status != MigrationStatus.NONE:
            out.update(self.outgoing.query())
        return out

    def calc_dirty_rate(
        self,
        calc_time: int,
        sample_pages: int | None = None,
        mode: str = "dirty-bitmap",
        calc_time_unit: str = "second",
    ) -> None:
        """QEMU's calc-dirty-rate, measured exactly with the dirty tracker."""
        if mode != "dirty-bitmap":
            raise UsageError(
                f"calc-dirty-rate mode '{mode}' is not supported by livemig: it "
                "measures every page with the kernel's dirty log (dirty-bitmap)"
            )
        seconds = calc_time / 1000 if calc_time_unit == "millisecond" else calc_time
        if not 0 < seconds <= 60:
            raise UsageError("Parameter 'calc-time' expects 1 to 60 seconds")
        with self._lock:
            if self._busy():
                raise UsageError("calc-dirty-rate: a migration is in progress")
            job = self.dirty_rate_job
            if job is not None and job.status == "measuring":
                raise UsageError("the previous dirty rate calculation is not finished yet")
            self.dirty_rate_job = DirtyRateMeasurement(
                self.machine, seconds, self.params["x-dirty-tracker"]
            )
            self.dirty_rate_job.start()

    def query_dirty_rate(self, calc_time_unit: str = "second") -> dict[str, Any]:
        job = self.dirty_rate_job
        if job is None:
            return {
                "status": "unstarted",
                "start-time": 0,
                "calc-time": 0,
                "sample-pages": 0,
                "mode": "dirty-bitmap",
            }
        return job.query()

    def report(self) -> dict[str, Any]:
        """livemig's own timeline of the last migration (``livemig report``): the source's
        passes, phases and downtime breakdown, or the destination's timeline and post-copy
        page-request latencies."""
        if self.outgoing is not None:
            return self.outgoing.report()
        if self.incoming is not None:
            return self.incoming.report()
        raise UsageError("no migration has run in this process")

    def query_threads(self) -> list[dict[str, Any]]:
        running: list[threading.Thread] = []
        if self.outgoing is not None:
            running += self.outgoing.threads
        if self.incoming is not None:
            running.append(self.incoming.thread)
        return [{"name": t.name, "thread-id": t.native_id or os.getpid()}
                for t in running if t.is_alive()]  # fmt: skip


def register_migration_commands(registry: Any, manager: MigrationManager) -> None:
    """Add QEMU's migration commands to a QMP ``CommandRegistry``."""
    from livemig.qmp import Arg, QMPError

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def handler(**kwargs: Any) -> Any:
            try:
                return fn(**kwargs)
            except LivemigError as exc:
                if isinstance(exc, QMPError):
                    raise
                raise QMPError("GenericError", str(exc)) from exc

        handler.__name__ = fn.__name__
        return handler

    registry.add("migrate", wrap(manager.migrate), args={
        "uri": Arg(str), "detach": Arg(bool, optional=True), "resume": Arg(bool, optional=True),
        "blk": Arg(bool, optional=True), "inc": Arg(bool, optional=True),
    })  # fmt: skip
    registry.add("migrate-incoming", wrap(manager.incoming_start_qmp), args={
        "uri": Arg(str), "exit-on-error": Arg(bool, optional=True)})  # fmt: skip
    registry.add("migrate_cancel", wrap(manager.cancel_qmp))
    registry.add("migrate-cancel", wrap(manager.cancel_qmp))
    registry.add("migrate-continue", wrap(manager.migrate_continue), args={"state": Arg(str)})
    cap_item = Arg(dict, members={"capability": Arg(str), "state": Arg(bool)})
    registry.add("migrate-set-capabilities", wrap(manager.set_capabilities),
                 args={"capabilities": Arg(list, items=cap_item)})  # fmt: skip
    registry.add("query-migrate-capabilities", wrap(manager.caps.query))
    param_args = {
        p.name: Arg(p.type, optional=True, nullable=p.name.startswith("tls-")) for p in PARAMETERS
    }
    registry.add("migrate-set-parameters", wrap(
        lambda **kw: manager.set_parameters({k.replace("_", "-"): v for k, v in kw.items()})),
        args=param_args)  # fmt: skip
    registry.add("query-migrate-parameters", wrap(manager.params.query))
    registry.add("x-query-migrate-defaults", wrap(lambda: manager.defaults))
    registry.add("query-migrate", wrap(manager.query_migrate))
    registry.add("query-migrationthreads", wrap(manager.query_threads))
    from livemig.migration.postcopy_source import register_postcopy_commands

    register_postcopy_commands(registry, manager, wrap)
    registry.add("x-query-migration-report", wrap(manager.report))
    registry.add("query-colo-status", wrap(manager.query_colo_status))
    registry.add("x-colo-lost-heartbeat", wrap(manager.colo_lost_heartbeat))
    registry.add("x-query-colo-checkpoints", wrap(manager.colo_checkpoints))
    registry.add("calc-dirty-rate", wrap(manager.calc_dirty_rate), args={
        "calc-time": Arg(int), "sample-pages": Arg(int, optional=True),
        "mode": Arg(str, optional=True, choices=("page-sampling", "dirty-ring", "dirty-bitmap")),
        "calc-time-unit": Arg(str, optional=True, choices=("second", "millisecond")),
    })  # fmt: skip
    registry.add("query-dirty-rate", wrap(manager.query_dirty_rate), args={
        "calc-time-unit": Arg(str, optional=True, choices=("second", "millisecond"))})  # fmt: skip
