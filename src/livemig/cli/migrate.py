"""``livemig migrate``: drive a live migration of a running process over QMP, with progress.

The source is any QMP server speaking QEMU's migration commands (a ``livemig run`` process or a
QEMU). Every capability and parameter it manages is set first, to what the command line asks or
else to the source's default, so nothing leaks from an earlier run (``livemig.cli.settings``);
what changed is printed. Then ``migrate``; progress is polled from ``query-migrate`` until a
final state. Ctrl-C or SIGTERM cancels the migration (the guest keeps running on the source).
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
from pathlib import Path
from typing import Any

from rich.console import Console

from livemig.cli import describe
from livemig.errors import LivemigError, UsageError
from livemig.migration.options import parse_cap, parse_param
from livemig.report import timeline
from livemig.report.progress import (
    FINAL,
    follow,
    postcopy_summary,
    summary_table,
    with_last_progress,
)
from livemig.transport import parse_uri
from livemig.units import format_size


def _param(text: str) -> tuple[str, Any]:
    try:
        return parse_param(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cap(text: str) -> tuple[str, bool]:
    try:
        return parse_cap(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("migrate", help="migrate a running guest live (over QMP)",
                       description=describe(__doc__))  # fmt: skip
    p.add_argument("uri", help="destination: tcp:HOST:PORT, unix:PATH, exec:CMD, file:PATH")
    p.add_argument("--qmp", required=True, help="QMP of the source: unix:PATH or tcp:HOST:PORT")
    p.add_argument(
        "--set",
        dest="params",
        action="append",
        type=_param,
        default=[],
        metavar="PARAM=VALUE",
        help="migration parameter, e.g. downtime-limit=50 max-bandwidth=1G",
    )
    p.add_argument(
        "--cap",
        dest="caps",
        action="append",
        type=_cap,
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
        "--timeout", type=float, default=None, help="cancel if not finished after this many seconds"
    )
    p.add_argument("--interval", type=float, default=0.2, help="progress poll interval (s)")
    p.set_defaults(func=run)


REPLICATE_DELAY_MS = 50  # QEMU's x-checkpoint-delay default (20 s) suits COLO's compare mode


def _replicate_options(args: argparse.Namespace, caps: dict[str, bool], uri: Any) -> None:
    """--replicate: x-colo (and the return path it needs) and the checkpoint interval."""
    if args.checkpoint_delay is not None and not args.replicate:
        raise UsageError("--checkpoint-delay goes with --replicate")
    if not args.replicate:
        return
    if not uri.has_return_path or args.no_return_path:
        raise UsageError("--replicate needs a return path (a tcp:, unix: or fd: URI): the "
                         "standby acknowledges every checkpoint")  # fmt: skip
    clash = [n for n in ("postcopy", "postcopy_after_precopy", "multifd", "xbzrle")
             if getattr(args, n)]  # fmt: skip
    if clash:
        raise UsageError(f"--replicate does not go with --{clash[0].replace('_', '-')}: "
                         "checkpoints are pre-copy streams on one channel")  # fmt: skip
    caps["x-colo"] = True
    if not any(k == "x-checkpoint-delay" for k, _v in args.params):
        delay = REPLICATE_DELAY_MS if args.checkpoint_delay is None else args.checkpoint_delay
        args.params.append(("x-checkpoint-delay", delay))
    elif args.checkpoint_delay is not None:
        raise UsageError("give the interval once: --checkpoint-delay or --set x-checkpoint-delay")


# What a destination must have set too, as in QEMU: the stream alone does not turn these on
# (a post-copy or multifd stream into a destination without them fails at its first packet).
DEST_CAPS = ("multifd", "postcopy-ram", "postcopy-preempt", "mapped-ram")
DEST_PARAMS = ("multifd-channels", "multifd-compression", "multifd-zlib-level",
               "multifd-zstd-level")  # fmt: skip


def _dest_caps(caps: dict[str, bool]) -> dict[str, bool]:
    return {k: v for k, v in caps.items() if k in DEST_CAPS and v}


def _multifd_options(args: argparse.Namespace, caps: dict[str, bool]) -> None:
    """--multifd/--compress/--xbzrle as capabilities and parameters."""
    from livemig.units import parse_size

    if args.multifd_compression is not None and args.multifd is None:
        raise UsageError("--multifd-compression needs --multifd N")
    if args.multifd is not None:
        if args.multifd < 1 or args.multifd > 255:
            raise UsageError("--multifd: 1 to 255 channels")
        if args.xbzrle is not None:
            raise UsageError("--xbzrle and --multifd exclude each other (QEMU: xbzrle is not "
                             "compatible with multifd)")  # fmt: skip
        caps["multifd"] = True
        args.params.append(("multifd-channels", args.multifd))
        args.params.append(("multifd-compression", args.multifd_compression or "none"))
    if args.xbzrle is not None:
        caps["xbzrle"] = True
        args.params.append(("xbzrle-cache-size", parse_size(args.xbzrle, "--xbzrle")))


GROWTH_FACTOR = 3  # a snapshot past this many times the guest's RAM is not converging


class _GrowthWatch:
    """A ``file:`` or ``exec:`` snapshot keeps every pass: a guest that dirties memory as fast
    as it is saved makes it grow without end (20 GB of a 1 GiB guest was seen). Past a few
    passes' worth of RAM, say so once, with the ways out."""

    def __init__(self, uri: Any, caps: dict[str, bool], console: Console) -> None:
        self.on = uri.scheme in ("file", "exec") and not caps.get("mapped-ram")
        self.console = console
        self.warned = False

    def __call__(self, info: dict[str, Any]) -> None:
        ram = info.get("ram", {})
        total, sent = ram.get("total", 0), ram.get("transferred", 0)
        if not self.on or self.warned or info.get("status") != "active" or not total:
            return
        if sent > GROWTH_FACTOR * total:
            self.warned = True
            self.console.print(
                f"[yellow]warning: the snapshot has grown to {format_size(sent)}, "
                f"{sent / total:.1f} times the guest's RAM, and is not done: the guest dirties "
                "memory as fast as it is saved, and the file keeps every pass. Ctrl-C cancels "
                "it. To make it converge: --stop (the guest stops first: one pass), --cap "
                "mapped-ram (a fixed-size file: pages are overwritten in place), or a slower "
                "guest (--cap auto-converge)[/]", soft_wrap=True)  # fmt: skip


