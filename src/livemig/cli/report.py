"""``livemig report FILE.json``: draw a saved migration report again (PNG beside the JSON)."""

from __future__ import annotations

import argparse
from pathlib import Path

from livemig.report import timeline


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="draw a saved migration report (JSON) as PNG plots")
    p.add_argument(
        "file",
        type=Path,
        help="report JSON written by livemig demo --out or livemig migrate --report",
    )
    p.add_argument("--png", type=Path, default=None, help="output PNG (default: beside FILE)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = timeline.load(args.file)
    out = args.png or args.file.with_suffix(".png")
    timeline.plot(report, out)
    print(out)
    return 0
