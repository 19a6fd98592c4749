"""Interleaved A/B of ``livemig bench postcopy`` between two source trees (session 12, pctail).

    .venv/bin/python benchmarks/postcopy_ab.py OUT.json ROUNDS SMP RATE BEFORE_SRC AFTER_SRC

Each round runs, for preempt off then on, one migration with the BEFORE tree and one with the
AFTER tree (``PYTHONPATH`` pointing at each tree's ``src``), so both see the same load: the
bare-Python request floor (``livemig.bench.request_floor``, SMP busy cores) and then
``livemig.bench.postcopy.measure`` with the bench's settings (128 MiB, 96 MiB working set,
memstress at RATE MiB/s on SMP vCPUs, max-postcopy-bandwidth 256 MiB/s, prefetch 0,
readahead 1024). Every run's figures (and the load average before it) go to OUT.json, one
line per run to stdout. A tree is made with ``git archive COMMIT src | tar -x -C DIR``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

RUN = r"""
import json, sys
from livemig.bench import postcopy as P, request_floor
pre, smp, rate = sys.argv[1] == "1", int(sys.argv[2]), int(sys.argv[3])
floor = request_floor.measure(P.FLOOR_FAULTS, busy=smp)
r = P.measure(128 << 20, "96M", smp, pre, 0, 256 << 20, rate, 1024)
r["floor"] = floor
print(json.dumps(r))
"""


def main() -> int:
    out, rounds, smp, rate, before, after = sys.argv[1:7]
    trees = {"before": before, "after": after}
    rows = []
    for i in range(int(rounds)):
        for pre in ("0", "1"):
            for name, tree in trees.items():
                env = dict(os.environ, PYTHONPATH=tree)
                load = float(open("/proc/loadavg").read().split()[0])
                p = subprocess.run([sys.executable, "-c", RUN, pre, smp, rate], env=env,
                                   capture_output=True, text=True, timeout=300)  # fmt: skip
                if p.returncode:
                    print(f"{name} preempt={pre} round {i}: FAILED {p.stderr[-300:]}", flush=True)
                    continue
                r = json.loads(p.stdout.strip().splitlines()[-1])
                r.update(tree=name, round=i, load=load)
                rows.append(r)
                lat, fl = r["latency"], r["floor"]
                print(f"{name:6s} preempt={pre} round {i}: p99 {lat['p99-us'] / 1000:.2f} ms "
                      f"p50 {lat['p50-us']:.0f} us floor p50/p99 {fl['p50-us']:.0f}/"
                      f"{fl['p99-us']:.0f} us requests {r['requests']} blocktime "
                      f"{r['blocktime-ms']} ms total {r['total-s']} s load {load}", flush=True)  # fmt: skip
                with open(out, "w") as f:
                    json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
