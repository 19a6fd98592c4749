"""The migration object of one livemig process, and its QMP commands.

Like QEMU's ``MigrationState`` singleton, it owns the capabilities and parameters, the source
and destination state machines, and at most one outgoing and one incoming migration at a time.
``register_migration_commands`` exposes it over QMP with QEMU's command names, arguments and
error messages; MIGRATION and MIGRATION_PASS events go out when capability ``events`` is on.
"""

from __future__ import annotations

import contextlib
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
from livemig.migration.options import (
    PARAMETERS,
    Capabilities,
    Parameters,
    check_for_migration,
)
from livemig.migration.source import OutgoingMigration, SourceConfig
from livemig.migration.state import FINAL, RUNNING, MigrationState, MigrationStatus
from livemig.transport import parse_uri
from livemig.transport.open import check_file
from livemig.transport.tls import creds_from_params, set_migration_tls
from livemig.transport.uri import SCHEMES

log = logging.getLogger(__name__)

Emit = Callable[..., None]


class MigrationManager:
    """Capabilities, parameters, and the current outgoing / incoming migration."""

    def __init__(
        self,
        machine: Any,
        emit: Emit | None = None,
        autostart: Callable[[], bool] | None = None,
        events_held: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> None:
        self.machine = machine
        # the QMP server's ``events_held``: a downtime holds the events it raises until its end
        self.events_held = events_held or contextlib.nullcontext
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

    def migrate_qmp(
        self,
        uri: str | None = None,
        channels: list[Any] | None = None,
        resume: bool = False,
        detach: bool = True,
    ) -> None:
        """QMP ``migrate``: QEMU 10.0's arguments and checks, in its order (the URI first)."""
        uri = qmp_uri(uri, channels)
        parse_qmp_uri(uri)
        self.migrate(uri, resume=resume, detach=detach)

    def migrate(
        self,
        uri: str,
        resume: bool = False,
        detach: bool = True,
        verify: bool | None = None,
    ) -> None:
        check_transport(parse_uri(uri), self.caps.enabled())
        check_return_path(parse_uri(uri), self.caps.enabled())
        if resume:
            from livemig.migration.postcopy_source import resume_outgoing

            return resume_outgoing(self, uri)
        state = self.machine.runstate
        with self._lock:
            # QEMU's migrate_prepare, in its order (its "migration" is the source's)
            if self.source.status in RUNNING:
                raise UsageError("There's a migration process in progress")
            if state == RunState.INMIGRATE:
                raise UsageError("Guest is waiting for an incoming migration")
            if state == RunState.POSTMIGRATE:
                raise UsageError("Can't migrate the vm that was paused due to previous "
                                 "migration")  # fmt: skip
            if state in (RunState.SHUTDOWN, RunState.INTERNAL_ERROR):
                raise UsageError(f"The guest is not running (run state {state.value})")
            check_for_migration(self.params.query(), self.caps.enabled())
            job = self.dirty_rate_job
            if job is not None and job.status == "measuring":
                raise UsageError("a dirty rate calculation is running: wait for it to finish")
            u = parse_uri(uri)
            multifd.check_uri(u, self.caps.enabled())
            verify = ("x-verify" in self.caps) if verify is None else verify
            if verify:
                check_verify(u, self.caps.enabled())
            # tls-creds: every channel this migration opens is a TLS client (bad creds: refused
            # here, before any state change)
            set_migration_tls("client", creds_from_params(self.params.query(), "client"))
            _check_target(u)
            config = SourceConfig(
                uri=uri,
                capabilities=self.caps.enabled(),
                params=self.params.query(),
                verify=verify,
            )
            self.source.move(MigrationStatus.SETUP)
            self.outgoing = OutgoingMigration(self.machine, config, self.source,
                                              emit=self._emit_pass,
                                              events_held=self.events_held)  # fmt: skip
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
                      MigrationStatus.POSTCOPY_RECOVER_SETUP,
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
            check_transport(parse_uri(uri), self.caps.enabled())
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

    def incoming_start_qmp(
        self, uri: str | None = None, channels: list[Any] | None = None,
        exit_on_error: bool = True,
    ) -> None:  # fmt: skip
        """QMP ``migrate-incoming``: only for a destination started with ``-incoming defer``."""
        if self.incoming is not None:
            raise UsageError("The incoming migration has already been started")
        if not self.incoming_deferred or self.machine.runstate != RunState.INMIGRATE:
            raise UsageError("'-incoming' was not specified on the command line")
        uri = qmp_uri(uri, channels, incoming=True)
        parse_qmp_uri(uri)
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
        # QEMU 10.0 refuses while its source migrates; a destination's incoming side only
        # refuses what must be set before it started (multifd, postcopy-preempt)
        if self.source.status in RUNNING:
            raise UsageError("There's a migration process in progress")
        # QEMU's migrate_incoming_started(): a transport exists, from migrate-incoming until
        # the incoming side is cleaned up; a finished incoming migration no longer counts
        started = self.incoming is not None and self.dest.status not in FINAL
        self.caps.set(capabilities, incoming_started=started)

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
        mode: str | None = None,
        calc_time_unit: str = "second",
    ) -> None:
        """QEMU's calc-dirty-rate, measured exactly with the dirty tracker; QEMU 10.0's
        checks in its order and words (``qmp_calc_dirty_rate``)."""
        ms = calc_time if calc_time_unit == "millisecond" else calc_time * 1000
        if not 50 <= ms <= 60000:
            raise UsageError("Calculation time is out of range [50ms, 60000ms].")
        if mode == "dirty-ring":
            # true here as on a QEMU without KVM's dirty ring
            raise UsageError("mode dirty-ring is not enabled, use other method instead.")
        if mode == "page-sampling":
            raise UsageError(
                f"calc-dirty-rate mode '{mode}' is not supported by livemig: it "
                "measures every page with the kernel's dirty log (dirty-bitmap)"
            )
        if sample_pages is not None:
            # QEMU's default mode samples pages; livemig's counts them all, so the count is
            # checked as QEMU checks it and then has nothing to change
            if mode is not None:
                raise UsageError("sample-pages is used only in page-sampling mode")
            if not 128 <= sample_pages <= 16384:
                raise UsageError("sample-pages is out of range[128, 16384].")
        seconds = ms / 1000
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
                "calc-time-unit": calc_time_unit,
                "sample-pages": 0,
                "mode": "dirty-bitmap",
            }
        return {**job.query(), "calc-time-unit": calc_time_unit}

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
        """QEMU 10.0's query-migrationthreads: the threads it registers, the source's main
        migration thread and its multifd send threads (QEMU's names, which are also the
        threads' kernel names here, as with QEMU's ``-name debug-threads=on``)."""
        running: list[threading.Thread] = []
        mig = self.outgoing
        if mig is not None:
            running.append(mig.thread)
            sender = getattr(mig, "multifd", None)
            running += [w.thread for w in getattr(sender, "workers", ())]
        return [{"name": t.name, "thread-id": t.native_id or os.getpid()}
                for t in running if t.is_alive()]  # fmt: skip


