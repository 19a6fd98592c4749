"""Interleaved A/B of the post-copy switch, session 12 (issue 23, helper pcswitch):
x-postcopy-minor-faults on (MADV_DONTNEED + userfaultfd minor faults) against off (MADV_REMOVE)
in bench matrix's livemig post-copy cell (256 MiB memstress, 64 MiB working set, max-bandwidth
128 MiB/s, the switch after the first pass, no x-verify).

    .venv/bin/python benchmarks/ab_postcopy_minor_faults.py ROUNDS RATES   # e.g. 10 200
"""

import json
import os
import statistics
import sys

from livemig.bench import matrix as M

extra = {}
orig_drive = M.drive


def drive(src, dst, strategy, **kw):
    info = orig_drive(src, dst, strategy, **kw)
    try:
        with dst.qmp() as dq:
            extra["dst"] = dq.command("query-migrate").get("x-postcopy", {})
    except Exception as exc:
        extra["dst"] = {"error": str(exc)}
    return info


M.drive = drive

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
rates = [int(r) for r in (sys.argv[2] if len(sys.argv) > 2 else "50,200").split(",")]
cfg = M.Config(verify=False)
base = M.parse_strategy("postcopy")
rows = []
for r in range(rounds):
    for rate in rates:
        for minor in (True, False) if r % 2 == 0 else (False, True):
            st = M.Strategy(
                base.name,
                base.caps,
                base.dest_caps,
                {"x-postcopy-minor-faults": minor},
                postcopy=True,
            )
            extra.clear()
            fig = M.run_livemig(cfg, 256 << 20, rate, st)
            d = extra.get("dst", {})
            row = dict(
                round=r,
                rate=rate,
                minor=minor,
                outcome=fig.outcome,
                blackout=fig.blackout_ms,
                downtime=fig.downtime_ms,
                total=fig.total_ms,
                blocktime=fig.blocktime_ms,
                discard=d.get("discard"),
                discard_us=d.get("discard-us"),
                requests=d.get("requests"),
                p50=d.get("latency", {}).get("p50-us"),
                p99=d.get("latency", {}).get("p99-us"),
                load=os.getloadavg()[0],
                guest_ok=fig.guest_ok,
                notes=fig.notes,
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
print("\nmedians (min) over completed runs:")
for rate in rates:
    for minor in (False, True):
        sel = [
            x
            for x in rows
            if x["rate"] == rate
            and x["minor"] == minor
            and x["outcome"] == "completed"
            and x["blackout"] is not None
        ]

        def med(k, sel=sel):
            v = [x[k] for x in sel if x[k] is not None]
            return f"{statistics.median(v):.1f} ({min(v):.1f})" if v else "-"

        print(
            f"rate {rate:3d} {'minor ' if minor else 'remove'} n={len(sel)}: blackout {med('blackout')} ms, downtime {med('downtime')}, "
            f"discard {med('discard_us')} us, total {med('total')} ms, blocktime {med('blocktime')}, requests {med('requests')}, p50 {med('p50')} us, p99 {med('p99')} us"
        )
with open(os.environ.get("AB_JSON", "ab-postcopy-minor-faults.json"), "w") as f:
    json.dump(rows, f, indent=1)
