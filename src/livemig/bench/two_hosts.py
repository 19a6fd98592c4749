"""``livemig bench throughput --two-hosts``: livemig and QEMU across a shaped link (issue 23).

Two hosts on one machine (``livemig.netns.TwoHosts``): network namespaces a and b joined by a
veth pair with a ``tc tbf`` rate (``--rate``, a comma-separated list runs each link in turn).
Every run starts a fresh source in a and a fresh ``-incoming defer`` destination in b and
migrates over ``tcp:<b's address>``, with the same options on both VMs: multifd, 2 channels,
``multifd-compression`` none or zstd (level 1, both defaults), ``max-bandwidth`` 0 (no limit),
``downtime-limit`` 300 ms, neither destination's RAM preallocated. Total time, downtime and
bytes on the wire come from each source's own ``query-migrate``; CPU seconds are both processes'
(vCPUs included).

The guests hold the same memory: 1 GiB of RAM, 2 vCPUs each, a working set (``--ws``) of which
``--comp`` percent of the pages repeat every 8 words (compressible) and the rest never repeat
(incompressible), the rest of RAM never written (zero pages), then one page after another
dirtied at 2000 pages/s. livemig runs memstress (``ws= rate= comp=``; the bench waits until it
has filled its working set, asking ``x-guest-check``); QEMU runs the baseline guest
(``qemu_baseline``: Debian's kernel and the dirtier, ``dirty=WS,RATE,COMP``, which fills its
working set with memstress's very pages before it says "ready"). QEMU's guest also holds its
kernel's own memory, so it has a few dozen MB more to send: the wire column shows it.

Rounds interleave the two (livemig, QEMU, livemig, QEMU ...) so both see the same machine; the
table shows the median of ``--repeat`` rounds with every round's range, and livemig / QEMU. After
each migration the destination guest is checked: memstress's invariant (``x-guest-check``) for
livemig, a heartbeat and no kernel oops for QEMU; a failed check is an error, not a figure.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from livemig.bench.common import (
    Workdir,
    drive_migration,
    process_cpu,
    set_migration,
    table_console,
    wait_migration_end,
)
from livemig.errors import MigrationError, UsageError
from livemig.units import parse_size

DIRTY_PAGES_S = 2000  # memstress rate= (all vCPUs), the dirtier's rate in pages/s
SMP = 2
CHANNELS = 2
DOWNTIME_LIMIT_MS = 300
FILL_TIMEOUT = 180.0
_BEAT = re.compile(r"dirtier: beat \d+ written (\d+)")


def _params(method: str) -> dict[str, Any]:
    return {"multifd-channels": CHANNELS, "multifd-compression": method}


def _fill_wait(src: Any, timeout: float = FILL_TIMEOUT) -> None:
    """Until memstress has filled its whole working set (paused for each look: the check
    holds only at an instruction boundary)."""
    deadline = time.monotonic() + timeout
    while True:
        src.qmp("stop")
        try:
            report = src.qmp("x-guest-check")
        finally:
            src.qmp("cont")
        if not report["ok"]:
            raise MigrationError(f"memstress before migration: {report['problems'][:3]}")
        if not report["filling"]:
            return
        if time.monotonic() > deadline:
            raise MigrationError(f"memstress did not fill its working set in {timeout:g} s")
        time.sleep(0.5)


def livemig_once(hosts: Any, tmp: Path, port: int, size: str, ws: str, comp: int, method: str,
                 checked: bool) -> dict[str, Any]:  # fmt: skip
    """One livemig migration, memstress source in namespace a, destination in b."""
    from livemig import procs

    uri = f"tcp:{hosts.addr_b}:{port}"
    src = procs.source(tmp, guest="memstress", memory=size, smp=SMP,
                       append=f"ws={ws} rate={DIRTY_PAGES_S} comp={comp}",
                       prefix=hosts.prefix_a())  # fmt: skip
    dst = procs.destination(tmp, memory=size, smp=SMP, incoming="defer",
                            prefix=hosts.prefix_b())  # fmt: skip
    try:
        src.wait_ready()
        dst.wait_ready()
        caps = [
            {"capability": "multifd", "state": True},
            {"capability": "x-checksums", "state": checked},
        ]
        for p in (src, dst):
            p.qmp("migrate-set-capabilities", capabilities=caps)
            p.qmp("migrate-set-parameters", **_params(method))
        dst.qmp("migrate-incoming", uri=uri)
        _fill_wait(src)
        src.qmp("migrate-set-parameters", **{"max-bandwidth": 0,
                                            "downtime-limit": DOWNTIME_LIMIT_MS})  # fmt: skip
        load = os.getloadavg()[0]
        cpu0 = process_cpu(src.pid) + process_cpu(dst.pid)
        src.qmp("migrate", uri=uri)
        q = wait_migration_end(functools.partial(src.qmp, "query-migrate"), 300,
                               "two-hosts migration", interval=0.05)  # fmt: skip
        if q["status"] != "completed":
            raise MigrationError(f"two-hosts migration {q['status']}: {q.get('error-desc')}")
        cpu = process_cpu(src.pid) + process_cpu(dst.pid) - cpu0
        _wait_dst_running(dst)
        dst.qmp("stop")
        report = dst.qmp("x-guest-check")
        if not report["ok"]:
            raise MigrationError(f"livemig destination guest after migration: "
                                 f"{report['problems'][:3]}")  # fmt: skip
        return {"vm": "livemig", "method": method, "checksums": checked,
                "total_ms": q["total-time"], "downtime_ms": q.get("downtime"),
                "setup_ms": q.get("setup-time"), "transferred": q["ram"]["transferred"],
                "normal": q["ram"]["normal"], "cpu_s": cpu, "load": load}  # fmt: skip
    finally:
        src.stop()
        dst.stop()


def _wait_dst_running(dst: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while dst.qmp("query-status")["status"] != "running":
        if time.monotonic() > deadline:
            raise MigrationError("livemig destination not running after the migration")
        time.sleep(0.05)


def qemu_once(hosts: Any, port: int, memory: int, ws_mib: int, comp: int, method: str,
              kernel: Path, initrd: Path) -> dict[str, Any]:  # fmt: skip
    """One QEMU migration of the baseline guest, source in namespace a, destination in b."""
    from livemig.bench.qemu_baseline import BOOT_TIMEOUT, dirty_arg, qemu_label, qemu_pair

    append = f"console=ttyS0 quiet panic=-1 {dirty_arg(ws_mib, DIRTY_PAGES_S, comp)}"
    with Workdir() as wd:
        src, dst = qemu_pair(wd, memory, kernel, initrd, append, smp=SMP,
                             prefixes=(hosts.prefix_a(), hosts.prefix_b()))  # fmt: skip
        try:
            for p in (src, dst):
                p.wait_qmp(20.0)
                p.connect_console()
            t_ready = src.wait_line(lambda ln: ln.startswith("dirtier: ready"), BOOT_TIMEOUT)
            # the dirtying loop under way (its first heartbeat), as memstress's is
            src.wait_line(lambda ln: ln.startswith("dirtier: beat"), 10.0, since=t_ready)
            caps = {"multifd": True}
            with dst.qmp() as dq:
                set_migration(dq, caps, _params(method))
            load = os.getloadavg()[0]
            cpu0 = process_cpu(src.pid) + process_cpu(dst.pid)
            fig, samples = drive_migration(
                src, dst, port=port, host=hosts.addr_b, caps=caps,
                params={**_params(method), "max-bandwidth": 0,
                        "downtime-limit": DOWNTIME_LIMIT_MS},
                timeout=300.0,
            )  # fmt: skip
            cpu = process_cpu(src.pid) + process_cpu(dst.pid) - cpu0
            if fig.status != "completed":
                raise MigrationError(f"{qemu_label()} two-hosts migration {fig.status}: "
                                     f"{dst.stderr_tail()}")  # fmt: skip
            after = time.monotonic()
            dst.wait_line(lambda ln: ln.startswith("dirtier: beat"), 15.0, since=after)
            bad = [ln for _, ln in dst.console_lines()
                   if any(w in ln for w in ("Oops", "Kernel panic", "BUG:"))]  # fmt: skip
            if bad:
                raise MigrationError(f"{qemu_label()} destination kernel: {bad[0]}")
            normal = samples[-1][1].get("ram", {}).get("normal") if samples else None
            return {"vm": qemu_label(), "method": method, "checksums": None,
                    "total_ms": fig.total_ms, "downtime_ms": fig.downtime_ms,
                    "setup_ms": fig.setup_ms, "transferred": fig.transferred,
                    "normal": normal, "cpu_s": cpu, "load": load,
                    "guest_pages_per_s": beat_rate(src.console_lines())}  # fmt: skip
        finally:
            src.stop()
            dst.stop()


def beat_rate(lines: Sequence[tuple[float, str]]) -> float | None:
    """Pages a second the dirtier wrote, from its heartbeats' counts and host arrival times:
    that TCG kept up with the rate asked (memstress's pacing is checked by its own tests)."""
    beats = [(t, int(m.group(1))) for t, ln in lines if (m := _BEAT.match(ln))]
    if len(beats) < 2 or beats[-1][0] <= beats[0][0]:
        return None
    return (beats[-1][1] - beats[0][1]) / (beats[-1][0] - beats[0][0])


def two_hosts(size: str, ws: str, rate: str, methods: list[str], repeat: int, comp: int = 50,
              checksums: tuple[bool, ...] = (True,), qemu: bool = True
              ) -> list[dict[str, Any]]:  # fmt: skip
    """Every run over one ``tc tbf`` link of ``rate`` (root only): per method, ``repeat`` rounds
    of livemig (once per ``checksums`` setting, x-checksums) then QEMU (with ``qemu``)."""
    from livemig.netns import TwoHosts

    TwoHosts.check()  # a clear "needs root" before anything starts
    kernel = initrd = None
    if qemu:
        from livemig.bench.qemu_baseline import build_initramfs, fetch_kernel

        kernel, initrd = fetch_kernel(), build_initramfs()
    memory = parse_size(size, "--size")
    ws_bytes = parse_size(ws, "--ws")
    if ws_bytes % (1 << 20) or ws_bytes >= memory:
        raise UsageError(f"--ws {ws}: whole MiB, less than the guest's {size}")
    out: list[dict[str, Any]] = []
    with TwoHosts(rate=rate) as hosts, tempfile.TemporaryDirectory(prefix="lm-2h-") as tmp:
        for method in methods:
            for rnd in range(repeat):
                runs = []
                for checked in checksums:  # a port of its own for every run: no TIME_WAIT
                    runs.append(livemig_once(hosts, Path(tmp), 4400 + len(out) + len(runs),
                                             size, ws, comp, method, checked))  # fmt: skip
                if qemu:
                    assert kernel is not None and initrd is not None
                    runs.append(qemu_once(hosts, 4400 + len(out) + len(runs), memory,
                                          ws_bytes >> 20, comp, method, kernel, initrd))  # fmt: skip
                out += [{"rate": rate, "round": rnd, **r} for r in runs]
    return out


def _median_of(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    xs = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(xs) if xs else None


def summarize(rows: Sequence[dict[str, Any]], qemu_label: str | None) -> list[dict[str, Any]]:
    """One line per (link, method, checksums) of livemig: medians and ranges of both VMs and
    livemig / QEMU total time (medians); the QEMU figures are those of the same link and
    method (QEMU has no checksums)."""
    lines = []
    keys = list(dict.fromkeys((r["rate"], r["method"], r["checksums"]) for r in rows
                              if r["vm"] == "livemig"))  # fmt: skip
    for rate, method, checked in keys:
        mine = [r for r in rows if r["vm"] == "livemig" and r["rate"] == rate
                and r["method"] == method and r["checksums"] == checked]  # fmt: skip
        theirs = [r for r in rows if qemu_label is not None and r["vm"] == qemu_label
                  and r["rate"] == rate and r["method"] == method]  # fmt: skip
        line: dict[str, Any] = {"rate": rate, "method": method, "checksums": checked,
                                "runs": len(mine), "qemu_runs": len(theirs)}  # fmt: skip
        for who, rs in (("livemig", mine), ("qemu", theirs)):
            for key in ("total_ms", "downtime_ms", "transferred", "cpu_s"):
                line[f"{who}_{key}"] = _median_of(rs, key)
            totals = [r["total_ms"] for r in rs]
            line[f"{who}_total_range"] = (min(totals), max(totals)) if totals else None
            # bytes/s on the wire over the whole migration: what the link gave each
            rates = [r["transferred"] * 1000 / r["total_ms"] for r in rs if r["total_ms"]]
            line[f"{who}_wire_rate"] = statistics.median(rates) if rates else None
        q = line["qemu_total_ms"]
        line["ratio"] = line["livemig_total_ms"] / q if q else None
        lines.append(line)
    return lines


def _cell(v: float | None, fmt: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v / scale, fmt)


def _both(ln: dict[str, Any], key: str, fmt: str, scale: float = 1.0) -> str:
    """ "livemig / QEMU" of one figure."""
    return f"{_cell(ln['livemig_' + key], fmt, scale)} / {_cell(ln['qemu_' + key], fmt, scale)}"


def _total(ln: dict[str, Any], who: str) -> str:
    """A median total time in seconds with the range of every round."""
    rng = ln[f"{who}_total_range"]
    cell = _cell(ln[f"{who}_total_ms"], ".2f", 1000)
    return cell + (f" ({rng[0] / 1000:.2f}-{rng[1] / 1000:.2f})" if rng else "")


def table(lines: Sequence[dict[str, Any]], label: str | None, size: str, ws: str, comp: int,
          repeat: int) -> Any:  # fmt: skip
    """The rich table of ``summarize``'s lines; every QEMU label names ``label``'s version."""
    from rich.table import Table

    q = label or "QEMU (not run: --no-qemu)"
    t = Table(title=f"multifd, {CHANNELS} channels, over a tc tbf link between two network "
                    f"namespaces: {size} guests with {SMP} vCPUs each, working set {ws} "
                    f"({comp}% compressible) dirtied at {DIRTY_PAGES_S} pages/s; livemig "
                    f"memstress, {q} Linux + dirtier (TCG); median of {repeat} interleaved "
                    f"rounds (range)")  # fmt: skip
    pair = f"livemig / {q}"
    cols = ["link", "method", "livemig checksums", "livemig total s", f"{q} total s",
            f"total time {pair}", f"downtime ms {pair}", f"wire MB {pair}",
            f"wire MB/s {pair}", f"CPU s {pair}"]  # fmt: skip
    for col in cols:
        t.add_column(col, justify="right")
    for ln in lines:
        t.add_row(ln["rate"], ln["method"], "on" if ln["checksums"] else "off",
                  _total(ln, "livemig"), _total(ln, "qemu"),
                  "-" if ln["ratio"] is None else f"{ln['ratio']:.2f}",
                  _both(ln, "downtime_ms", ".0f"), _both(ln, "transferred", ".0f", 1e6),
                  _both(ln, "wire_rate", ".0f", 1e6), _both(ln, "cpu_s", ".1f"))  # fmt: skip
    return t


def run(args: argparse.Namespace) -> int:
    """``bench throughput --two-hosts``."""
    from livemig.bench import qemu_baseline
    from livemig.bench.throughput import COMPRESS_DEFAULT
    from livemig.netns import tc_rate_bytes

    methods = [c for c in args.compress.split(",") if c]
    if args.compress == COMPRESS_DEFAULT or not methods:  # the first table's: the two
        methods = ["none", "zstd"]
    checks = {"on": (True,), "off": (False,), "both": (False, True)}[args.checksums]
    repeat = max(1, args.repeat)
    rates = [r.strip() for r in args.rate.split(",") if r.strip()]
    for r in rates:
        tc_rate_bytes(r)  # a bad rate is refused before anything starts
    size = args.size if args.size != "4G" else "1G"  # throughput's default is the first table's
    use_qemu = not getattr(args, "no_qemu", False)
    label = qemu_baseline.qemu_label() if use_qemu else None
    if use_qemu and not qemu_baseline.qemu_available():
        raise UsageError("--two-hosts runs QEMU beside livemig and no QEMU is installed "
                         "(./dev setup installs QEMU 10.0, or set LIVEMIG_QEMU); --no-qemu "
                         "measures livemig alone")  # fmt: skip
    rows: list[dict[str, Any]] = []
    loads = [os.getloadavg()[0]]
    for rate in rates:
        rows += two_hosts(size, args.ws, rate, methods, repeat, args.comp, checks, use_qemu)
    loads.append(os.getloadavg()[0])
    lines = summarize(rows, label)
    t = table(lines, label, size, args.ws, args.comp, repeat)
    console = table_console()
    console.print(t)
    run_loads = [r["load"] for r in rows]
    console.print(f"load average (1 min) {loads[0]:.2f} at the start, {loads[1]:.2f} at the end,"
                  f" {min(run_loads):.2f}-{max(run_loads):.2f} as runs started (this machine's "
                  f"{os.cpu_count()} cores)")  # fmt: skip
    if not use_qemu:
        console.print("QEMU not run (--no-qemu): livemig alone")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"qemu": label, "size": size, "ws": args.ws, "comp": args.comp, "smp": SMP,
             "channels": CHANNELS, "dirty_pages_per_s": DIRTY_PAGES_S,
             "downtime_limit_ms": DOWNTIME_LIMIT_MS, "repeat": repeat,
             "load": loads, "summary": lines, "runs": rows}, indent=2))  # fmt: skip
    return 0
