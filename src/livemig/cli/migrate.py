"""``livemig migrate``: drive a live migration of a running process over QMP, with progress.

The migration itself is ``livemig.control.migrate``: every capability and parameter the source
manages is set first, to what the command line asks or else to the source's default, so
nothing leaks from an earlier run (``livemig.control.settings``); what changed is printed.
Then ``migrate``; progress is polled from ``query-migrate`` until a final state and drawn
here. Ctrl-C or SIGTERM cancels the migration (the guest keeps running on the source).
``--json`` prints the final ``query-migrate`` reply plus ``"verified"`` and ``"changed"``.

A livemig source (one whose capabilities list ``x-checksums``) sends a checksummed stream
unless ``--no-checksums``; a QEMU source is left as it is. ``--verify``: on a socket, both
sides hash RAM at switch-over and the destination's verdict comes back; to a ``file:`` the
file is read back when the migration is over and its checksums and RAM digests checked
(``livemig analyze --verify``); through ``exec:`` the loader checks them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from rich.console import Console

from livemig.cli import describe
from livemig.cli.argtypes import capability, seconds, setting
from livemig.control.migrate import (
    REPLICATE_DELAY_MS,
    Cancelled,
    MigrateOptions,
    MigrateResult,
    MigrationFailed,
    migrate,
)
from livemig.report.progress import FINAL, ProgressDisplay, postcopy_summary, summary_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("migrate", help="migrate a running guest live (over QMP)",
                       description=describe(__doc__))  # fmt: skip
    p.add_argument("uri", help="destination: tcp:HOST:PORT, unix:PATH, exec:CMD, file:PATH")
    p.add_argument("--qmp", required=True, help="QMP of the source: unix:PATH or tcp:HOST:PORT")
    p.add_argument(
        "--set",
        dest="params",
        action="append",
        type=setting,
        default=[],
        metavar="PARAM=VALUE",
        help="migration parameter, e.g. downtime-limit=50 max-bandwidth=1G",
    )
    p.add_argument(
        "--cap",
        dest="caps",
        action="append",
        type=capability,
        default=[],
        metavar="NAME[=on|off]",
        help="migration capability, e.g. auto-converge",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="hash every RAM block on both sides at switch-over and compare (a file: is read "
        "back and its checksums checked)",
    )
    p.add_argument(
        "--no-checksums",
        action="store_true",
        help="send a stream without livemig's checksums (capability x-checksums off)",
    )
    p.add_argument(
        "--no-return-path",
        action="store_true",
        help="do not ask the destination to confirm (return-path capability)",
    )
    p.add_argument(
        "--postcopy",
        action="store_true",
        help="enable post-copy (postcopy-ram); switch when told (QMP migrate-start-postcopy)",
    )
    p.add_argument(
        "--postcopy-after-precopy",
        action="store_true",
        help="enable post-copy and switch to it after the first full pre-copy pass",
    )
    p.add_argument(
        "--replicate", action="store_true",
        help="keep a standby copy (COLO, capability x-colo): after the first migration the guest "
        "stays here and every --checkpoint-delay ms its changes go to the destination, which "
        "takes over if this process or its host dies; returns once replication runs (see "
        "query-colo-status, x-colo-lost-heartbeat, and livemig front for clients)",
    )  # fmt: skip
    p.add_argument("--checkpoint-delay", type=int, default=None, metavar="MS",
                   help="with --replicate: milliseconds between checkpoints (x-checkpoint-delay; "
                   f"default {REPLICATE_DELAY_MS})")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the final result as JSON")
    p.add_argument("--report", metavar="STEM", default=None,
                   help="write a report: STEM.json (timeline, passes, downtime breakdown) and "
                   "STEM.png (plots; livemig report redraws them)")  # fmt: skip
    p.add_argument("--multifd", type=int, metavar="N", default=None,
                   help="capability multifd with N channels (the destination needs it too: "
                   "see --dest-qmp)")  # fmt: skip
    p.add_argument("--multifd-compression", choices=("none", "zlib", "zstd"), default=None,
                   help="compression of the multifd channels (with --multifd)")  # fmt: skip
    p.add_argument("--xbzrle", metavar="SIZE", default=None,
                   help="capability xbzrle with this xbzrle-cache-size (e.g. 64M)")  # fmt: skip
    p.add_argument("--dest-qmp", metavar="ADDR", default=None,
                   help="QMP of a destination started with --incoming defer: set there the "
                   "capabilities and parameters both sides need (multifd and its channels and "
                   "compression, postcopy-ram, postcopy-preempt, mapped-ram), then "
                   "migrate-incoming URI")  # fmt: skip
    p.add_argument(
        "--stop", action="store_true",
        help="stop the guest before migrating (QMP stop): a snapshot then holds exactly one "
        "pass; the guest is continued again if the migration does not complete",
    )  # fmt: skip
    p.add_argument(
        "--timeout", type=seconds(), default=None,
        help="cancel if not finished after this many seconds",
    )  # fmt: skip
    p.add_argument("--interval", type=seconds(), default=0.2, help="progress poll interval (s)")
    p.set_defaults(func=run)


@contextlib.contextmanager
def _ctrl_c_as_flag() -> Iterator[threading.Event]:
    """SIGINT and SIGTERM set the event instead of raising KeyboardInterrupt (or ending the
    process) wherever the main thread is: raised inside a QMP exchange (the client runs an
    asyncio loop) it can leave the connection in any state before the ``migrate_cancel`` that
    must follow. Once in CI an interrupted ``livemig migrate`` did not exit within 30 s, and
    ``timeout 60 livemig migrate`` (SIGTERM) used to exit and leave the migration running. A
    second signal raises as usual. Outside the main thread nothing changes."""
    flag = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if flag.is_set():
            raise KeyboardInterrupt  # a second one: do not wait for the cancel
        flag.set()

    old: dict[int, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, on_signal)
    except ValueError:  # not the main thread
        yield flag
        return
    try:
        yield flag
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def options_from_args(args: argparse.Namespace) -> MigrateOptions:
    """The flags as ``livemig.control.migrate``'s options."""
    return MigrateOptions(
        caps=dict(args.caps), params=dict(args.params), verify=args.verify,
        checksums=not args.no_checksums, return_path=not args.no_return_path,
        postcopy=args.postcopy, postcopy_after_precopy=args.postcopy_after_precopy,
        replicate=args.replicate, checkpoint_delay=args.checkpoint_delay,
        multifd=args.multifd, multifd_compression=args.multifd_compression,
        xbzrle=args.xbzrle, dest_qmp=args.dest_qmp, stop=args.stop, timeout=args.timeout,
        interval=args.interval, report=args.report,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    until = ("completed", "failed", "cancelled", "colo") if args.replicate else FINAL
    display = ProgressDisplay(console, quiet=args.json, until=until)

    def changed(side: str, lines: list[str]) -> None:
        if lines and not args.json:
            console.print(f"settings changed on the {side}: {'; '.join(lines)}",
                          highlight=False, soft_wrap=True)  # fmt: skip

    def cancelling(why: str) -> None:
        display.stop()
        console.print(f"[yellow]{why}: cancelling the migration[/]")

    with display, _ctrl_c_as_flag() as interrupted:
        try:
            result = migrate(
                args.qmp, args.uri, options_from_args(args), on_changed=changed,
                on_progress=display, on_cancel=cancelling, cancel=interrupted,
                on_warning=lambda text: console.print(f"[yellow]warning: {text}[/]",
                                                      soft_wrap=True),
            )  # fmt: skip
        except MigrationFailed as exc:
            result = exc.result
        except Cancelled:
            raise KeyboardInterrupt from None
    if args.json:
        _print_json(result)
    else:
        _print_summary(args, result)
    return 0 if result.ok else 1


def _print_json(result: MigrateResult) -> None:
    out = dict(result.info)
    out["changed"] = result.changed
    if result.colo is not None:
        out["colo"] = result.colo
    if result.verified_how is not None:
        out["verified"] = result.verified
        out["verified-how"] = result.verified_how
    if result.destination is not None:
        out["destination"] = result.destination
    if result.report_paths is not None:
        out["report"] = [str(p) for p in result.report_paths]
    json.dump(out, sys.stdout, indent=2, sort_keys=True)
    print()


def _print_summary(args: argparse.Namespace, result: MigrateResult) -> None:
    info, dest_info = result.info, result.destination
    extra: dict[str, Any] = {}
    if result.verified_how is not None:
        extra["verified"] = result.verified_how
    if info.get("x-dirty-tracker"):  # none when it failed before tracking began
        extra["dirty tracker"] = info["x-dirty-tracker"]
    pc = postcopy_summary(dest_info) if dest_info else None
    if pc is not None:
        extra["post-copy page requests"] = pc
    if args.postcopy_after_precopy and result.status == "completed" and \
            not result.postcopy_started:  # fmt: skip
        extra["post-copy"] = "not used: pre-copy converged first"
    need = result.destination_needs()
    if result.status == "failed" and need and args.dest_qmp is None:
        # the destination's reason is in its own log; the likeliest one is worth saying
        extra["hint"] = (f"the destination needs {', '.join(need)} too: set it there "
                         "before migrate-incoming, or pass --dest-qmp")  # fmt: skip
    if result.colo is not None:
        colo = result.colo
        delay = result.parameters.get("x-checkpoint-delay")
        extra["replication"] = (
            f"running: a checkpoint every {delay} ms to {args.uri}"
            + (f"; after a failover the standby serves at {colo['x-standby']}"
               if colo.get("x-standby") else "")
            + " (query-colo-status; x-colo-lost-heartbeat or migrate_cancel ends it)"
        )  # fmt: skip
    Console().print(summary_table(info, extra or None, dest_info))
    if result.report_paths is not None:
        print(f"report: {result.report_paths[0]}\nplots:  {result.report_paths[1]}")
