"""``livemig bench service``: what the clients of a migrating service feel.

Two ``livemig run`` processes (source with ``--guest kvserver --serve``, destination with
``--incoming --serve``), the source told the destination's serve address (``x-serve-redirect``).
Closed-loop RESP clients (GET/SET on random keys, one request in flight each) run through three
phases: ``before`` (a few seconds), ``during`` (from the ``migrate`` command to completion) and
``after``. For each phase: requests per second and latency p50 / p99 / max. Beside them the
longest stall any client saw (its slowest request, the downtime users actually feel) and the
longest gap in the whole service's completions, next to the downtime livemig reports in
``query-migrate``. Errors and wrong values are counted: both must be zero.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from typing import Any

import numpy as np

from livemig.service import RespClient, RespError
from livemig.testing.procs import ProcHarness, free_tcp_port, wait_until


class _Client(threading.Thread):
    def __init__(self, port: int, nkeys: int, seed: int, stop: threading.Event) -> None:
        super().__init__(daemon=True, name=f"bench-client{seed}")
        self.client = RespClient("127.0.0.1", port, timeout=60)
        self.nkeys = nkeys
        self.rng = random.Random(seed)
        self.stop = stop
        self.done: list[tuple[float, float]] = []  # (completion time, latency)
        self.errors: list[str] = []
        self.wrong = 0
        self.prefix = f"c{seed}:"

    def run(self) -> None:
        mine: dict[int, bytes] = {}
        try:
            while not self.stop.is_set():
                k = self.rng.randrange(self.nkeys)
                t0 = time.perf_counter()
                if k in mine and self.rng.random() < 0.5:
                    got = self.client.call("GET", f"{self.prefix}{k}")
                    if got != mine[k]:
                        self.wrong += 1
                else:
                    val = f"{k}:{self.rng.getrandbits(32)}".encode()
                    self.client.call("SET", f"{self.prefix}{k}", val)
                    mine[k] = val
                t1 = time.perf_counter()
                self.done.append((t1, t1 - t0))
        except (OSError, RespError) as exc:
            self.errors.append(repr(exc))


def _phase(samples: np.ndarray, start: float, end: float) -> dict[str, Any]:
    sel = samples[(samples[:, 0] >= start) & (samples[:, 0] < end)]
    lat = sel[:, 1] * 1e3
    span = max(end - start, 1e-9)
    return {
        "seconds": round(span, 3),
        "requests": len(sel),
        "rps": round(len(sel) / span, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 3) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 3) if len(lat) else None,
        "max_ms": round(float(lat.max()), 3) if len(lat) else None,
    }


def run_bench(
    memory: str = "64M", clients: int = 4, nkeys: int = 10000, phase_s: float = 3.0,
    tracker: str = "auto",
) -> dict[str, Any]:  # fmt: skip
    """One migration under load; the figures as a dict (see the module docstring)."""
    with ProcHarness(memory=memory, smp=1) as h:
        p1, p2 = free_tcp_port(), free_tcp_port()
        src = h.source(guest="kvserver", append="", extra=["--serve", f"tcp:127.0.0.1:{p1}"])
        dst = h.destination(extra=["--serve", f"tcp:127.0.0.1:{p2}"])
        src.cmd("x-serve-redirect", uri=f"tcp:127.0.0.1:{p2}")

        def answers() -> bool:
            try:
                with RespClient("127.0.0.1", p1, timeout=5) as c:
                    return c.call("PING") == "PONG"
            except OSError:
                return False

        wait_until(answers, 30, "kvserver answering")
        stop = threading.Event()
        workers = [_Client(p1, nkeys, i, stop) for i in range(clients)]
        for w in workers:
            w.start()
        t_start = time.perf_counter()
        time.sleep(phase_s)
        t_mig = time.perf_counter()
        params = {"x-dirty-tracker": tracker} if tracker != "auto" else None
        h.migrate(src, dst.incoming, caps={"events": True}, params=params)
        info = src.wait_migration(timeout=120)
        t_done = time.perf_counter()
        time.sleep(phase_s)
        stop.set()
        for w in workers:
            w.join(60)
        t_end = time.perf_counter()
        samples = np.array([s for w in workers for s in w.done], dtype=np.float64).reshape(-1, 2)
        completions = np.sort(samples[:, 0])
        in_window = (samples[:, 0] >= t_mig) & (samples[:, 0] <= t_done + 1.0)
        window = samples[in_window]
        gaps = np.diff(completions[(completions >= t_mig) & (completions <= t_done + 1.0)])
        return {
            "clients": clients,
            "memory": memory,
            "migration": {
                "status": info.get("status"),
                "total_time_ms": info.get("total-time"),
                "downtime_ms": info.get("downtime"),
                "setup_time_ms": info.get("setup-time"),
            },
            "before": _phase(samples, t_start, t_mig),
            "during": _phase(samples, t_mig, t_done),
            "after": _phase(samples, t_done, t_end),
            # Requests that completed from the migrate command to a second after completion.
            "longest_client_stall_ms": round(float(window[:, 1].max()) * 1e3, 3)
            if len(window)
            else None,
            "longest_service_gap_ms": round(float(gaps.max()) * 1e3, 3) if len(gaps) else None,
            "errors": sum(len(w.errors) for w in workers),
            "error_samples": [e for w in workers for e in w.errors][:3],
            "wrong_values": sum(w.wrong for w in workers),
            "destination_requests": dst.cmd("x-query-serve")["requests"],
        }


def _print(r: dict[str, Any]) -> None:
    m = r["migration"]
    print(f"livemig bench service: kvserver, {r['memory']}, {r['clients']} closed-loop clients")
    print(f"migration {m['status']}: total {m['total_time_ms']} ms, "
          f"livemig-reported downtime {m['downtime_ms']} ms")  # fmt: skip
    print(f"{'phase':8} {'s':>6} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name in ("before", "during", "after"):
        p = r[name]
        print(f"{name:8} {p['seconds']:6.2f} {p['rps']:9.1f} {p['p50_ms']!s:>8} "
              f"{p['p99_ms']!s:>8} {p['max_ms']!s:>8}")  # fmt: skip
    print(f"around the migration, longest stall a client saw: {r['longest_client_stall_ms']} ms "
          f"(longest gap in all completions {r['longest_service_gap_ms']} ms) vs "
          f"reported downtime {m['downtime_ms']} ms")  # fmt: skip
    print(f"errors {r['errors']}, wrong values {r['wrong_values']}")


def main(args: argparse.Namespace) -> int:
    result = run_bench(args.memory, args.clients, args.keys, args.phase, args.tracker)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result)
    return 0 if result["errors"] == 0 and result["wrong_values"] == 0 else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "service", help="kvserver under closed-loop RESP clients: req/s and latency before, "
        "during and after a migration, longest client stall beside the reported downtime",
    )  # fmt: skip
    p.add_argument("--memory", default="64M", help="guest RAM (64M)")
    p.add_argument("--clients", type=int, default=4, help="closed-loop clients (4)")
    p.add_argument("--keys", type=int, default=10000, help="key space per client (10000)")
    p.add_argument("--phase", type=float, default=3.0, help="seconds before and after (3)")
    p.add_argument("--tracker", default="auto", help="livemig x-dirty-tracker")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.set_defaults(func=main)
