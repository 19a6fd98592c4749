"""``livemig run``: boot a guest on the emulated machine and run it until it ends or is stopped.

    livemig run --guest memstress --memory 1G --smp 2 --qmp unix:/tmp/a.sock [--append ARGS]
    livemig run --memory 1G --smp 2 --qmp unix:/tmp/b.sock --incoming tcp:0:4444 | defer
    livemig run --memory 1G --incoming file:snap.mig --cap mapped-ram   # restore a snapshot

The console goes to stdout (``--serial`` for another back-end). ``--qmp`` serves QEMU's
monitor protocol on ``unix:PATH`` or ``tcp:HOST:PORT``: the machine commands (stop, cont,
quit, query-status, ...) and, when the migration layer is installed, the migration commands.
``-S`` leaves the guest in ``prelaunch`` until ``cont``. ``--incoming`` starts in ``inmigrate``
and takes the guest (RAM, CPUs, devices) from a migration stream instead of ``--guest``.
``--cap`` and ``--set`` set migration capabilities and parameters at start, as QEMU's
``-global migration.x=y`` does: they are this process's defaults (what ``livemig migrate``
returns to for what it is not asked), and an incoming migration starts with them.

A checksummed stream (a livemig source with ``x-checksums``) is always checked. A ``file:`` or
``exec:`` restore, or any ``--incoming`` with ``--verify``, requires one (capability
``x-checksums`` on here); ``--no-checksums`` loads a stream without them.

The exit status is the guest's own (its ``exit()`` / the power port), 0 after ``quit``, 1 when
the guest faulted, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from livemig.errors import UsageError
from livemig.guests import builtin_guests
from livemig.machine import Machine, RunState
from livemig.machine.options import add_machine_arguments, machine_from_args
from livemig.units import format_size


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("run", help="run a guest on the emulated machine",
                            description="Boot a guest on the emulated machine (or receive one "
                            "by migration) and run it until it ends or is stopped.",
                            epilog=__doc__.split("\n\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument(
        "--guest", "-g", metavar="NAME|FILE.c",
        help=f"built-in guest ({', '.join(builtin_guests())}) or a freestanding C file",
    )  # fmt: skip
    parser.add_argument(
        "--append", "-a", metavar="ARGS", default="",
        help='boot arguments for the guest, checked for the built-in ones, e.g. memstress '
        '"ws=64M rate=20000" (rate in 4 KiB pages per second)',
    )  # fmt: skip
    parser.add_argument("--qmp", metavar="URI", help="QMP monitor: unix:PATH or tcp:HOST:PORT")
    parser.add_argument(
        "-S", "--paused", dest="prelaunch", action="store_true",
        help="do not start the guest (or, with --incoming, keep it paused after the "
        "migration) until QMP cont",
    )  # fmt: skip
    parser.add_argument(
        "--incoming", metavar="URI|defer",
        help="receive the guest by migration (defer: wait for migrate-incoming over QMP)",
    )  # fmt: skip
    parser.add_argument(
        "--qmp-insecure", action="store_true",
        help="allow --qmp tcp: on an address other than loopback without --tls-creds (anyone "
        "who reaches it controls this machine)",
    )  # fmt: skip
    parser.add_argument(
        "--verify", action="store_true",
        help="with --incoming: refuse a stream without livemig's checksums (the default "
        "for file: and exec:)",
    )  # fmt: skip
    parser.add_argument(
        "--no-checksums", action="store_true",
        help="with --incoming: load a stream without livemig's checksums, even from a file",
    )  # fmt: skip
    parser.add_argument(
        "--tls-creds", metavar="DIR",
        help="x509 credentials directory (ca-cert.pem, server-cert.pem, server-key.pem, "
        "client-cert.pem, client-key.pem, as QEMU's tls-creds-x509 dir=): sets the tls-creds "
        "migration parameter (so --incoming tcp: starts with TLS) and puts a --qmp tcp: "
        "monitor behind mutual TLS",
    )  # fmt: skip
    parser.add_argument(
        "--serve", metavar="URI",
        help="bridge client connections on tcp:HOST:PORT or unix:PATH to the guest's ring "
        "device (guest kvserver); the clients follow the guest when it migrates (a "
        "destination needs no --serve for that)",
    )  # fmt: skip
    parser.add_argument(
        "--cap", dest="caps", action="append", default=[], metavar="NAME[=on|off]",
        help="migration capability at start (QEMU: -global migration.NAME=on), e.g. mapped-ram "
        "to restore a mapped-ram snapshot, multifd to receive one",
    )  # fmt: skip
    parser.add_argument(
        "--set", dest="params", action="append", default=[], metavar="PARAM=VALUE",
        help="migration parameter at start, e.g. multifd-channels=4 downtime-limit=50",
    )  # fmt: skip
    add_machine_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.incoming is None and not args.guest:
        raise UsageError("give --guest NAME|FILE.c (or --incoming URI to receive a guest)")
    if args.incoming is not None and args.guest:
        raise UsageError("--guest and --incoming exclude each other: the guest comes by migration")
    if (args.verify or args.no_checksums) and args.incoming is None:
        raise UsageError("--verify and --no-checksums apply to --incoming")
    if args.verify and args.no_checksums:
        raise UsageError("--verify requires checksums: it excludes --no-checksums")
    if args.qmp:
        from livemig.qmp import parse_qmp_address

        try:
            parse_qmp_address(args.qmp)
        except ValueError as exc:
            raise UsageError(f"--qmp {args.qmp!r}: {exc}") from exc
        from livemig.qmp.server import check_exposure

        check_exposure(
            args.qmp, bool(getattr(args, "tls_creds", None)), getattr(args, "qmp_insecure", False)
        )
    image = None
    if args.guest:
        from livemig.guests import build_guest
        from livemig.guests.args import check_guest_args

        image = build_guest(args.guest)  # compile errors surface before any RAM is taken
        check_guest_args(args.guest, args.append)  # built-in guests only
    machine = machine_from_args(args)
    try:
        return _run(args, machine, image)
    finally:
        machine.close()


def _run(args: argparse.Namespace, machine: Machine, image: Any) -> int:
    quit_event = threading.Event()
    server, manager = _start_control(args, machine, quit_event)
    front = None
    try:
        if args.serve or args.incoming is not None:
            # the service front (livemig.service): clients reach the guest here, and follow
            # it when it migrates; a destination has one to take them over
            from livemig.service import start_service

            registry = server.registry if server is not None else None
            front = start_service(machine, args.serve, registry, manager)
            if args.serve:
                print(f"livemig run: serving on {front.address}", file=sys.stderr)
        ram = ", ".join(f"{b.idstr}={format_size(b.size)}" for b in machine.ram_blocks)
        if image is not None:
            machine.load_guest(image.data, args.append)
            what = f"guest {image.name}"
        else:
            what = f"incoming guest ({args.incoming})"
        where = f", QMP at {args.qmp}" if args.qmp else ""
        print(f"livemig run: {what}, {len(machine.vcpus)} vCPUs, {ram}{where}", file=sys.stderr)
        if image is not None and not args.prelaunch:
            machine.start()
        _wait(machine, quit_event)
    finally:
        if front is not None:
            front.close()
        if server is not None:
            server.close()
    if machine.runstate == RunState.INTERNAL_ERROR:
        print(f"livemig run: guest failed: {machine.error}", file=sys.stderr)
        return 1
    if machine.shutdown_reason == "host-signal":
        return 130
    return machine.exit_status if machine.exit_status is not None else 0


def _wait(machine: Machine, quit_event: threading.Event) -> None:
    """Until the guest ends, QMP ``quit`` arrives, or Ctrl-C / SIGTERM."""

    def on_signal(signum: int, _frame: object) -> None:
        machine.shutdown("host-signal")
        quit_event.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not quit_event.is_set() and not machine.wait_for_end(0.2):
            pass
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _require_checksums(args: argparse.Namespace) -> bool:
    """Whether this destination refuses a stream without checksums: with --verify, and by
    default for a snapshot (file:, exec:), which nothing else vouches for."""
    if getattr(args, "no_checksums", False):
        return False
    if getattr(args, "verify", False):
        return True
    return str(args.incoming).split(":", 1)[0] in ("file", "exec")


def _start_settings(args: argparse.Namespace, manager: Any) -> None:
    """``--cap`` / ``--set``: checked like QMP's (all or nothing), then this process's defaults."""
    from livemig.migration.options import parse_cap, parse_param

    caps = dict(parse_cap(c) for c in getattr(args, "caps", []))
    params = dict(parse_param(p) for p in getattr(args, "params", []))
    try:
        if caps:
            manager.caps.set(caps)
        if params:
            manager.params.set(params)
    except UsageError as exc:
        raise UsageError(f"--cap/--set: {exc}") from exc
    manager.mark_defaults()


def _say_colo_exit(manager: Any, data: dict[str, Any]) -> None:
    status = manager.query_colo_status()
    why = status.get("x-how") or status.get("x-error") or data.get("reason")
    if data.get("mode") == "secondary":
        what = ("the standby took over (the guest runs here now)" if status.get("x-took-over")
                else "the standby stood down (it does not run the guest)")  # fmt: skip
    else:
        what = "replication ended: the guest goes on here UNREPLICATED"
    print(f"livemig run: COLO: {what}: {why}", file=sys.stderr)


def _start_control(
    args: argparse.Namespace, machine: Machine, quit_event: threading.Event
) -> tuple[Any, Any]:
    """The QMP server (if ``--qmp``) and the migration manager."""
    server = control = None
    if args.qmp:
        from livemig.qmp import CommandRegistry, QMPServer
        from livemig.qmp.machine_commands import register_machine_commands

        registry = CommandRegistry()
        qmp_tls = None
        if getattr(args, "tls_creds", None) and args.qmp.startswith("tcp:"):
            from livemig.transport.tls import load_creds

            qmp_tls = load_creds(args.tls_creds, "server")
        server = QMPServer(args.qmp, registry, tls=qmp_tls,
                           insecure=getattr(args, "qmp_insecure", False))  # fmt: skip

        def on_quit() -> None:
            machine.shutdown("host-qmp-quit")
            quit_event.set()

        control = register_machine_commands(
            registry, machine, server, on_quit=on_quit, autostart=not args.prelaunch
        )
        from livemig.qmp.debug_commands import register_debug_commands

        register_debug_commands(registry, machine)
    from livemig.migration.manager import MigrationManager, register_migration_commands

    qmp_emit = server.emit_event if server is not None else None

    def emit(name: str, data: dict[str, Any] | None = None) -> None:
        if qmp_emit is not None:
            qmp_emit(name, data)
        if name == "COLO_EXIT":  # an operator must see a failover, QMP or not
            _say_colo_exit(manager, data or {})

    autostart = (lambda: control.autostart) if control else (lambda: not args.prelaunch)
    manager = MigrationManager(machine, emit=emit, autostart=autostart)
    if getattr(args, "tls_creds", None):
        from livemig.transport.tls import load_creds

        load_creds(args.tls_creds, "server")  # a bad directory is a usage error at start
        manager.params.set({"tls-creds": args.tls_creds})
    _start_settings(args, manager)
    if server is not None:
        register_migration_commands(server.registry, manager)

    def on_migration_done(side: str, ok: bool) -> None:
        # QEMU 7.2: a destination whose incoming migration failed exits with status 1
        # (migrate-incoming's exit-on-error, true by default).
        if side == "destination" and not ok and getattr(manager, "exit_on_error", True):
            err = manager.dest.error or "incoming migration failed"
            print(f"livemig run: incoming migration failed: {err}", file=sys.stderr)
            machine.error = err
            machine.exit_status = 1
            machine.shutdown("host-error")
            quit_event.set()

    manager.on_done(on_migration_done)
    # The machine is in inmigrate (and a deferred destination ready for migrate-incoming)
    # before QMP answers: a client that connects at once must not see prelaunch.
    if args.incoming is not None:
        machine.set_runstate(RunState.INMIGRATE)
        if args.incoming == "defer":
            manager.incoming_deferred = True
        if _require_checksums(args):
            manager.caps.set({"x-checksums": True})
    if server is not None:
        server.start()
    if args.incoming is not None and args.incoming != "defer":
        try:
            manager.incoming_start(args.incoming)
        except BaseException:
            if server is not None:
                server.close()  # removes its socket file: nothing listens there any more
            raise
    return server, manager
