"""One emulator: the machine with its guest, QMP monitor, migration manager and service front.

``System(SystemOptions(...))`` assembles what one ``livemig run`` holds, as QEMU's
``system/vl.c`` does for ``qemu-system-x86_64``: the machine (``livemig.machine``) with the
guest built and loaded, or waiting in ``inmigrate`` for one to come by migration; the QMP
monitor (``livemig.qmp``) with the machine, debug, migration and service commands; the
migration manager (``livemig.migration``) with this process's default capabilities and
parameters (QEMU's ``-global migration.x=y``); and the service front (``livemig.service``)
that bridges clients to the guest and follows it when it migrates. ``start`` brings it up in
that order (QMP answers only once an incoming machine is in ``inmigrate``), ``wait`` returns
when the guest ends, QMP ``quit`` arrives or ``shutdown`` is called, with the exit status
``livemig run`` exits with, and ``close`` releases everything.

Options that do not fit raise ``UsageError`` before any RAM is taken; a guest that does not
build raises ``GuestBuildError``. What an operator must hear while it runs (where it serves,
a COLO failover, an incoming migration that failed and ends the process) goes to
``on_message`` as one sentence; ``livemig run`` prints it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from livemig.errors import UsageError
from livemig.machine import Machine, RunState
from livemig.units import format_size

log = logging.getLogger(__name__)


@dataclass
class SystemOptions:
    """What ``livemig run``'s flags ask, by the same names (the error messages name the
    flags). ``caps`` / ``params`` are QMP's names and values (``parse_cap`` / ``parse_param``
    read the command line's ``--cap`` / ``--set``)."""

    guest: str | None = None  # built-in guest name or a freestanding C file
    append: str = ""  # the guest's boot arguments
    qmp: str | None = None  # QMP monitor: unix:PATH or tcp:HOST:PORT
    prelaunch: bool = False  # -S: the guest waits for QMP cont (after an incoming one too)
    incoming: str | None = None  # receive the guest by migration: a URI or "defer"
    qmp_insecure: bool = False  # allow a QMP tcp: beyond loopback without TLS
    verify: bool = False  # incoming: refuse a stream without livemig's checksums
    checksums: bool = True  # incoming: False loads a stream without them, even from a file
    tls_creds: str | None = None  # x509 directory: migration tls-creds, QMP tcp: behind TLS
    serve: str | None = None  # bridge clients on this URI to the guest's ring device
    caps: dict[str, bool] = field(default_factory=dict)  # migration capabilities at start
    params: dict[str, Any] = field(default_factory=dict)  # migration parameters at start
    # the machine, when System builds it (livemig.machine.options' flags)
    memory: str | int | None = None
    ram_blocks: list[str] = field(default_factory=list)  # NAME=SIZE
    smp: int = 1
    prefault: bool = False
    serial: str = "stdio"


def check_options(opts: SystemOptions) -> None:
    """The options that exclude or need each other, and the QMP address (UsageError)."""
    if opts.incoming is None and not opts.guest:
        raise UsageError("give --guest NAME|FILE.c (or --incoming URI to receive a guest)")
    if opts.incoming is not None and opts.guest:
        raise UsageError("--guest and --incoming exclude each other: the guest comes by migration")
    if (opts.verify or not opts.checksums) and opts.incoming is None:
        raise UsageError("--verify and --no-checksums apply to --incoming")
    if opts.verify and not opts.checksums:
        raise UsageError("--verify requires checksums: it excludes --no-checksums")
    if opts.qmp:
        from livemig.qmp import parse_qmp_address

        try:
            parse_qmp_address(opts.qmp)
        except ValueError as exc:
            raise UsageError(f"--qmp {opts.qmp!r}: {exc}") from exc
        from livemig.qmp.server import check_exposure

        check_exposure(opts.qmp, bool(opts.tls_creds), opts.qmp_insecure)


def require_checksums(opts: SystemOptions) -> bool:
    """Whether this destination refuses a stream without checksums: with --verify, and by
    default for a snapshot (file:, exec:), which nothing else vouches for."""
    if not opts.checksums:
        return False
    if opts.verify:
        return True
    return str(opts.incoming).split(":", 1)[0] in ("file", "exec")


def _nothing(_text: str) -> None:
    pass


