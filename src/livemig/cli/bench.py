"""``livemig bench NAME``: benchmarks that print ratios against a baseline measured in the same run.

Each benchmark lives in ``livemig.bench.<name>`` and exposes ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = (
    "machine",
    "codec",
    "memtrack",
    "precopy",
    "throughput",
    "postcopy",
    "faults",
    "exact",
    "service",
    "replication",
    "matrix",
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="run a benchmark (ratios to an in-run baseline)")
    benches = parser.add_subparsers(dest="bench", metavar="BENCHMARK")
    for name in BENCHMARKS:
        try:
            module = importlib.import_module(f"livemig.bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"livemig.bench.{name}":
                continue
            raise
        module.register(benches)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
