"""``livemig front``: the address a replicated guest's clients use, in a process of its own.

    livemig front --serve tcp:127.0.0.1:7000 --backend tcp:127.0.0.1:7001 [--qmp unix:PATH]

Clients connect to ``--serve``; the front carries their bytes to ``--backend``, the ``--serve``
address of the ``livemig run`` process that runs the guest. While that guest is replicated
(``livemig migrate --replicate``), the backend names its standby, and if the backend dies the
front moves every client connection to the standby once it has taken over: no connection is
closed, no request lost or answered twice (``docs/replication.md``). Without a standby to go
to, clients are told (one ``-ERR livemig:`` line) and closed after ``--failover-timeout``.
``--qmp`` answers ``x-query-front`` (backend, standby, clients, failovers) and ``quit``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from livemig.cli import describe
from livemig.cli.argtypes import seconds
from livemig.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("front", help="keep a replicated guest's clients across a failover",
                       description=describe(__doc__),
                       epilog=__doc__.split("\n\n", 2)[2],
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--serve", required=True, metavar="URI",
                   help="where clients connect: tcp:HOST:PORT or unix:PATH")  # fmt: skip
    p.add_argument("--backend", required=True, metavar="URI",
                   help="the --serve address of the livemig run process with the guest")  # fmt: skip
    p.add_argument("--qmp", metavar="URI", help="QMP monitor: unix:PATH or tcp:HOST:PORT")
    p.add_argument("--heartbeat-timeout", type=int, default=1000, metavar="MS",
                   help="a backend silent this long is given up (default 1000 ms)")  # fmt: skip
    p.add_argument("--failover-timeout", type=seconds(), default=30.0, metavar="S",
                   help="how long clients wait for a backend that serves the guest again "
                   "before they are told it is gone (default 30 s)")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from livemig.service.relay import Relay

    if args.heartbeat_timeout < 50:
        raise UsageError("--heartbeat-timeout: at least 50 ms")
    if args.failover_timeout <= 0:
        raise UsageError("--failover-timeout: a positive number of seconds")
    relay = Relay(args.serve, args.backend, heartbeat_timeout=args.heartbeat_timeout / 1000,
                  failover_timeout=args.failover_timeout)  # fmt: skip
    quit_event = threading.Event()
    server = None
    relay.start()
    try:
        if args.qmp:
            from livemig.qmp import CommandRegistry, QMPServer, parse_qmp_address

            try:
                parse_qmp_address(args.qmp)
            except ValueError as exc:
                raise UsageError(f"--qmp {args.qmp!r}: {exc}") from exc
            registry = CommandRegistry()
            registry.add("x-query-front", relay.info)
            registry.add("quit", quit_event.set)
            server = QMPServer(args.qmp, registry)
            server.start()
        print(f"livemig front: serving on {relay.address}, backend {args.backend}",
              file=sys.stderr)  # fmt: skip

        def on_signal(signum: int, _frame: object) -> None:
            quit_event.set()

        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, on_signal)
        while not quit_event.wait(0.5):
            pass
    finally:
        if server is not None:
            server.close()
        relay.close()
    return 0
