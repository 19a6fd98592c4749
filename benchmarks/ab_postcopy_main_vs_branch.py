"""Interleaved main against this branch (session 12, issue 23, helper pcswitch): bench matrix's livemig
post-copy cell; main's source unpacked in /tmp/pcs/mainsrc (git archive 4f0e0d7) and put on
PYTHONPATH for the livemig processes of its runs.

    .venv/bin/python benchmarks/ab_postcopy_main_vs_branch.py ROUNDS RATES   # e.g. 8 50,200
"""

import json
import os
import statistics
import sys

from livemig.bench import matrix as M

rounds = int(sys.argv[1])
rates = [int(x) for x in sys.argv[2].split(",")]
cfg = M.Config(verify=False)
st = M.parse_strategy("postcopy")
rows = []
for r in range(rounds):
    for rate in rates:
        for v in ("main", "branch") if r % 2 == 0 else ("branch", "main"):
            if v == "main":
                os.environ["PYTHONPATH"] = "/tmp/pcs/mainsrc/src"
            else:
                os.environ.pop("PYTHONPATH", None)
            fig = M.run_livemig(cfg, 256 << 20, rate, st)
            row = dict(
                rate=rate,
                v=v,
                outcome=fig.outcome,
                total=fig.total_ms,
                downtime=fig.downtime_ms,
                blackout=fig.blackout_ms,
                blocktime=fig.blocktime_ms,
                requests=fig.postcopy_requests,
                guest_ok=fig.guest_ok,
                load=round(os.getloadavg()[0], 2),
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
with open(os.environ.get("AB_JSON", "ab_main.json"), "w") as f:
    json.dump(rows, f, indent=1)
for rate in rates:
    for v in ("main", "branch"):
        sel = [x for x in rows if x["rate"] == rate and x["v"] == v and x["outcome"] == "completed"]

        def med(k, sel=sel):
            vals = [x[k] for x in sel if x[k] is not None]
            return f"{statistics.median(vals):.1f} ({min(vals):.1f})" if vals else "-"

        print(
            f"rate {rate} {v:6s} n={len(sel)} ok={sum(bool(x['guest_ok']) for x in sel)}: blackout {med('blackout')}, blocktime {med('blocktime')}, "
            f"blackout+blocktime {statistics.median([x['blackout'] + (x['blocktime'] or 0) for x in sel]):.1f}, downtime {med('downtime')}, total {med('total')}, requests {med('requests')}"
        )