class _Interrupted(Exception):
    """Ctrl-C or SIGTERM, seen between two QMP exchanges."""


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


def _setup_destination(args: argparse.Namespace, caps: dict[str, bool]) -> list[str]:
    """--dest-qmp: the capabilities and parameters both sides need (the rest of them back to
    the destination's defaults), then migrate-incoming; returns what changed there."""
    from livemig.cli.settings import apply_settings
    from livemig.qmp.client import QMPConnection

    dcaps = _dest_caps(caps)
    if caps.get("x-checksums"):
        dcaps["x-checksums"] = True  # not needed there, but then it refuses a stream without
    if dcaps.get("postcopy-ram"):
        dcaps["postcopy-blocktime"] = True  # the destination's post-copy figures
    params = {k: v for k, v in args.params if k in DEST_PARAMS}
    with QMPConnection(args.dest_qmp).connect() as dq:
        if "x-checksums" in dcaps and "x-checksums" not in _capability_names(dq):
            del dcaps["x-checksums"]  # a QEMU destination: it would not know the name
        changed = apply_settings(dq, dcaps, params,
                                 only_caps=(*DEST_CAPS, "postcopy-blocktime", "x-checksums"),
                                 only_params=DEST_PARAMS)  # fmt: skip
        dq.command("migrate-incoming", uri=args.uri)
    return changed


def _capability_names(qmp: Any) -> set[str]:
    return {c["capability"] for c in qmp.command("query-migrate-capabilities")}


