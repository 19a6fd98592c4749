"""``livemig bench service``: what the clients of a migrating service feel.

Two ``livemig run`` processes (source with ``--guest kvserver --serve``, destination with
``--incoming`` only) and a plain QMP ``migrate``: the clients follow the guest by themselves
(``livemig.service``). Closed-loop RESP clients (GET/SET on random keys, one request in flight
each) run through three phases: ``before`` (a few seconds), ``during`` (from the ``migrate``
command to completion) and ``after``. For each phase: requests per second and latency p50 / p99
/ max. Beside them the longest stall any client saw (its slowest request, the downtime users
actually feel) and the longest gap in the whole service's completions, next to the downtime
livemig reports in ``query-migrate``. Errors and wrong values are counted: both must be zero.

Then ``redis-benchmark`` (when installed) with its default test set (strings, lists, sets,
hashes, sorted sets, LRANGE, MSET) runs three times at the source's address, on a second pair
of processes: ``before`` (the guest on the source), ``during`` (the migration starts once the
run is under way) and ``after`` (the guest on the destination). For each run: the tests' median
p50, their largest p99 and max (redis-benchmark's own figures, ``--csv``), its errors (must be
0), and for ``during`` the test that saw the largest max.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import shutil
import subprocess
import threading
import time
from typing import Any

import numpy as np

from livemig.service import RespClient, RespError
from livemig.testing.procs import LivemigProcess, ProcHarness, free_tcp_port, wait_until


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
        dst = h.destination(f"tcp:127.0.0.1:{p2}")

        wait_until(lambda: _answers(p1), 30, "kvserver answering")
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


def _answers(port: int) -> bool:
    try:
        with RespClient("127.0.0.1", port, timeout=5) as c:
            return c.call("PING") == "PONG"
    except OSError:
        return False


def _redis_benchmark(port: int, requests: int, clients: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "--csv", "-n", str(requests),
         "-c", str(clients)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _rb_result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """redis-benchmark's --csv report summed up: median p50, largest p99 and max."""
    out, err = proc.communicate(timeout=600)
    rows = list(csv.DictReader(io.StringIO(out)))
    errors = [line for line in (out + err).splitlines() if "error" in line.lower()]
    if proc.returncode != 0 and not errors:
        errors = [f"redis-benchmark exited with {proc.returncode}: {err.strip()[-200:]}"]
    if not rows:
        return {"tests": 0, "errors": len(errors) or 1, "error_samples": errors[:3]}
    worst = max(rows, key=lambda r: float(r["max_latency_ms"]))
    return {
        "tests": len(rows),
        "p50_ms": round(float(np.median([float(r["p50_latency_ms"]) for r in rows])), 3),
        "p99_ms": max(float(r["p99_latency_ms"]) for r in rows),
        "max_ms": float(worst["max_latency_ms"]),
        "worst_test": worst["test"],
        "errors": len(errors),
        "error_samples": errors[:3],
    }


def run_redis_benchmark(memory: str = "64M", requests: int = 1000, clients: int = 4
                        ) -> dict[str, Any] | None:  # fmt: skip
    """redis-benchmark's default tests before, during and after a migration (None when
    redis-benchmark is not installed)."""
    if shutil.which("redis-benchmark") is None:
        return None
    with ProcHarness(memory=memory, smp=1) as h:
        port = free_tcp_port()
        src = h.source(guest="kvserver", append="", extra=["--serve", f"tcp:127.0.0.1:{port}"])
        dst = h.destination(f"tcp:127.0.0.1:{free_tcp_port()}")
        wait_until(lambda: _answers(port), 30, "kvserver answering")
        out: dict[str, Any] = {"requests": requests, "clients": clients}
        out["before"] = _rb_result(_redis_benchmark(port, requests, clients))
        proc = _redis_benchmark(port, requests, clients)
        start = _served(src)
        wait_until(lambda: _served(src) > start + requests, 60, "redis-benchmark under way")
        src.cmd("migrate", uri=dst.incoming)
        info = src.wait_migration(timeout=120)
        still_running = proc.poll() is None  # else the run did not span the whole migration
        out["migration"] = {"status": info.get("status"), "downtime_ms": info.get("downtime")}
        out["during"] = _rb_result(proc)
        out["during"]["overlapped_migration"] = still_running
        out["after"] = _rb_result(_redis_benchmark(port, requests, clients))
        return out


def _served(proc: LivemigProcess) -> int:
    return int(proc.cmd("x-query-serve")["requests"])


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
    rb = r.get("redis_benchmark")
    if rb is None:
        print("redis-benchmark: not installed (apt package redis-tools): skipped")
        return
    m = rb["migration"]
    print(f"\nredis-benchmark default tests, -n {rb['requests']} -c {rb['clients']}, at the "
          f"source's address; migration {m['status']}, downtime {m['downtime_ms']} ms")  # fmt: skip
    print(f"{'run':8} {'tests':>5} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>6}")
    for name in ("before", "during", "after"):
        p = rb[name]
        print(f"{name:8} {p['tests']:5} {p.get('p50_ms')!s:>8} {p.get('p99_ms')!s:>8} "
              f"{p.get('max_ms')!s:>8} {p['errors']:6}")  # fmt: skip
    print(f"during: the largest max was in {rb['during'].get('worst_test')}"
          + ("" if rb["during"].get("overlapped_migration") else
             " (the run ended before the migration did: raise --redis-benchmark)"))  # fmt: skip


def main(args: argparse.Namespace) -> int:
    result = run_bench(args.memory, args.clients, args.keys, args.phase, args.tracker)
    if args.redis_benchmark:
        result["redis_benchmark"] = run_redis_benchmark(args.memory, args.redis_benchmark)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result)
    rb = result.get("redis_benchmark") or {}
    rb_errors = sum(rb[k]["errors"] for k in ("before", "during", "after") if k in rb)
    return 0 if result["errors"] == 0 and result["wrong_values"] == 0 and not rb_errors else 1


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
    p.add_argument("--redis-benchmark", type=int, default=1000, metavar="N",
                   help="requests per redis-benchmark test (default tests, 3 runs: before, "
                   "during and after a migration); 0 skips it (1000)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.set_defaults(func=main)