def check_verify(u: Any, caps: frozenset[str]) -> None:
    """x-verify needs a way to verify, or it would say nothing: on a socket the destination's
    verdict comes back on the return path; a file or a pipe is checked when it is loaded, by
    its checksums (x-checksums) and the RAM digests the stream carries."""
    if u.has_return_path:
        if "return-path" not in caps and "postcopy-ram" not in caps:
            raise UsageError(f"x-verify needs capability return-path on {u}: the destination's "
                             "verdict comes back on it")  # fmt: skip
    elif "x-checksums" not in caps:
        raise UsageError(f"x-verify on {u} is checked when the stream is loaded, by its "
                         "checksums: turn capability x-checksums on")  # fmt: skip


def qmp_uri(uri: str | None, channels: list[Any] | None, incoming: bool = False) -> str:
    """The URI of a QMP ``migrate`` / ``migrate-incoming``: QEMU 10.0 takes either ``uri`` or
    ``channels`` (``migration/channels.py``). An empty list is no list, as in QEMU's C."""
    channels = channels or None
    if (uri is None) == (channels is None):
        raise UsageError("need either 'uri' or 'channels' argument")
    if uri is None:
        from livemig.migration.channels import channels_uri

        assert channels is not None
        return channels_uri(channels, incoming)
    return uri


def check_transport(u: Any, capabilities: Any) -> None:
    """QEMU 10.0's ``migration_transport_compatible``, checked by ``migrate`` and
    ``migrate-incoming`` right after the URI, before anything starts: mapped-ram needs a
    file it can seek in. Refused later, a mapped-ram migration over ``tcp:`` reached the
    destination and ended it with a truncated stream. (QEMU also takes a seekable ``fd:``;
    livemig writes and reads mapped-ram at ``file:`` only. multifd's own half of the check,
    more than one connection, is ``multifd.check_uri``.)"""
    if "mapped-ram" in capabilities and u.scheme != "file":
        extra = ": livemig takes mapped-ram on file: only" if u.scheme == "fd" else ""
        raise UsageError(f"Migration requires seekable transport (e.g. file){extra}")
    # QEMU's migration_needs_multiple_sockets: multifd's channels, post-copy's preempt channel
    multi = u.multi_channel or (u.scheme == "file" and "mapped-ram" in capabilities)
    for cap in ("multifd", "postcopy-preempt"):
        if cap in capabilities and not multi:
            raise UsageError(f"Migration requires multi-channel URIs (e.g. tcp): {cap} opens "
                             f"more connections and {u} carries one")  # fmt: skip


def check_return_path(u: Any, capabilities: Any) -> None:
    """What needs the destination to answer, refused by ``migrate`` on a URI that cannot
    carry an answer (``exec:``, ``file:``). QEMU 10.0 takes these and then waits for ever in
    ``device`` (exec:) or fails reading the file; livemig failed post-copy and COLO once
    started, and with switchover-ack stayed ``active`` for ever, waiting for the ACK."""
    if u.has_return_path:
        return
    for cap, why in (("postcopy-ram", "the destination requests its missing pages on it"),
                     ("switchover-ack", "the destination acknowledges the switch-over on it"),
                     ("x-colo", "the standby acknowledges each checkpoint on it")):  # fmt: skip
        if cap in capabilities:
            raise UsageError(f"{cap} needs a return path ({why}); {u.scheme}: has none "
                             "(tcp:, unix: or fd: with a socket)")  # fmt: skip


