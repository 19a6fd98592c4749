"""Interleaved A/B of ``livemig bench postcopy``'s measurement between source trees, on a
host kept busy on purpose (session 13, issue 23, helper p99).

    .venv/bin/python benchmarks/postcopy_ab_trees.py OUT.json ROUNDS PREEMPTS HOGS NAME=SRC...

e.g. ``... ab.json 8 0,1 1 main=/tmp/main/src new=src``. Each round runs, for each preempt
setting in PREEMPTS, one migration per tree (the order of the trees alternates from round to
round), each in a fresh interpreter with ``PYTHONPATH`` at that tree's ``src``: the bare-Python
request floor (``livemig.bench.request_floor``, 1 busy core) and then
``livemig.bench.postcopy.measure`` with ``bench postcopy --smp 1 --rate 1024``'s settings
(128 MiB, 96 MiB working set, max-postcopy-bandwidth 256 MiB/s, prefetch 0, readahead 1024).
HOGS Python busy loops run for the whole session (the issue's targets are "on a busy host").
Every run's figures, with the load average before it, go to OUT.json; one line per run to
stdout. A tree is made with ``git archive COMMIT src | tar -x -C DIR``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

RUN = r"""
import json, sys
from livemig.bench import postcopy as P, request_floor
pre = sys.argv[1] == "1"
floor = request_floor.measure(P.FLOOR_FAULTS, busy=1)
r = P.measure(128 << 20, "96M", 1, pre, 0, 256 << 20, 1024, 1024)
r["floor"] = floor
print(json.dumps(r))
"""


def main() -> int:
    out, rounds, pres, hogs = (
        sys.argv[1],
        int(sys.argv[2]),
        sys.argv[3].split(","),
        int(sys.argv[4]),
    )
    trees = [a.split("=", 1) for a in sys.argv[5:]]
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
    rows = []
    try:
        for i in range(rounds):
            for pre in pres:
                for name, tree in trees if i % 2 == 0 else trees[::-1]:
                    env = dict(os.environ, PYTHONPATH=tree)
                    load = round(os.getloadavg()[0], 2)
                    p = subprocess.run([sys.executable, "-c", RUN, pre], env=env,
                                       capture_output=True, text=True, timeout=300)  # fmt: skip
                    if p.returncode:
                        print(
                            f"{name} preempt={pre} round {i}: FAILED {p.stderr[-500:]}", flush=True
                        )
                        continue
                    r = json.loads(p.stdout.strip().splitlines()[-1])
                    r.update(tree=name, round=i, load=load, hogs=hogs, t=time.time())
                    rows.append(r)
                    lat, fl = r["latency"], r["floor"]
                    print(f"{name:6s} pre={pre} r{i}: p99 {lat['p99-us'] / 1000:.2f} max "
                          f"{lat['max-us'] / 1000:.2f} ms p50 {lat['p50-us']:.0f} us floor "
                          f"{fl['p50-us']:.0f}/{fl['p99-us']:.0f} requests {r['requests']} "
                          f"blocktime {r['blocktime-ms']} ms total {r['total-s']} s load {load}",
                          flush=True)  # fmt: skip
                    with open(out, "w") as f:
                        json.dump(rows, f, indent=1)
    finally:
        for h in busy:
            h.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