def _checksum_capability(args: argparse.Namespace, caps: dict[str, bool], qmp: Any,
                         uri: Any) -> None:  # fmt: skip
    """x-checksums on by default for a livemig source; --verify to a file or a pipe needs it."""
    livemig = "x-checksums" in _capability_names(qmp)
    if livemig:
        # set either way: capabilities outlive a migration in the source process
        caps.setdefault("x-checksums", not args.no_checksums)
        caps.setdefault("x-verify", bool(args.verify))
    if args.verify and not uri.has_return_path and not caps.get("x-checksums"):
        why = "--no-checksums" if livemig else "a source without x-checksums (QEMU)"
        raise UsageError(f"--verify to {uri} is the check of the stream's checksums when it "
                         f"is loaded: not possible with {why}")  # fmt: skip


def _verify_file(path: str, offset: int = 0) -> tuple[bool, str]:
    """Read back a file the migration wrote: its checksums and RAM digests (analyze)."""
    from livemig.errors import MigrationError, StreamError
    from livemig.streams import verify_file

    try:
        result = verify_file(path, offset)
    except (MigrationError, StreamError) as exc:
        return False, f"NO: {exc}"
    assert result.verifier is not None
    rep = result.verifier.report
    text = f"yes, {rep['checksum-units']} checksums of the file match"
    if "ram-digests" in rep:
        text += ", RAM digests equal the source's"
    return True, text


def _destination_result(addr: str) -> dict[str, Any] | None:
    """The destination's query-migrate once it has finished (post-copy ends there a moment
    after the source); None when it cannot be asked (it may have exited on failure)."""
    from livemig.qmp.client import QMPConnection

    try:
        with QMPConnection(addr).connect() as dq:
            return follow(lambda: dq.command("query-migrate"), quiet=True, timeout=10)
    except (OSError, LivemigError):
        return None


def _say_changed(console: Console, side: str, changed: list[str], quiet: bool) -> None:
    if changed and not quiet:
        console.print(f"settings changed on the {side}: {'; '.join(changed)}",
                      highlight=False, soft_wrap=True)  # fmt: skip


