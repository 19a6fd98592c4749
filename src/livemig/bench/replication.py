"""``livemig bench replication``: what replication costs a served guest, and what a failover
costs its clients.

**Cost.** One kvserver guest, its standby and a ``livemig front`` (``livemig.testing.
replication``). Closed-loop RESP clients (SET/GET on random keys, one request in flight each)
talk to the front throughout; the phases are timed windows of that one run: ``unreplicated``
(before replication starts, and again after it is ended: the baseline is both together), then
replication with ``x-checkpoint-delay`` 25, 50 and 100 ms (changed live). For each: requests
per second and latency p50/p99 as ratios to the baseline, and from the primary's checkpoint
records (``x-query-colo-checkpoints``): the guest's pause per checkpoint (p50/p99/max), bytes
per checkpoint (p50) and the time from capture to the standby's acknowledgement. With output
commit a closed-loop client gets at most one reply per checkpoint, so its rate is bounded by
the interval: more clients (or pipelining) is how a replicated service keeps its throughput.
Then the same intervals for a guest that writes much (memstress, ``--dirty``): the pause and
size of its checkpoints, and its invariant at the end.

**Failover.** The same clients (writers of unique keys plus one INCR counter) run through
``--kills`` failovers in a row: each time the primary is SIGKILLed at a random moment (0.2 to
1.5 s after replication is running), the standby takes over, the front moves the clients
there, and the standby gets a new standby of its own. Per kill: the time from the kill to the
standby running, and to the first answered request *sent after* the kill (a PING prober),
whether the kill fell inside a checkpoint. At the end every acknowledged key is read back:
acknowledged writes lost (must be 0), wrong (0), the counter's replies exact (no gap, no
repeat) and client errors (0).
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from typing import Any

import numpy as np

from livemig.errors import LivemigError
from livemig.service import RespClient
from livemig.testing.procs import ProcHarness, wait_until
from livemig.testing.replication import (
    Writers,
    audit,
    start_replicated,
)

DELAYS_MS = (25, 50, 100)


class _Client(threading.Thread):
    """One closed-loop client: (completion time, latency) of every request."""

    def __init__(self, port: int, seed: int, stop: threading.Event) -> None:
        super().__init__(daemon=True, name=f"bench-client{seed}")
        self.port, self.rng, self.stop = port, random.Random(seed), stop
        self.done: list[tuple[float, float]] = []
        self.errors: list[str] = []
        self.wrong = 0

    def run(self) -> None:
        mine: dict[int, bytes] = {}
        prefix = f"b{self.rng.getrandbits(24)}:"
        try:
            with RespClient("127.0.0.1", self.port, timeout=60) as c:
                while not self.stop.is_set():
                    k = self.rng.randrange(5000)
                    t0 = time.perf_counter()
                    if k in mine and self.rng.random() < 0.5:
                        if c.call("GET", f"{prefix}{k}") != mine[k]:
                            self.wrong += 1
                    else:
                        v = f"{k}:{self.rng.getrandbits(32)}".encode()
                        c.call("SET", f"{prefix}{k}", v)
                        mine[k] = v
                    t1 = time.perf_counter()
                    self.done.append((t1, t1 - t0))
        except (OSError, LivemigError) as exc:
            self.errors.append(repr(exc))


def _window(samples: np.ndarray, start: float, end: float) -> dict[str, Any]:
    sel = samples[(samples[:, 0] >= start) & (samples[:, 0] < end)]
    lat = sel[:, 1] * 1e3
    span = max(end - start, 1e-9)
    return {"seconds": round(span, 2), "requests": len(sel), "rps": round(len(sel) / span, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 3) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 3) if len(lat) else None}  # fmt: skip


def _checkpoints(records: list[dict[str, Any]], first: int, last: int) -> dict[str, Any]:
    sel = [r for r in records if first < r["checkpoint"] <= last]
    if not sel:
        return {"checkpoints": 0}
    pause = np.array([r["pause-ms"] for r in sel])
    size = np.array([r["bytes"] for r in sel])
    ack = np.array([r["ack-ms"] for r in sel])
    return {"checkpoints": len(sel),
            "pause_p50_ms": round(float(np.percentile(pause, 50)), 3),
            "pause_p99_ms": round(float(np.percentile(pause, 99)), 3),
            "pause_max_ms": round(float(pause.max()), 3),
            "bytes_p50": int(np.percentile(size, 50)),
            "ack_p50_ms": round(float(np.percentile(ack, 50)), 3)}  # fmt: skip


def run_cost(memory: str, clients: int, phase: float) -> dict[str, Any]:
    with ProcHarness(memory=memory, smp=1) as h:
        # the standby is there from the start; replication begins after the first window
        r = start_replicated(h, memory=memory, delay_ms=DELAYS_MS[0], defer=True)
        stop = threading.Event()
        cl = [_Client(r.port, i, stop) for i in range(clients)]
        for c in cl:
            c.start()
        wait_until(lambda: sum(len(c.done) for c in cl) > 100, 30, "clients running")
        marks: list[tuple[str, float, float, int, int]] = []
        t0 = time.perf_counter()
        time.sleep(phase)
        marks.append(("unreplicated-before", t0, time.perf_counter(), 0, 0))
        r.start_replication(DELAYS_MS[0])
        for delay in DELAYS_MS:
            r.primary.cmd("migrate-set-parameters", **{"x-checkpoint-delay": delay})
            time.sleep(min(0.5, phase / 4))  # the new interval settles
            n0 = r.primary.cmd("query-colo-status")["x-checkpoints"]
            t0 = time.perf_counter()
            time.sleep(phase)
            t1 = time.perf_counter()
            n1 = r.primary.cmd("query-colo-status")["x-checkpoints"]
            marks.append((f"replicated-{delay}ms", t0, t1, n0, n1))
        records = r.primary.cmd("x-query-colo-checkpoints")
        colo = r.primary.cmd("query-colo-status")
        r.primary.cmd("x-colo-lost-heartbeat")  # ends replication: the guest goes on alone
        wait_until(lambda: r.primary.cmd("query-colo-status")["mode"] == "none", 10, "the end")
        time.sleep(min(0.5, phase / 4))
        t0 = time.perf_counter()
        time.sleep(phase)
        marks.append(("unreplicated-after", t0, time.perf_counter(), 0, 0))
        stop.set()
        for c in cl:
            c.join(30)
        samples = np.array([d for c in cl for d in c.done]) if any(c.done for c in cl) \
            else np.zeros((0, 2))  # fmt: skip
    phases = {name: _window(samples, a, b) for name, a, b, _n0, _n1 in marks}
    for name, _a, _b, n0, n1 in marks:
        if n1:
            phases[name].update(_checkpoints(records, n0, n1))
    base = [phases["unreplicated-before"], phases["unreplicated-after"]]
    baseline = {"rps": sum(p["rps"] for p in base) / 2,
                "p50_ms": sum(p["p50_ms"] or 0 for p in base) / 2,
                "p99_ms": sum(p["p99_ms"] or 0 for p in base) / 2}  # fmt: skip
    for name, p in phases.items():
        if name.startswith("replicated"):
            p["rps_ratio"] = round(p["rps"] / baseline["rps"], 4) if baseline["rps"] else None
            p["p50_ratio"] = round((p["p50_ms"] or 0) / baseline["p50_ms"], 2) \
                if baseline["p50_ms"] else None  # fmt: skip
            p["p99_ratio"] = round((p["p99_ms"] or 0) / baseline["p99_ms"], 2) \
                if baseline["p99_ms"] else None  # fmt: skip
    return {"memory": memory, "clients": clients, "phase_s": phase, "phases": phases,
            "baseline": {k: round(v, 3) for k, v in baseline.items()},
            "errors": sum(len(c.errors) for c in cl), "wrong_values": sum(c.wrong for c in cl),
            "colo": {k: v for k, v in colo.items() if k.startswith("x-")}}  # fmt: skip


def run_dirty(memory: str, append: str, phase: float) -> dict[str, Any]:
    """Checkpoints of a guest that writes much (memstress): pause and size per interval."""
    from livemig.testing.replication import replicate

    out: dict[str, Any] = {"guest": f"memstress {append}", "memory": memory}
    with ProcHarness(memory=memory, smp=2) as h:
        src = h.source(append=append, memory=memory)
        dst = h.destination(memory=memory)
        replicate(src, dst.incoming or "", DELAYS_MS[0])
        for delay in DELAYS_MS:
            src.cmd("migrate-set-parameters", **{"x-checkpoint-delay": delay})
            time.sleep(min(0.5, phase / 4))
            n0 = src.cmd("query-colo-status")["x-checkpoints"]
            time.sleep(phase)
            n1 = src.cmd("query-colo-status")["x-checkpoints"]
            out[f"replicated-{delay}ms"] = _checkpoints(src.cmd("x-query-colo-checkpoints"),
                                                        n0, n1)  # fmt: skip
        src.cmd("stop")
        out["invariant_ok"] = bool(src.cmd("x-guest-check")["ok"])
    return out


class _Prober(threading.Thread):
    """PING through the front in a loop: (sent, answered) times."""

    def __init__(self, port: int, stop: threading.Event) -> None:
        super().__init__(daemon=True, name="bench-prober")
        self.port, self.stop = port, stop
        self.pings: list[tuple[float, float]] = []
        self.errors: list[str] = []

    def run(self) -> None:
        try:
            with RespClient("127.0.0.1", self.port, timeout=60) as c:
                while not self.stop.is_set():
                    t0 = time.monotonic()
                    c.call("PING")
                    self.pings.append((t0, time.monotonic()))
        except (OSError, LivemigError) as exc:
            self.errors.append(repr(exc))


def run_failover(memory: str, kills: int, seed: int, log: Any = print) -> dict[str, Any]:
    rng = random.Random(seed)
    rounds: list[dict[str, Any]] = []
    with ProcHarness(memory=memory, smp=1) as h:
        r = start_replicated(h, memory=memory, delay_ms=25)
        w = Writers(r.port, n=3, seed=seed).start()
        stop = threading.Event()
        prober = _Prober(r.port, stop)
        prober.start()
        wait_until(lambda: w.count() > 50, 30, "clients writing")
        for i in range(kills):
            time.sleep(rng.uniform(0.2, 1.5))
            t_kill = time.monotonic()
            r.primary.kill()
            r.standby.wait_status("running", 30)
            t_run = time.monotonic() - t_kill
            wait_until(lambda t=t_kill: any(s >= t for s, _a in prober.pings), 30,
                       "a PING sent after the kill to be answered")  # fmt: skip
            first = min(a for s, a in prober.pings if s >= t_kill) - t_kill
            colo = r.standby.cmd("query-colo-status")
            rounds.append({"kill": i + 1, "takeover_ms": round(t_run * 1000, 1),
                           "first_answer_ms": round(first * 1000, 1),
                           "partial_checkpoint": bool(colo.get("x-partial-discarded")),
                           "how": colo.get("x-how")})  # fmt: skip
            log(f"kill {i + 1}/{kills}: standby running after {t_run * 1000:.0f} ms, first "
                f"answer after {first * 1000:.0f} ms"
                + (" (inside a checkpoint)" if colo.get("x-partial-discarded") else ""))  # fmt: skip
            if i + 1 < kills:
                r.new_standby()
                wait_until(lambda: r.front.cmd("x-query-front")["successor"], 10, "standby")
                before = w.count()
                wait_until(lambda b=before: w.count() > b + 20, 30, "clients writing")
        stop.set()
        w.stop()
        prober.join(30)
        result = audit(r.port, w)
        front = r.front.cmd("x-query-front")
    t = np.array([x["first_answer_ms"] for x in rounds])
    return {"kills": kills, "rounds": rounds, "audit": result,
            "prober_errors": prober.errors, "front_failovers": front["failovers"],
            "first_answer_p50_ms": round(float(np.percentile(t, 50)), 1) if len(t) else None,
            "first_answer_max_ms": round(float(t.max()), 1) if len(t) else None,
            "inside_checkpoint": sum(x["partial_checkpoint"] for x in rounds)}  # fmt: skip


def _print(res: dict[str, Any]) -> None:
    c = res.get("cost")
    if c:
        b = c["baseline"]
        print(f"livemig bench replication: kvserver, {c['memory']}, {c['clients']} closed-loop "
              f"clients through livemig front; baseline (unreplicated, same run): "
              f"{b['rps']:.0f} req/s, p50 {b['p50_ms']:.3f} ms, p99 {b['p99_ms']:.3f} ms")  # fmt: skip
        print(f"{'phase':22} {'req/s':>8} {'ratio':>7} {'p50 ms':>8} {'ratio':>6} {'p99 ms':>8} "
              f"{'ratio':>6} {'pause p50/p99/max ms':>22} {'B/ckpt':>9} {'ack ms':>7}")  # fmt: skip
        for name, p in c["phases"].items():
            ratios = (f"{p.get('rps_ratio', 1.0):7.3f} {p['p50_ms']!s:>8} "
                      f"{p.get('p50_ratio', 1.0)!s:>6} {p['p99_ms']!s:>8} "
                      f"{p.get('p99_ratio', 1.0)!s:>6}")  # fmt: skip
            ck = ""
            if p.get("checkpoints"):
                ck = (f" {p['pause_p50_ms']:.2f}/{p['pause_p99_ms']:.2f}/{p['pause_max_ms']:.2f}"
                      f"{p['bytes_p50']:>10} {p['ack_p50_ms']:7.2f}")  # fmt: skip
            print(f"{name:22} {p['rps']:8.1f} {ratios}{ck}")
        print(f"errors {c['errors']}, wrong values {c['wrong_values']}")
    d = res.get("dirty")
    if d:
        print(f"\n{d['guest']}, {d['memory']}: checkpoints of a guest that writes much")
        print(f"{'interval':22} {'ckpts':>6} {'pause p50/p99/max ms':>22} {'B/ckpt':>10} "
              f"{'ack ms':>7}")  # fmt: skip
        for name in (f"replicated-{x}ms" for x in DELAYS_MS):
            p = d[name]
            if p.get("checkpoints"):
                print(f"{name:22} {p['checkpoints']:6} {p['pause_p50_ms']:.2f}/"
                      f"{p['pause_p99_ms']:.2f}/{p['pause_max_ms']:.2f}{p['bytes_p50']:>12} "
                      f"{p['ack_p50_ms']:7.2f}")  # fmt: skip
    f = res.get("failover")
    if f:
        a = f["audit"]
        print(f"\nfailover: {f['kills']} SIGKILLs of the primary in a row ({f['inside_checkpoint']} "
              f"inside a checkpoint); first answer to a request sent after the kill: p50 "
              f"{f['first_answer_p50_ms']} ms, max {f['first_answer_max_ms']} ms")  # fmt: skip
        print(f"acknowledged writes {a['acked']}: lost {a['lost']}, wrong {a['wrong']}; counter "
              f"replies {a['counter-replies']} {'exact' if a['counter-exact'] else 'NOT EXACT'}; "
              f"client errors {len(a['errors']) + len(f['prober_errors'])}")  # fmt: skip


def main(args: argparse.Namespace) -> int:
    res: dict[str, Any] = {}
    if not args.failover_only:
        res["cost"] = run_cost(args.memory, args.clients, args.phase)
        res["dirty"] = run_dirty(args.memory, args.dirty, args.phase)
    if args.kills:
        res["failover"] = run_failover(args.memory, args.kills, args.seed,
                                       log=(lambda _m: None) if args.json else print)  # fmt: skip
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        _print(res)
    bad = 0
    if "cost" in res:
        bad += res["cost"]["errors"] + res["cost"]["wrong_values"]
    if "failover" in res:
        a = res["failover"]["audit"]
        bad += a["lost"] + a["wrong"] + len(a["errors"]) + (not a["counter-exact"])
    return 1 if bad else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replication", help="a replicated kvserver: req/s and latency at 25/50/100 ms checkpoint "
        "intervals against the same guest unreplicated, checkpoint pauses and sizes, and SIGKILL "
        "failovers (time to the first answer, acknowledged writes lost: must be 0)",
    )  # fmt: skip
    p.add_argument("--memory", default="64M", help="guest RAM (64M)")
    p.add_argument("--clients", type=int, default=8, help="closed-loop clients (8)")
    p.add_argument("--phase", type=float, default=4.0, help="seconds per phase (4)")
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs of the primary in a row (20)")
    p.add_argument("--failover-only", action="store_true", help="skip the cost phases")
    p.add_argument("--dirty", default="ws=16M rate=20000", metavar="ARGS",
                   help="memstress arguments for the checkpoints of a guest that writes much "
                   "(ws=16M rate=20000: about 80 MB/s)")  # fmt: skip
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.set_defaults(func=main, seed=None)

    def seeded(args: argparse.Namespace) -> int:
        if args.seed is None:
            args.seed = random.randrange(1 << 30)
        return main(args)

    p.set_defaults(func=seeded)
