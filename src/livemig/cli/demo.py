"""``livemig demo``: a guest migrated live between two local livemig processes.

What it does, step by step, printing each: build the memstress guest; start a source process
running it and a destination process waiting with ``--incoming``; show the guest's console; migrate
it live over loopback TCP (or, with ``--two-hosts``, between two network namespaces joined by
a bandwidth-limited veth pair) with a progress display; then show the guest still running on
the destination, check its memory invariant, and print a summary (times, downtime, throughput,
passes, pages, verification) and the paths of the report (JSON and PNG).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from livemig.cli import describe
from livemig.errors import LivemigError, UsageError
from livemig.units import PAGE_SIZE, parse_size


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="migrate a running guest live between two local processes",
                       description=describe(__doc__))  # fmt: skip
    p.add_argument("--memory", default="256M", help="guest RAM (default 256M)")
    p.add_argument("--smp", type=int, default=2, help="vCPUs (default 2)")
    p.add_argument("--working-set", default="64M", help="memory the guest keeps dirtying")
    p.add_argument(
        "--dirty-rate",
        default=None,
        help="bytes per second the guest dirties, e.g. 50M (0 = as fast as it can; default "
        "20M, or 0 with --postcopy-after-precopy: a guest pre-copy cannot catch, so the switch "
        "happens)",
    )
    p.add_argument("--guest", default="memstress", help="guest program (default memstress)")
    p.add_argument("--set", dest="params", action="append", type=_param, default=[],
                   metavar="PARAM=VALUE", help="migration parameter, as for livemig migrate, "
                   "e.g. downtime-limit=50 max-bandwidth=1G (0 = unlimited)")  # fmt: skip
    p.add_argument("--cap", dest="caps", action="append", type=_cap, default=[],
                   metavar="NAME[=on|off]", help="migration capability, as for livemig migrate "
                   "(postcopy-preempt=off: without the preempt channel)")  # fmt: skip
    p.add_argument("--postcopy-after-precopy", dest="postcopy", action="store_true",
                   help="switch to post-copy after the first full pass, with postcopy-preempt "
                        "(requested pages on their own channel, not behind the background "
                        "stream: p99 ~1 ms instead of tens)")  # fmt: skip
    p.add_argument("--multifd", type=int, metavar="N", default=None,
                   help="send pages on N multifd channels")  # fmt: skip
    p.add_argument(
        "--two-hosts",
        action="store_true",
        help="source and destination in two network namespaces over a veth pair",
    )
    p.add_argument("--link-rate", default="1gbit", help="tc tbf rate with --two-hosts")
    p.add_argument("--out", default="livemig-report", help="report path stem (.json, .png)")
    p.add_argument("--watch", type=float, default=1.5, help="seconds of console before/after")
    p.set_defaults(func=run)


def _param(text: str) -> tuple[str, Any]:
    from livemig.cli.migrate import _param as parse

    return parse(text)


def _cap(text: str) -> tuple[str, bool]:
    from livemig.cli.migrate import _cap as parse

    return parse(text)


def _pages_per_second(rate: str) -> int:
    return parse_size(rate, "--dirty-rate") // PAGE_SIZE


def run(args: argparse.Namespace) -> int:
    from livemig.guests import build_guest

    console = Console()
    if args.dirty_rate is None:
        # A 20 MB/s guest converges in pre-copy within a pass or two, before a post-copy
        # switch could come: the post-copy demo needs a guest that outruns the link.
        args.dirty_rate = "0" if args.postcopy else "20M"
    memory = parse_size(args.memory, "--memory")
    ws = parse_size(args.working_set, "--working-set")
    if ws > memory // 2:
        raise UsageError(f"--working-set {args.working_set} must be at most half of --memory")
    if args.smp < 1:
        raise UsageError("--smp must be at least 1")
    if args.multifd is not None and not 1 <= args.multifd <= 255:
        raise UsageError("--multifd takes 1 to 255 channels")
    console.rule("[bold]livemig demo")
    console.print(f"building the {args.guest} guest ...")
    build_guest(args.guest)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="livemig-demo-")))
        return _demo(args, console, stack, workdir, ws)


def _demo(args: argparse.Namespace, console: Console, stack: contextlib.ExitStack,
          workdir: Path, ws: int) -> int:  # fmt: skip
    from livemig import procs
    from livemig.report import progress, timeline

    pre_src = pre_dst = None
    host = "127.0.0.1"
    if args.two_hosts:
        from livemig.netns import TwoHosts

        hosts = stack.enter_context(TwoHosts(rate=args.link_rate))
        pre_src, pre_dst, host = hosts.prefix_a(), hosts.prefix_b(), hosts.addr_b
        console.print(f"two hosts: namespaces {hosts.ns_a} ({hosts.addr_a}) and {hosts.ns_b} "
                      f"({hosts.addr_b}), veth with tc tbf {args.link_rate}")  # fmt: skip
    port = procs.free_port() if not args.two_hosts else 4444
    uri = f"tcp:{host}:{port}"
    rate = _pages_per_second(args.dirty_rate)
    append = f"ws={ws} rate={rate} mark_ms=500"
    src = stack.enter_context(
        procs.source(
            workdir,
            guest=args.guest,
            memory=args.memory,
            smp=args.smp,
            append=append,
            prefix=pre_src,
        )
    )
    listen = f"tcp:{'0.0.0.0' if args.two_hosts else host}:{port}"
    # The destination waits with -incoming defer: capabilities that both sides need
    # (multifd, postcopy-ram) must be set there before it starts listening, as with QEMU.
    dst = stack.enter_context(
        procs.destination(
            workdir, memory=args.memory, smp=args.smp, incoming="defer", prefix=pre_dst
        )
    )
    src.wait_ready()
    dst.wait_ready()
    both = _shared_capabilities(args)
    if both:
        dst.qmp("migrate-set-capabilities",
                capabilities=[{"capability": c, "state": True} for c in both])  # fmt: skip
    if args.multifd:
        dst.qmp("migrate-set-parameters", **{"multifd-channels": args.multifd})
    dst.qmp("migrate-incoming", uri=listen)
    speed = ("as fast as it can" if parse_size(args.dirty_rate, "--dirty-rate") == 0
             else f"at {args.dirty_rate}B/s")  # fmt: skip
    console.print(f"source      pid {src.pid}: {args.guest}, {args.memory}, {args.smp} vCPUs, "
                  f"dirtying {args.working_set} {speed}")  # fmt: skip
    console.print(f"destination pid {dst.pid}: waiting on {listen}")
    _show_console(console, src, "source", args.watch, from_start=True)

    caps = {**{c: True for c in ("events", "return-path", "x-verify", *both)}, **dict(args.caps)}
    src.qmp("migrate-set-capabilities",
            capabilities=[{"capability": c, "state": v} for c, v in caps.items()])  # fmt: skip
    params: dict[str, Any] = dict(args.params)
    if args.multifd:
        params["multifd-channels"] = args.multifd
    if params:
        src.qmp("migrate-set-parameters", **params)
    prediction = _plan(console, src, args)
    console.rule(f"migrating to {uri}")
    sampler = timeline.Sampler()
    src.qmp("migrate", uri=uri)
    switch = _PostcopySwitch(src) if args.postcopy else None

    def poll(info: dict[str, Any]) -> None:
        sampler(info)
        if switch is not None:
            switch(info)

    final = progress.follow(lambda: src.qmp("query-migrate"), console=console,
                            on_poll=poll, timeout=600)  # fmt: skip
    if final.get("status") != "completed":
        with contextlib.suppress(LivemigError):
            src.qmp("migrate_cancel")
        final = progress.follow(lambda: src.qmp("query-migrate"), quiet=True, timeout=30)
    dest_final: dict[str, Any] = {}
    with contextlib.suppress(LivemigError):
        dest_final = dst.qmp("query-migrate")
    ok = final.get("status") == "completed"
    invariant = None
    if ok:
        console.print(f"source now: {src.qmp('query-status')['status']}; "
                      f"destination now: {dst.qmp('query-status')['status']}")  # fmt: skip
        _show_console(console, dst, "destination", args.watch)
        invariant = _check(dst)
    report = timeline.build(
        config={"guest": args.guest, "memory": args.memory, "smp": args.smp,
                "working-set": args.working_set, "dirty-rate": args.dirty_rate, "uri": uri,
                "two-hosts": args.two_hosts, "parameters": params,
                "postcopy": args.postcopy, "multifd": args.multifd},
        source_final=final, source_report=_safe(src, "x-query-migration-report"),
        destination_final=dest_final, samples=sampler.samples, sample_t0=sampler.t0,
        destination_report=_safe(dst, "x-query-migration-report"),
        prediction=None if prediction is None else prediction.as_dict(),
        verification={"ram-hashes-equal": final.get("x-verified"), "invariant": invariant},
    )  # fmt: skip
    jpath, ppath = timeline.save(report, Path(args.out))
    extra = {
        "verification (RAM hashes)": "identical" if final.get("x-verified") else "NOT checked",
        "guest invariant": "holds" if invariant and invariant.get("ok") else str(invariant),
        "dirty tracker": final.get("x-dirty-tracker", "?"),
    }
    pc = progress.postcopy_summary(dest_final)
    if pc is not None:
        extra["post-copy page requests"] = pc
    elif args.postcopy and ok and "postcopy" not in report.get("phases", {}):
        extra["post-copy"] = "not used: pre-copy converged before the switch"
    if prediction is not None and prediction.total_time_s is not None:
        extra["planner's advice"] = _advice(prediction, "post-copy" if args.postcopy
                                            else "pre-copy")  # fmt: skip
    console.print(progress.summary_table(final, extra, dest_final))
    console.print(f"report: {jpath}\nplots:  {ppath}")
    return 0 if ok and (invariant is None or invariant.get("ok")) else 1


def _advice(prediction: Any, used: str) -> str:
    """The planner's strategy and its forecast, and whether this run followed it (the demo
    does not switch strategy by itself: it runs pre-copy, or post-copy when asked)."""
    text = (f"{prediction.recommendation}: {prediction.passes} passes, "
            f"{prediction.total_time_s * 1000:.0f} ms total, "
            f"{(prediction.downtime_s or 0) * 1000:.0f} ms downtime predicted")  # fmt: skip
    if prediction.recommendation != used:
        text += f" (this run used {used})"
    return text


def _shared_capabilities(args: argparse.Namespace) -> list[str]:
    """Capabilities both sides must have on."""
    preempt = dict(args.caps).get("postcopy-preempt", True)
    return [c for c, on in (("postcopy-ram", args.postcopy),
                            ("postcopy-preempt", args.postcopy and preempt),
                            ("multifd", bool(args.multifd)),
                            ("x-checksums", True)) if on]  # fmt: skip


class _PostcopySwitch:
    """Send ``migrate-start-postcopy`` once the first full pass is done (QEMU's advice)."""

    def __init__(self, src: Any) -> None:
        self.src = src
        self.sent = False

    def __call__(self, info: dict[str, Any]) -> None:
        if self.sent or info.get("status") != "active":
            return
        if info.get("ram", {}).get("dirty-sync-count", 0) >= 2:
            self.src.qmp("migrate-start-postcopy")
            self.sent = True


def _plan(console: Console, src: Any, args: argparse.Namespace) -> Any:
    """Sample the guest for a moment and predict the migration (``livemig plan``)."""
    from livemig.cli.plan import prediction_table
    from livemig.control.plan import plan_for

    try:
        link = None
        if args.two_hosts:
            from livemig.netns import tc_rate_bytes

            link = tc_rate_bytes(args.link_rate)
        pred = plan_for(src._qmp, 1.0, link, None)
    except LivemigError as exc:
        console.print(f"[yellow]planner: {exc}[/]")
        return None
    console.print(prediction_table(pred))
    return pred


def _safe(proc: Any, command: str) -> Any:
    try:
        return proc.qmp(command)
    except LivemigError:
        return None


def _check(dst: Any) -> dict[str, Any] | None:
    """memstress's invariant on the destination, read while it is briefly paused."""
    try:
        dst.qmp("stop")
        try:
            return dst.qmp("x-guest-check")
        finally:
            dst.qmp("cont")
    except LivemigError as exc:
        return {"ok": False, "error": str(exc)}


def _show_console(console: Console, proc: Any, label: str, seconds: float,
                  *, from_start: bool = False, want: str = "pass", max_wait: float = 10.0
                  ) -> None:  # fmt: skip
    """Echo the guest's console for ``seconds``, and longer (up to ``max_wait``) until a line
    containing ``want`` appears, so the viewer sees the guest make progress."""
    start = 0 if from_start else len(proc.serial_lines())
    t0 = time.monotonic()
    shown = 0
    seen = False
    while True:
        lines = proc.serial_lines()[start:]
        for line in lines[shown:]:
            console.print(f"[dim]{label:>11} │[/] {line}")
            seen = seen or want in line
        shown = len(lines)
        elapsed = time.monotonic() - t0
        if elapsed >= max_wait or (elapsed >= seconds and seen):
            break
        time.sleep(0.1)
    if shown == 0:
        console.print(f"[dim]{label:>11} │ (no console output in {max_wait:g} s)[/]")