def run(args: argparse.Namespace) -> int:

    from livemig.qmp.client import QMPConnection

    uri = parse_uri(args.uri)
    console = Console(stderr=True)
    caps = dict(args.caps)
    if uri.has_return_path and not args.no_return_path:
        caps.setdefault("return-path", True)
    if args.verify:
        caps["x-verify"] = True
        if uri.has_return_path and args.no_return_path:
            raise UsageError("--verify on a socket needs the return path (the destination's "
                             "verdict comes back on it): drop --no-return-path")  # fmt: skip
    if args.postcopy or args.postcopy_after_precopy:
        caps["postcopy-ram"] = True
    _replicate_options(args, caps, uri)
    _multifd_options(args, caps)
    from livemig.cli.settings import apply_settings

    with QMPConnection(args.qmp).connect() as qmp:
        _checksum_capability(args, caps, qmp, uri)
    dest_changed = _setup_destination(args, caps) if args.dest_qmp is not None else []
    with _ctrl_c_as_flag() as interrupted, QMPConnection(args.qmp).connect() as qmp:
        changed = apply_settings(qmp, caps, dict(args.params))
        _say_changed(console, "source", changed, args.json)
        _say_changed(console, "destination", dest_changed, args.json)
        stopped = args.stop and qmp.command("query-status").get("status") == "running"
        if stopped:
            qmp.command("stop")
        try:
            qmp.command("migrate", uri=args.uri)
        except LivemigError:
            if stopped:
                qmp.command("cont")
            raise
        switched = False
        growth = _GrowthWatch(uri, caps, console)
        last: dict[str, Any] = {}
        sampler = timeline.Sampler()

        def query() -> dict[str, Any]:
            nonlocal switched
            if interrupted.is_set():
                raise _Interrupted
            info = qmp.command("query-migrate")
            # After the first full pass (QEMU's tests wait for dirty-sync-count 2 likewise).
            if args.postcopy_after_precopy and not switched and info.get("status") == "active" \
                    and info.get("ram", {}).get("dirty-sync-count", 0) >= 2:  # fmt: skip
                qmp.command("migrate-start-postcopy")
                switched = True
            growth(info)
            sampler(info)
            if "ram" in info:
                last.update(info)
            return info

        until = ("completed", "failed", "cancelled", "colo") if args.replicate else FINAL
        try:
            info = follow(query, interval=args.interval, timeout=args.timeout, console=console,
                          quiet=args.json, until=until)  # fmt: skip
            if info.get("status") not in until:
                console.print("[yellow]time-out: cancelling the migration[/]")
                qmp.command("migrate_cancel")
                info = follow(lambda: qmp.command("query-migrate"), quiet=True, timeout=30)
        except (_Interrupted, KeyboardInterrupt):
            console.print("[yellow]interrupted: cancelling the migration[/]")
            qmp.command("migrate_cancel")
            info = follow(lambda: qmp.command("query-migrate"), quiet=True, timeout=30)
        if stopped and info.get("status") != "completed":
            qmp.command("cont")  # as it was before --stop
        colo = None
        if args.replicate and info.get("status") == "colo":
            colo = qmp.command("query-colo-status")
        source_report = None
        if args.report:
            with contextlib.suppress(LivemigError):  # QEMU has no such command
                source_report = qmp.command("x-query-migration-report")
    info = with_last_progress(info, last or None)
    verified = bool(info.get("x-verified")) if args.verify else None
    verified_text = "yes, RAM identical" if verified else "NO"
    if args.verify and not uri.has_return_path and info.get("status") == "completed":
        if uri.scheme == "file":
            verified, verified_text = _verify_file(uri.path, uri.offset or 0)
        else:
            verified, verified_text = None, "when loaded: the stream carries checksums"
    dest_info = _destination_result(args.dest_qmp) if args.dest_qmp is not None else None
    paths = None
    if args.report:
        rep = timeline.build(
            config={"uri": args.uri, "capabilities": caps, "parameters": dict(args.params)},
            source_final=info, source_report=source_report, destination_final=dest_info,
            samples=sampler.samples, sample_t0=sampler.t0,
            verification={"ram-hashes-equal": verified} if args.verify else None,
        )  # fmt: skip
        paths = timeline.save(rep, Path(args.report))
    if args.json:
        out = dict(info)
        out["changed"] = {"source": changed, "destination": dest_changed}
        if colo is not None:
            out["colo"] = colo
        if args.verify:
            out["verified"] = verified
            out["verified-how"] = verified_text
        if dest_info is not None:
            out["destination"] = dest_info
        if paths is not None:
            out["report"] = [str(p) for p in paths]
        json.dump(out, sys.stdout, indent=2, sort_keys=True)
        print()
    else:
        extra: dict[str, Any] = {}
        if args.verify:
            extra["verified"] = verified_text
        if info.get("x-dirty-tracker"):  # none when it failed before tracking began
            extra["dirty tracker"] = info["x-dirty-tracker"]
        pc = postcopy_summary(dest_info) if dest_info else None
        if pc is not None:
            extra["post-copy page requests"] = pc
        if args.postcopy_after_precopy and info.get("status") == "completed" and not switched:
            extra["post-copy"] = "not used: pre-copy converged first"
        need = _dest_caps(caps)
        if info.get("status") == "failed" and need and args.dest_qmp is None:
            # the destination's reason is in its own log; the likeliest one is worth saying
            extra["hint"] = (f"the destination needs {', '.join(need)} too: set it there "
                             "before migrate-incoming, or pass --dest-qmp")  # fmt: skip
        if colo is not None:
            delay = dict(args.params).get("x-checkpoint-delay")
            extra["replication"] = (
                f"running: a checkpoint every {delay} ms to {args.uri}"
                + (f"; after a failover the standby serves at {colo['x-standby']}"
                   if colo.get("x-standby") else "")
                + " (query-colo-status; x-colo-lost-heartbeat or migrate_cancel ends it)"
            )  # fmt: skip
        Console().print(summary_table(info, extra or None, dest_info))
        if paths is not None:
            print(f"report: {paths[0]}\nplots:  {paths[1]}")
    ok = ("completed", "colo") if args.replicate else ("completed",)
    return 0 if info.get("status") in ok else 1