def _check_target(u: Any) -> None:
    """What QEMU 10.0's ``migrate`` refuses at once rather than as a failed migration: a
    ``file:`` it cannot create (``check_file``), an ``fd:`` this process does not have."""
    if u.scheme == "file":
        check_file(u, writing=True)
    elif u.scheme == "fd":
        try:
            os.fstat(u.fd)
        except OSError:
            raise UsageError(f"{u}: file descriptor {u.fd} is not open in this process") from None


def parse_qmp_uri(uri: str) -> Any:
    """``parse_uri`` with QEMU's messages for what QEMU refuses alike."""
    scheme, sep, rest = uri.partition(":")
    if not sep or scheme not in SCHEMES:
        raise UsageError(f"unknown migration protocol: {uri}")
    try:
        return parse_uri(uri)
    except UsageError:
        if scheme == "tcp":
            raise UsageError(f"error parsing address '{rest}'") from None
        raise


def register_migration_commands(registry: Any, manager: MigrationManager) -> None:
    """Add QEMU's migration commands to a QMP ``CommandRegistry``."""
    from livemig.qmp import EMPTY, Arg, QMPError

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

    from livemig.migration import qmp_types as T

    for name, data in T.EVENTS.items():
        registry.add_event(name, data)
    channels = Arg(list, optional=True, items=Arg(object))
    registry.add("migrate", wrap(manager.migrate_qmp), args={
        "uri": Arg(str, optional=True), "channels": channels,
        "detach": Arg(bool, optional=True), "resume": Arg(bool, optional=True),
    }, returns=EMPTY)  # fmt: skip
    registry.add("migrate-incoming", wrap(manager.incoming_start_qmp), args={
        "uri": Arg(str, optional=True), "channels": channels,
        "exit-on-error": Arg(bool, optional=True)}, returns=EMPTY)  # fmt: skip
    registry.add("migrate_cancel", wrap(manager.cancel_qmp), returns=EMPTY)
    registry.add("migrate-continue", wrap(manager.migrate_continue),
                 args={"state": T.STATUS}, returns=EMPTY)  # fmt: skip
    registry.add("migrate-set-capabilities", wrap(manager.set_capabilities),
                 args={"capabilities": Arg(list, items=T.CAPABILITY_STATUS)},
                 returns=EMPTY)  # fmt: skip
    registry.add("query-migrate-capabilities", wrap(manager.caps.query),
                 returns=Arg(list, items=T.CAPABILITY_STATUS))  # fmt: skip
    # typed by Parameters.set, with QEMU's QAPI messages; the QAPI types are for the schema
    param_args = {p.name: Arg(object, optional=True, qtype=p.qtype, choices=p.choices)
                  for p in PARAMETERS}  # fmt: skip
    registry.add("migrate-set-parameters", wrap(
        lambda **kw: manager.set_parameters({k.replace("_", "-"): v for k, v in kw.items()})),
        args=param_args, returns=EMPTY)  # fmt: skip
    registry.add("query-migrate-parameters", wrap(manager.params.query),
                 returns=T.MIGRATION_PARAMETERS)  # fmt: skip
    registry.add("x-query-migrate-defaults", wrap(lambda: manager.defaults))
    registry.add("query-migrate", wrap(manager.query_migrate), returns=T.MIGRATION_INFO)
    registry.add("query-migrationthreads", wrap(manager.query_threads),
                 returns=Arg(list, items=T.THREAD_INFO), features=("deprecated",))  # fmt: skip
    from livemig.migration.postcopy_source import register_postcopy_commands

    register_postcopy_commands(registry, manager, wrap)
    registry.add("x-query-migration-report", wrap(manager.report))
    registry.add("query-colo-status", wrap(manager.query_colo_status), returns=T.COLO_STATUS)
    registry.add("x-colo-lost-heartbeat", wrap(manager.colo_lost_heartbeat), returns=EMPTY)
    registry.add("x-query-colo-checkpoints", wrap(manager.colo_checkpoints))
    registry.add("calc-dirty-rate", wrap(manager.calc_dirty_rate), args={
        "calc-time": Arg(int), "calc-time-unit": Arg(str, optional=True,
                                                     choices=("second", "millisecond")),
        "sample-pages": Arg(int, optional=True),
        "mode": Arg(str, optional=True, choices=("page-sampling", "dirty-ring", "dirty-bitmap")),
    }, returns=EMPTY)  # fmt: skip
    registry.add("query-dirty-rate", wrap(manager.query_dirty_rate), args={
        "calc-time-unit": Arg(str, optional=True, choices=("second", "millisecond"))},
        returns=T.DIRTY_RATE_INFO)  # fmt: skip
