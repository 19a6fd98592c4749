"""``livemig bench postcopy``: page-request latency, blocktime, total time and guest progress.

One process holds a memstress source and an ``inmigrate`` destination (both machines here; the
destination's vCPUs fault without the GIL, and nothing reads its RAM before the end). For each
configuration (preempt off/on x prefetch window) the source pre-copies one pass over TCP
loopback, switches to post-copy, and the destination's statistics give the request latency
percentiles (targets: p50 <= 200 us, p99 <= 2 ms) and blocktime. Guest progress during
post-copy is memstress passes per second on the destination between switch-over and the end,
as a share of the rate measured on the source before the migration (the in-run baseline).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from livemig.machine import Machine, RAMBlockSpec, abi
from livemig.machine.runstate import RunState
from livemig.migration.manager import MigrationManager
from livemig.migration.state import MigrationStatus
from livemig.units import parse_size

DONE = frozenset({MigrationStatus.COMPLETED, MigrationStatus.FAILED})


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("postcopy", help="post-copy request latency, blocktime, guest progress")
    p.add_argument("--memory", default="128M", help="guest RAM (default 128M)")
    p.add_argument("--ws", default="96M", help="memstress working set (default 96M)")
    p.add_argument("--smp", type=int, default=2)
    p.add_argument("--prefetch", default="0,16", help="prefetch windows to try (pages)")
    p.add_argument("--postcopy-bandwidth", default="256M", help="max-postcopy-bandwidth")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def _passes(m: Machine) -> int:
    words = abi.GUEST_REPORT.unpack(bytes(m.read_guest(abi.GUEST_REPORT_ADDR,
                                                       abi.GUEST_REPORT.size)))  # fmt: skip
    if words[0] != abi.REPORT_MAGIC:
        return -1
    return sum(words[5 : 5 + words[4]])


def measure(image: Any, ram: int, ws: str, smp: int, preempt: bool, prefetch: int,
            pc_bw: int) -> dict[str, Any]:  # fmt: skip
    """One post-copy migration; its figures."""
    src = Machine([RAMBlockSpec("pc.ram", ram)], smp=smp)
    dst = Machine([RAMBlockSpec("pc.ram", ram)], smp=smp)
    try:
        src.load_guest(image.data, f"ws={ws} rate=0")
        src.start()
        deadline = time.monotonic() + 60
        while _passes(src) < smp:  # every slice filled and swept once
            if time.monotonic() > deadline:
                raise TimeoutError("memstress did not start")
            time.sleep(0.01)
        p0, t0 = _passes(src), time.monotonic()
        time.sleep(1.0)
        base_rate = (_passes(src) - p0) / (time.monotonic() - t0)
        dst.set_runstate(RunState.INMIGRATE)
        sm, dm = MigrationManager(src), MigrationManager(dst)
        caps = [{"capability": "postcopy-ram", "state": True},
                {"capability": "postcopy-blocktime", "state": True},
                {"capability": "postcopy-preempt", "state": preempt}]  # fmt: skip
        for m in (sm, dm):
            m.set_capabilities(caps)
            m.set_parameters({"max-postcopy-bandwidth": pc_bw, "x-postcopy-prefetch": prefetch})
        uri = dm.incoming_start("tcp:127.0.0.1:0")
        t_start = time.monotonic()
        sm.migrate(uri)
        out = sm.outgoing
        assert out is not None
        while out.stats.dirty_sync_count < 1 and sm.source.status not in DONE:
            time.sleep(0.005)
        out.postcopy.start_postcopy()
        dm.dest.wait_for(frozenset({MigrationStatus.POSTCOPY_ACTIVE}) | DONE, 60)
        sm.source.wait_for(frozenset({MigrationStatus.POSTCOPY_ACTIVE}) | DONE, 60)
        t_switch = time.monotonic()
        passes_switch = _passes(src)  # the source guest is stopped now
        if not dm.dest.wait_for(DONE, 120) or not sm.source.wait_for(DONE, 120):
            raise TimeoutError("post-copy did not finish in 120 s")
        t_end = time.monotonic()
        dq, sq = dm.query_migrate(), sm.query_migrate()
        if dq["status"] != "completed":
            raise RuntimeError(f"post-copy failed: {dq.get('error-desc')}")
        passes_end = _passes(dst)  # every page is there and unregistered now
        pc = dq["x-postcopy"]
        rate = (passes_end - passes_switch) / (t_end - t_switch)
        return {
            "preempt": preempt,
            "prefetch": prefetch,
            "total-s": round(t_end - t_start, 3),
            "postcopy-s": round(t_end - t_switch, 3),
            "downtime-ms": sq.get("downtime"),
            "requests": pc["requests"],
            "pushed": sq["x-postcopy"]["pushed-pages"],
            "requested-sent": sq["x-postcopy"]["requested-pages-sent"],
            "latency": pc["latency"],
            "blocktime-ms": pc["blocktime-ms"],
            "vcpu-blocktime-ms": pc["vcpu-blocktime-ms"],
            "progress-share": round(rate / base_rate, 3) if base_rate > 0 else None,
        }
    finally:
        src.close()
        dst.close()


def run(args: argparse.Namespace) -> int:
    from livemig.guests import build_guest

    image = build_guest("memstress")
    ram = parse_size(args.memory, "--memory")
    pc_bw = parse_size(args.postcopy_bandwidth, "--postcopy-bandwidth")
    results = []
    for preempt in (False, True):
        for prefetch in (int(x) for x in args.prefetch.split(",")):
            results.append(measure(image, ram, args.ws, args.smp, preempt, prefetch, pc_bw))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    t = Table(title=f"post-copy, {args.memory} guest, memstress ws={args.ws}, TCP loopback")
    for col in ("preempt", "prefetch", "requests", "p50 us", "p90 us", "p99 us", "max us",
                "blocktime ms", "post-copy s", "total s", "guest progress"):  # fmt: skip
        t.add_column(col, justify="right")
    for r in results:
        lat = r["latency"]
        t.add_row(str(r["preempt"]), str(r["prefetch"]), str(r["requests"]),
                  *(str(lat.get(k, "-")) for k in ("p50-us", "p90-us", "p99-us", "max-us")),
                  str(r["blocktime-ms"]), str(r["postcopy-s"]), str(r["total-s"]),
                  f"{r['progress-share']:.0%}" if r["progress-share"] is not None else "-")  # fmt: skip
    Console().print(t)
    print("targets: p50 <= 200 us, p99 <= 2000 us; guest progress = share of its undisturbed rate")
    return 0
