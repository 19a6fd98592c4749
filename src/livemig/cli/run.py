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

# What runs is livemig.system.System; this module parses the flags and prints (the docstring
# above is run's --help epilog).

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

from livemig.guests import builtin_guests
from livemig.machine.options import add_machine_arguments
from livemig.system import System, SystemOptions


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


def options_from_args(args: argparse.Namespace) -> SystemOptions:
    """The flags as ``livemig.system``'s options (``--cap`` / ``--set`` parsed here)."""
    from livemig.migration.options import parse_cap, parse_param

    return SystemOptions(
        guest=args.guest, append=args.append, qmp=args.qmp, prelaunch=args.prelaunch,
        incoming=args.incoming, qmp_insecure=args.qmp_insecure, verify=args.verify,
        checksums=not args.no_checksums, tls_creds=args.tls_creds, serve=args.serve,
        caps=dict(parse_cap(c) for c in args.caps),
        params=dict(parse_param(p) for p in args.params),
        memory=args.memory, ram_blocks=list(args.ram_block), smp=args.smp,
        prefault=args.prefault, serial=args.serial,
    )  # fmt: skip


_SAY_LOCK = threading.Lock()


def _say(text: str) -> None:
    # messages come from several threads (start-up, the incoming migration's end); print()
    # writes the text and the newline apart, which ran two messages into one line
    with _SAY_LOCK:
        sys.stderr.write(f"livemig run: {text}\n")
        sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    system = System(options_from_args(args), on_message=_say)
    try:
        system.start()
        with _signals_shut_down(system):
            status = system.wait()
    finally:
        system.close()
    return 0 if status is None else status


@contextlib.contextmanager
def _signals_shut_down(system: System) -> Iterator[None]:
    """Ctrl-C and SIGTERM end the guest (shutdown cause host-signal: exit status 130)."""

    def on_signal(signum: int, _frame: object) -> None:
        system.shutdown("host-signal")

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