class System:
    """See the module docstring. Build, ``start``, ``wait``, ``close`` (or use ``with``)."""

    def __init__(self, options: SystemOptions, machine: Machine | None = None, *,
                 on_message: Callable[[str], None] | None = None) -> None:  # fmt: skip
        """Check the options and build the guest (errors before any RAM is taken), then the
        machine (``machine`` if given: its RAM and vCPUs instead of the options')."""
        self.options = opts = options
        self.on_message = on_message or (lambda text: log.info("%s", text))
        check_options(opts)
        self.image = None
        if opts.guest:
            from livemig.guests import build_guest
            from livemig.guests.args import check_guest_args

            self.image = build_guest(opts.guest)  # compile errors surface before any RAM
            check_guest_args(opts.guest, opts.append)  # built-in guests only
        if machine is None:
            from livemig.machine.ram import parse_ram_blocks

            ram = parse_ram_blocks(opts.memory, opts.ram_blocks)
            machine = Machine(ram, opts.smp, serial=opts.serial, prefault=opts.prefault)
        self.machine = machine
        self.quit_event = threading.Event()
        self.server: Any = None  # the QMP server (with --qmp)
        self.manager: Any = None  # livemig.migration.manager.MigrationManager
        self.front: Any = None  # livemig.service's front (with --serve or --incoming)
        self._control: Any = None

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> System:
        """Monitor, migration manager, service front, then the guest (unless -S or incoming)."""
        opts, machine = self.options, self.machine
        self._start_control()
        try:
            if opts.serve or opts.incoming is not None:
                # the service front (livemig.service): clients reach the guest here, and follow
                # it when it migrates; a destination has one to take them over
                from livemig.service import start_service

                registry = self.server.registry if self.server is not None else None
                self.front = start_service(machine, opts.serve, registry, self.manager)
                if opts.serve:
                    self.on_message(f"serving on {self.front.address}")
            ram = ", ".join(f"{b.idstr}={format_size(b.size)}" for b in machine.ram_blocks)
            if self.image is not None:
                machine.load_guest(self.image.data, opts.append)
                what = f"guest {self.image.name}"
            else:
                # where it listens, and the monitor: the real port of a port 0, which is what a
                # client must be told (it printed the :0 it was given)
                incoming = getattr(self.manager, "incoming", None)
                what = f"incoming guest ({incoming.uri if incoming is not None else opts.incoming})"
            where = f", QMP at {self.server.address}" if self.server is not None else ""
            self.on_message(f"{what}, {len(machine.vcpus)} vCPUs, {ram}{where}")
            if self.image is not None and not opts.prelaunch:
                machine.start()
        except BaseException:
            self._stop_control()
            raise
        return self

    def wait(self, timeout: float | None = None) -> int | None:
        """Until the guest ends, QMP ``quit`` arrives or ``shutdown`` is called; then the
        monitor and the service front are closed and the exit status returned: the guest's own
        (its ``exit()`` / the power port), 0 after ``quit``, 1 when the guest faulted or an
        incoming migration failed, 130 after ``shutdown("host-signal")``. None if
        ``timeout`` seconds passed first (everything still runs)."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.quit_event.is_set() and not self.machine.wait_for_end(0.2):
            if deadline is not None and time.monotonic() >= deadline:
                return None
        self._stop_control()
        machine = self.machine
        if machine.runstate == RunState.INTERNAL_ERROR:
            self.on_message(f"guest failed: {machine.error}")
            return 1
        if machine.shutdown_reason == "host-signal":
            return 130
        return machine.exit_status if machine.exit_status is not None else 0

    def shutdown(self, reason: str = "host-signal") -> None:
        """End the guest (QEMU's shutdown cause, e.g. ``host-signal`` for Ctrl-C); ``wait``
        returns."""
        self.machine.shutdown(reason)
        self.quit_event.set()

    def close(self) -> None:
        """Release the monitor, the front and the machine (its RAM and vCPU threads)."""
        self._stop_control()
        self.machine.close()

    def __enter__(self) -> System:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the parts ---------------------------------------------------------------------------

    def _stop_control(self) -> None:
        if self.front is not None:
            self.front.close()
            self.front = None
        if self.server is not None:
            self.server.close()
            self.server = None

    def _start_settings(self) -> None:
        """``--cap`` / ``--set``: checked like QMP's (all or nothing), then this process's
        defaults."""
        opts, manager = self.options, self.manager
        try:
            if opts.caps:
                manager.caps.set(dict(opts.caps))
            if opts.params:
                manager.params.set(dict(opts.params))
        except UsageError as exc:
            raise UsageError(f"--cap/--set: {exc}") from exc
        manager.mark_defaults()

    def _say_colo_exit(self, data: dict[str, Any]) -> None:
        status = self.manager.query_colo_status()
        why = status.get("x-how") or status.get("x-error") or data.get("reason")
        if data.get("mode") == "secondary":
            what = ("the standby took over (the guest runs here now)" if status.get("x-took-over")
                    else "the standby stood down (it does not run the guest)")  # fmt: skip
        else:
            what = "replication ended: the guest goes on here UNREPLICATED"
        self.on_message(f"COLO: {what}: {why}")

    def _start_control(self) -> None:
        """The QMP server (if ``qmp``) and the migration manager."""
        opts, machine = self.options, self.machine
        server = control = None
        if opts.qmp:
            from livemig.qmp import CommandRegistry, QMPServer
            from livemig.qmp.machine_commands import register_machine_commands

            registry = CommandRegistry()
            qmp_tls = None
            if opts.tls_creds and opts.qmp.startswith("tcp:"):
                from livemig.transport.tls import load_creds

                qmp_tls = load_creds(opts.tls_creds, "server")
            server = QMPServer(opts.qmp, registry, tls=qmp_tls, insecure=opts.qmp_insecure)

            def on_quit() -> None:
                machine.shutdown("host-qmp-quit")
                self.quit_event.set()

            control = register_machine_commands(
                registry, machine, server, on_quit=on_quit, autostart=not opts.prelaunch
            )
            from livemig.qmp.debug_commands import register_debug_commands

            register_debug_commands(registry, machine)
        self.server, self._control = server, control
        from livemig.migration.manager import MigrationManager, register_migration_commands

        qmp_emit = server.emit_event if server is not None else None

        def emit(name: str, data: dict[str, Any] | None = None) -> None:
            if qmp_emit is not None:
                qmp_emit(name, data)
            if name == "COLO_EXIT":  # an operator must see a failover, QMP or not
                self._say_colo_exit(data or {})

        autostart = (lambda: control.autostart) if control else (lambda: not opts.prelaunch)
        manager = MigrationManager(machine, emit=emit, autostart=autostart,
                                   events_held=server.events_held if server else None)  # fmt: skip
        self.manager = manager
        if opts.tls_creds:
            from livemig.transport.tls import load_creds

            load_creds(opts.tls_creds, "server")  # a bad directory is a usage error at start
            manager.params.set({"tls-creds": opts.tls_creds})
        self._start_settings()
        if server is not None:
            register_migration_commands(server.registry, manager)

        def on_migration_done(side: str, ok: bool) -> None:
            if side == "destination" and ok and machine.runstate == RunState.PAUSED and autostart():
                # nobody asked for a paused guest (-S, QMP stop): the stream's global state
                # did, as a snapshot of a stopped guest (migrate --stop) does. Said aloud, or
                # a restore just sits there.
                how = (
                    "QMP cont runs it"
                    if opts.qmp
                    else "this process has no --qmp to send QMP cont to: restart it with --qmp"
                )
                self.on_message(
                    "incoming migration completed: the guest arrived paused, as it "
                    f"was on the source (e.g. a snapshot taken with migrate --stop); {how}"
                )
            # QEMU 7.2: a destination whose incoming migration failed exits with status 1
            # (migrate-incoming's exit-on-error, true by default).
            if side == "destination" and not ok and getattr(manager, "exit_on_error", True):
                err = manager.dest.error or "incoming migration failed"
                self.on_message(f"incoming migration failed: {err}")
                machine.error = err
                machine.exit_status = 1
                machine.shutdown("host-error")
                self.quit_event.set()

        manager.on_done(on_migration_done)
        # The machine is in inmigrate (and a deferred destination ready for migrate-incoming)
        # before QMP answers: a client that connects at once must not see prelaunch.
        if opts.incoming is not None:
            machine.set_runstate(RunState.INMIGRATE)
            if opts.incoming == "defer":
                manager.incoming_deferred = True
            if require_checksums(opts):
                manager.caps.set({"x-checksums": True})
        if server is not None:
            server.start()
        if opts.incoming is not None and opts.incoming != "defer":
            try:
                manager.incoming_start(opts.incoming)
            except BaseException:
                if server is not None:
                    server.close()  # removes its socket file: nothing listens there any more
                    self.server = None
                raise
