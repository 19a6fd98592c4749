"""``livemig plan``: sample a running guest, predict its migration, recommend a strategy.

It asks the livemig process behind ``--qmp`` to measure the guest's dirty rate and working set
for a few seconds (``calc-dirty-rate``, measured with the kernel's dirty log), then runs the
convergence model of ``livemig.migration.planner`` for the given link bandwidth and
downtime limit: does pre-copy converge, in how long, with what downtime, and should you use
pre-copy, auto-converge or post-copy. The sampling and the prediction are
``livemig.control.plan``; this prints them.
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

from livemig.cli import describe
from livemig.cli.argtypes import seconds, setting
from livemig.control.plan import plan_for
from livemig.errors import UsageError
from livemig.migration.planner import Prediction
from livemig.units import format_size, parse_size


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="predict a migration of a running guest, recommend a strategy",
                       description=describe(__doc__))  # fmt: skip
    p.add_argument("--qmp", required=True, help="QMP of the running livemig: unix:PATH|tcp:H:P")
    p.add_argument("--bandwidth", default=None,
                   help="link bandwidth in bytes/s, e.g. 1G (default: loopback TCP, measured "
                        "now); pre-copy is also held to the source's max-bandwidth")  # fmt: skip
    p.add_argument(
        "--set", dest="params", action="append", type=setting, default=[],
        metavar="PARAM=VALUE", help="plan as if the source had this migration parameter, e.g. "
        "downtime-limit=50 or max-bandwidth=1G (default: the source's own)",
    )  # fmt: skip
    # QEMU's calc-dirty-rate range, which the sampling runs
    p.add_argument("--seconds", type=seconds(0.05, 60), default=3.0,
                   help="how long to sample, 0.05 to 60 (default 3)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the prediction as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from livemig.qmp.client import QMPConnection

    bw = parse_size(args.bandwidth, "--bandwidth") if args.bandwidth else None
    if bw is not None and bw <= 0:
        # 0 was taken as "not given" and the plan used a measured link instead
        raise UsageError(f"--bandwidth {args.bandwidth}: a link carries more than 0 bytes/s")
    with QMPConnection(args.qmp).connect() as qmp:
        pred = plan_for(qmp, args.seconds, bw, dict(args.params))
    if args.json:
        json.dump(pred.as_dict(), sys.stdout, indent=2)
        print()
        return 0
    Console().print(prediction_table(pred))
    return 0


def prediction_table(pred: Prediction) -> Table:
    i = pred.inputs
    t = Table(title="migration plan", show_header=False, box=None)
    t.add_column(style="bold")
    t.add_column()
    rows = [
        ("guest RAM in use", format_size(i["populated-bytes"])),
        ("working set", format_size(i["working-set-bytes"])),
        ("dirty rate", f"{format_size(i['dirty-rate-bytes-per-s'])}/s"),
        ("pre-copy rate", f"{format_size(i['bandwidth-bytes-per-s'])}/s"),
        (
            "link (blackout)",
            f"{format_size(i.get('link-bytes-per-s', 0))}/s ({i.get('link', 'given')})",
        ),
        ("downtime limit", f"{i['downtime-limit-ms']} ms"),
        ("pre-copy alone", "converges" if pred.converges
         else f"never fits the {i['downtime-limit-ms']} ms limit"),
        ("recommendation", f"[bold]{pred.recommendation}[/]"),
        ("why", pred.reason),
    ]  # fmt: skip
    rec = pred.recommendation
    if pred.recommendation != "post-copy":
        rows.append((f"passes ({rec})", str(pred.passes)))
    rows += [
        (f"total time ({rec})", "-" if pred.total_time_s is None
         else f"{pred.total_time_s:.2f} s"),
        (f"downtime ({rec})", "-" if pred.downtime_s is None
         else f"{pred.downtime_s * 1000:.0f} ms"),
    ]  # fmt: skip
    for k, v in rows:
        t.add_row(k, v)
    return t
