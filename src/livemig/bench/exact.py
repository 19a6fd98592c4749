"""``livemig bench exact``: stop/cont cycles and migrations a deterministic guest survives exactly.

The soak of ``livemig.testing.exact``, as long as asked, for 1 and 2 vCPUs: the compute guest
in real ``livemig run`` processes, stopped and resumed over QMP with randomised timing, migrated
again and again with every kind of migration (pre-copy, x-verify over TCP, multifd, post-copy
with and without preempt, XBZRLE, auto-converge, ``file:`` snapshots plain and mapped-ram, a
paused guest, a cancelled and a failed migration), and checked at every stop against its
host-side reference. It prints the cycles and migrations survived and the divergences, which
must be 0; any divergence or failed step makes the exit status 1.

There is no speed ratio here: the figure is a count of events survived, with the time it took.
``livemig bench faults`` runs a short soak of the same kind beside its fault scenarios.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from livemig.bench.common import table_console
from livemig.testing.exact import KINDS, SoakConfig, SoakResult, soak, summary


def run_soaks(
    cycles: int,
    migrations: int,
    smps: list[int],
    kinds: list[str] | None = None,
    seed: int = 0,
    log: Any = None,
) -> tuple[list[SoakResult], dict[str, Any]]:
    """Split ``cycles`` and ``migrations`` over the vCPU counts, run a soak for each."""
    results = []
    for i, smp in enumerate(smps):
        share = len(smps) - i
        c, m = cycles // share, migrations // share
        cycles, migrations = cycles - c, migrations - m
        cfg = SoakConfig(smp=smp, cycles=c, migrations=m, kinds=kinds or (), rng_seed=seed + i,
                         seed=seed + i + 1)  # fmt: skip
        results.append(soak(cfg, log=log or (lambda _m: None)))
    return results, summary(results)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("exact", help="stop/cont cycles and migrations survived exactly")
    p.add_argument("--cycles", type=int, default=1000, help="stop/cont cycles in all (1000)")
    p.add_argument("--migrations", type=int, default=48, help="migrations in all (48)")
    p.add_argument("--smp", default="1,2", help="vCPU counts, comma-separated (1,2)")
    p.add_argument("--kinds", default="", help=f"migration kinds (default all: {', '.join(KINDS)})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    smps = [int(x) for x in args.smp.split(",") if x]
    kinds = [k for k in args.kinds.split(",") if k]

    def log(msg: str) -> None:
        if not args.json:
            print(f"  {msg}", flush=True)

    results, total = run_soaks(args.cycles, args.migrations, smps, kinds, args.seed, log)
    figures = {"soaks": [r.to_json() for r in results], "total": total}
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print_table(results, total)
    return 1 if total["diverged"] or total["problems"] else 0


def print_table(results: list[SoakResult], total: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title="livemig bench exact: the compute guest against its host-side reference")
    for col in ("vCPUs", "stop/cont cycles", "migrations", "checks", "guest operations",
                "diverged", "seconds"):  # fmt: skip
        t.add_column(col, justify="right")
    for r in results:
        t.add_row(str(r.smp), str(r.cycles), str(r.migrations_total), str(r.checks),
                  f"{r.guest_ops:,}", str(int(r.diverged)), f"{r.seconds:.0f}")  # fmt: skip
    console = table_console()
    console.print(t)
    kinds = ", ".join(f"{k} {n}" for k, n in total["by-kind"].items())
    console.print(f"migrations by kind: {kinds}")
    console.print(f"diverged: {total['diverged']}")
    for p in total["problems"]:
        console.print(f"problem: {p}")
