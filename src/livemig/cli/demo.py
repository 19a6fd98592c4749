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
from livemig.cli.argtypes import capability, seconds, setting
from livemig.control.demo import Demo, DemoOptions
from livemig.errors import LivemigError, UsageError
from livemig.units import parse_size


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
    p.add_argument("--set", dest="params", action="append", type=setting, default=[],
                   metavar="PARAM=VALUE", help="migration parameter, as for livemig migrate, "
                   "e.g. downtime-limit=50 max-bandwidth=1G (0 = unlimited)")  # fmt: skip
    p.add_argument("--cap", dest="caps", action="append", type=capability, default=[],
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
    p.add_argument("--link-rate", default=None,
                   help="tc tbf rate with --two-hosts (default 1gbit)")  # fmt: skip
    p.add_argument("--out", default="livemig-report", help="report path stem (.json, .png)")
    p.add_argument("--watch", type=seconds(allow_zero=True), default=1.5,
                   help="seconds of console before/after")  # fmt: skip
    p.set_defaults(func=run)


def options_from_args(args: argparse.Namespace) -> DemoOptions:
    """The flags as ``livemig.control.demo``'s options."""
    return DemoOptions(
        memory=args.memory, smp=args.smp, working_set=args.working_set,
        dirty_rate=args.dirty_rate, guest=args.guest, params=dict(args.params),
        caps=dict(args.caps), postcopy=args.postcopy, multifd=args.multifd,
        two_hosts=args.two_hosts, link_rate=args.link_rate or "1gbit", out=args.out,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from livemig.guests import build_guest

    console = Console()
    if args.link_rate is not None and not args.two_hosts:
        # it was ignored, whatever it said: one loopback host has no link to shape
        raise UsageError("--link-rate goes with --two-hosts")
    opts = options_from_args(args)
    opts.check()
    console.rule("[bold]livemig demo")
    console.print(f"building the {opts.guest} guest ...")
    build_guest(opts.guest)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="livemig-demo-")))
        return _demo(Demo(opts, stack, workdir), console, args.watch)


def _demo(demo: Demo, console: Console, watch: float) -> int:
    from livemig.report import progress

    o = demo.opts
    hosts = demo.start_hosts()
    if hosts is not None:
        console.print(f"two hosts: namespaces {hosts.ns_a} ({hosts.addr_a}) and {hosts.ns_b} "
                      f"({hosts.addr_b}), veth with tc tbf {o.link_rate}")  # fmt: skip
    demo.start()
    src, dst = demo.src, demo.dst
    speed = ("as fast as it can" if parse_size(o.dirty_rate or "0", "--dirty-rate") == 0
             else f"at {o.dirty_rate}B/s")  # fmt: skip
    console.print(f"source      pid {src.pid}: {o.guest}, {o.memory}, {o.smp} vCPUs, "
                  f"dirtying {o.working_set} {speed}")  # fmt: skip
    console.print(f"destination pid {dst.pid}: waiting on {demo.listen}")
    _show_console(console, src, "source", watch, from_start=True)
    demo.configure()
    try:
        prediction = demo.plan()
        console.print(_prediction_table(prediction))
    except LivemigError as exc:
        console.print(f"[yellow]planner: {exc}[/]")
        prediction = None
    console.rule(f"migrating to {demo.uri}")
    with progress.ProgressDisplay(console) as display:
        final = demo.migrate(display)
    result = demo.result(final)
    ok = final.get("status") == "completed"
    if ok:
        console.print(f"source now: {src.qmp('query-status')['status']}; "
                      f"destination now: {dst.qmp('query-status')['status']}")  # fmt: skip
        _show_console(console, dst, "destination", watch)
        demo.check_invariant(result)
    demo.report(result)
    assert result.report is not None and result.report_paths is not None
    invariant = result.invariant
    extra = {
        "verification (RAM hashes)": "identical" if final.get("x-verified") else "NOT checked",
        "guest invariant": "holds" if invariant and invariant.get("ok") else str(invariant),
        "dirty tracker": final.get("x-dirty-tracker", "?"),
    }
    pc = progress.postcopy_summary(result.destination)
    if pc is not None:
        extra["post-copy page requests"] = pc
    elif o.postcopy and ok and "postcopy" not in result.report.get("phases", {}):
        extra["post-copy"] = "not used: pre-copy converged before the switch"
    if prediction is not None and prediction.total_time_s is not None:
        extra["planner's advice"] = _advice(prediction, "post-copy" if o.postcopy
                                            else "pre-copy")  # fmt: skip
    console.print(progress.summary_table(final, extra, result.destination))
    jpath, ppath = result.report_paths
    console.print(f"report: {jpath}\nplots:  {ppath}")
    return 0 if result.ok else 1


def _prediction_table(prediction: Any) -> Any:
    from livemig.cli.plan import prediction_table

    return prediction_table(prediction)


def _advice(prediction: Any, used: str) -> str:
    """The planner's strategy and its forecast, and whether this run followed it (the demo
    does not switch strategy by itself: it runs pre-copy, or post-copy when asked)."""
    text = (f"{prediction.recommendation}: {prediction.passes} passes, "
            f"{prediction.total_time_s * 1000:.0f} ms total, "
            f"{(prediction.downtime_s or 0) * 1000:.0f} ms downtime predicted")  # fmt: skip
    if prediction.recommendation != used:
        text += f" (this run used {used})"
    return text


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
