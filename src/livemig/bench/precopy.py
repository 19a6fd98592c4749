"""``livemig bench precopy``: pre-copy live migration between two processes, beside real QEMU
(10.0 by default; the version measured is in every label and in the JSON's ``qemu``).

The figures of issue 4's "Speed and memory", each beside a baseline measured in the same run:

- **idle**: total time to migrate an idle guest of each ``--sizes`` over loopback; livemig's
  ``idle`` guest (source RAM never touched beyond the guest's own pages) beside QEMU with
  the Debian-kernel guest at dirty rate 0 (qemu_baseline.py). Target <= 0.5x.
- **throughput**: bytes/s livemig sends during pre-copy while memstress (``rate=0``, flat out)
  keeps its working set dirty and the migration cannot converge (downtime-limit 1 ms), over a
  ``--window`` of seconds then cancelled; as a ratio to one raw Python loopback TCP stream
  (1 MiB ``sendall``) in the same run. Target >= 0.8. For context, also as a ratio to the same
  TCP stream measured while that guest runs flat out beside it (the cores it leaves), and to
  TCP moving cold guest-sized memory into memory like a destination's guest RAM beside it
  (``throughput.GuestMemoryTcp``): the traffic of a migration with no protocol at all, so
  its rate over the first baseline (``ceiling``) is the most any pre-copy can reach here.
  Then the same window with ``--multifd`` channels (2): the faster path QEMU has for it.
- **brownout**: in that same run, memstress's page-write rate during pre-copy as a share of its
  rate in the seconds just before (pass marks on the console, host-time-stamped), with the
  ``uffd-wp-async`` tracker. Target >= 0.9.
- **brownout, pinned**: the same unlimited window with the vCPUs on CPUs of their own and both
  sides' migration threads on the rest, pinned by the thread ids QMP reports
  (``query-cpus-fast``, ``query-migrationthreads``) as libvirt's ``vcpupin`` and
  ``emulatorpin`` do. Unpinned, on this 2-core host the two migration processes take more
  than a core from a vCPU that wants a whole one, so the unpinned figure mostly measures core
  contention; pinned, it measures what tracking costs the guest. Needs more CPUs than vCPUs.
- **brownout at a bandwidth limit**: the same, unpinned, with ``max-bandwidth`` at QEMU's
  default (128 MiB/s) and at 1 Gbit/s: what tracking and sending cost the guest when the
  migration does not take a whole core.
- **downtime**: a ``--dirty-memory`` guest (1 GiB) dirtying a 256 MiB working set at each of
  ``--rates`` MiB/s (memstress ``rate=`` in pages/s = MiB/s x 256; the QEMU guest's dirtier
  the same), with each ``--limits`` downtime-limit: the blackout (source STOP event to
  destination RESUME event) must stay below the limit and below QEMU's for the same case.
- **RSS**: peak RSS (VmHWM) of livemig's source and destination in every run, as a share of
  guest RAM. Target <= 1.15.

``--checksums on|off|both`` (default on, the command line's default): livemig's checksums
(``x-checksums``); ``both`` runs the throughput and downtime figures twice, without and with
them, one after the other in the same run, and shows them side by side with the difference
(the issue's targets: <= 3% of throughput, <= 1 ms of downtime).

Both sides run with max-bandwidth=0 (unlimited, the baseline doc's "unlimited" rows): the
default 128 MiB/s would measure the limiter, not the implementation. The livemig destination
is started with ``--prefault`` (first touch of anonymous memory costs ~5 s/GiB here, before
timing); the source is not, so pages its guest never touched stay unpopulated, as in a real
idle guest. Guest integrity is checked after every migration (the destination guest keeps
printing; ``--verify`` adds livemig's RAM hash comparison, at a cost in downtime) and a figure
from a broken migration is flagged, not compared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from livemig.bench.common import (
    GuestProcess,
    MigrationFigures,
    Workdir,
    drive_migration,
    free_port,
    loopback_tcp_throughput,
    pin_threads,
    placement,
    set_migration,
    summarize,
    table_console,
    window_throughput,
)
from livemig.errors import MigrationError, UsageError
from livemig.units import format_size, parse_size

PAGES_PER_MIB = 256
_MARK = re.compile(r"memstress: cpu(\d+) pass (\d+)")


@dataclass
class Config:
    """What to run; the defaults are the issue's figures."""

    sizes: list[int] = field(default_factory=lambda: [1 << 30, 4 << 30])
    dirty_memory: int = 1 << 30
    ws: int = 256 << 20
    rates: list[int] = field(default_factory=lambda: [50, 200])  # MiB/s
    limits: list[int] = field(default_factory=lambda: [300, 50])  # ms
    window: float = 4.0  # seconds of non-converging pre-copy for throughput and brownout
    repeat: int = 1
    smp: int = 1
    qemu: bool = True
    verify: bool = False
    tracker: str = "uffd-wp-async"
    tcp_bytes: int = 2 << 30
    timeout: float = 120.0
    # max-bandwidth values of the extra brownout runs: QEMU's default, and 1 Gbit/s
    brownout_bws: list[int] = field(default_factory=lambda: [128 << 20, 125_000_000])
    only: set[str] = field(default_factory=lambda: {"idle", "throughput", "brownout", "downtime"})
    pin: bool = True  # the extra pinned brownout run (when there are more CPUs than vCPUs)
    multifd: int = 2  # channels of the extra multifd throughput run (0: none)
    checksums: str = "on"  # x-checksums: on, off, or both (each figure without, then with)


# -- livemig processes ------------------------------------------------------------------------


def _livemig_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "livemig", *args]


def start_livemig_pair(
    wd: Workdir, memory: int, guest: str, append: str, smp: int
) -> tuple[GuestProcess, GuestProcess]:
    """A livemig source running ``guest`` and a pre-faulted destination waiting (defer)."""
    mem = str(memory)
    src = GuestProcess(_livemig_argv(
        "run", "--guest", guest, "--append", append, "--memory", mem, "--smp", str(smp),
        "--qmp", f"unix:{wd.sock('lsq')}", "--serial", "stdio"), wd.sock("lsq"),
        name="livemig source")  # fmt: skip
    dst = GuestProcess(_livemig_argv(
        "run", "--incoming", "defer", "--prefault", "--memory", mem, "--smp", str(smp),
        "--qmp", f"unix:{wd.sock('ldq')}", "--serial", "stdio"), wd.sock("ldq"),
        name="livemig destination")  # fmt: skip
    return src, dst


def run_livemig(
    cfg: Config,
    memory: int,
    guest: str,
    append: str,
    ready: Callable[[str], bool],
    params: dict[str, Any],
    window: float | None = None,
    pin: bool = False,
    multifd: int = 0,
) -> tuple[MigrationFigures, GuestProcess, list[tuple[float, dict[str, Any]]]]:
    """One livemig migration; returns the figures, the (stopped) source, the polled replies.
    ``pin``: vCPUs and migration threads on separate CPUs (``common.placement``); ``multifd``:
    that many multifd channels (0: the single pre-copy stream)."""
    caps = {"return-path": True, "x-verify": cfg.verify, "x-checksums": cfg.checksums != "off"}
    if multifd:
        caps["multifd"] = True
        params = {**params, "multifd-channels": multifd}
    params = {"x-dirty-tracker": cfg.tracker, **params}
    with Workdir() as wd:
        src, dst = start_livemig_pair(wd, memory, guest, append, cfg.smp)
        try:
            # Pre-faulting costs ~5 s/GiB; both processes build their RAM before QMP is up.
            boot = 30.0 + 10.0 * memory / (1 << 30)
            src.wait_qmp(boot)
            dst.wait_qmp(boot)
            if multifd:  # the destination must know before it listens, as with QEMU
                with dst.qmp() as q:
                    set_migration(q, {"multifd": True}, {"multifd-channels": multifd})
            where = placement(cfg.smp) if pin else None
            if pin and where is None:
                raise UsageError(f"cannot pin: {len(os.sched_getaffinity(0))} CPUs for "
                                 f"{cfg.smp} vCPUs leave none for the migration")  # fmt: skip
            if where is not None:
                # the vCPUs for the VM's lifetime (the undisturbed rate is read pinned too),
                # the migration threads once they exist
                with src.qmp() as q:
                    vcpus = pin_threads(q, where[0], where[1])
            src.wait_line(ready, 120.0)
            stop_at: Callable[[float, dict[str, Any]], bool] | None = None
            if window is not None:
                t_start = time.monotonic()
                stop_at = lambda now, info: now - t_start > window  # noqa: E731
            fig, samples = drive_migration(src, dst, port=free_port(), caps=caps, params=params,
                                           timeout=cfg.timeout, window=stop_at,
                                           pin=where)  # fmt: skip
            fig.extra["pinned"] = pin
            if where is not None:
                fig.extra["pinned-vcpus"] = vcpus
            fig.guest_ram = memory
            final = samples[-1][1] if samples else {}
            fig.extra["dirty-tracker"] = final.get("x-dirty-tracker")
            if fig.status == "completed":
                after = time.monotonic()
                try:
                    dst.wait_line(ready, 15.0, since=after)
                    fig.ok = True
                except MigrationError as exc:
                    fig.notes.append(f"destination guest silent after migration: {exc}")
                if cfg.verify:
                    fig.extra["verified"] = bool(final.get("x-verified"))
                    fig.ok = fig.ok and fig.extra["verified"]
            elif fig.status == "cancelled" and window is not None:
                fig.ok = True  # a measurement window, cancelled on purpose
        finally:
            src.stop()
            dst.stop()
        fig.src_rss, fig.dst_rss = src.peak_rss, dst.peak_rss
    return fig, src, samples


def _ready_line(prefix: str) -> Callable[[str], bool]:
    return lambda ln: ln.startswith(prefix)


# -- scenarios --------------------------------------------------------------------------------


def bench_idle(cfg: Config, size: int, port: int | None = None) -> dict[str, Any]:
    """Idle guest of ``size``: livemig beside QEMU (dirty rate 0), ``cfg.repeat`` times each."""
    params = {"max-bandwidth": 0}
    runs: dict[str, list[MigrationFigures]] = {"livemig": [], "qemu": []}
    for _ in range(cfg.repeat):
        fig, _, _ = run_livemig(cfg, size, "idle", "", _ready_line("idle: heartbeat"), params)
        runs["livemig"].append(fig)
        if cfg.qemu:
            from livemig.bench.qemu_baseline import run_qemu_migration

            runs["qemu"].append(run_qemu_migration(size, 0, 0, params=params,
                                                   port=port or free_port()))  # fmt: skip
    return {"scenario": "idle", "size": size, **_pair(runs, "total_ms")}


def bench_downtime(cfg: Config, rate: int, limit: int) -> dict[str, Any]:
    """``cfg.dirty_memory`` guest dirtying ``cfg.ws`` at ``rate`` MiB/s, downtime-limit ``limit``."""
    params = {"max-bandwidth": 0, "downtime-limit": limit}
    ws_mib = cfg.ws >> 20
    append = f"ws={ws_mib}M rate={rate * PAGES_PER_MIB}"
    runs: dict[str, list[MigrationFigures]] = {"livemig": [], "qemu": []}
    for _ in range(cfg.repeat):
        fig, _, _ = run_livemig(cfg, cfg.dirty_memory, "memstress", append,
                                _ready_line("memstress: cpu0 pass"), params)  # fmt: skip
        runs["livemig"].append(fig)
        if cfg.qemu:
            from livemig.bench.qemu_baseline import run_qemu_migration

            runs["qemu"].append(run_qemu_migration(cfg.dirty_memory, ws_mib, rate, params=params,
                                                   port=free_port()))  # fmt: skip
    out = {"scenario": "downtime", "size": cfg.dirty_memory, "rate_mib_s": rate,
           "limit_ms": limit, **_pair(runs, "blackout_ms")}  # fmt: skip
    out["livemig_downtime_ms"] = summarize([f.downtime_ms for f in runs["livemig"]])
    out["qemu_downtime_ms"] = summarize([f.downtime_ms for f in runs["qemu"]])
    return out


def pass_rate(lines: list[tuple[float, str]], t0: float, t1: float) -> float | None:
    """Passes per host second summed over vCPUs, from memstress marks stamped in [t0, t1]."""
    per_cpu: dict[int, list[tuple[float, int]]] = {}
    for t, ln in lines:
        m = _MARK.search(ln)
        if m and t0 <= t <= t1:
            per_cpu.setdefault(int(m.group(1)), []).append((t, int(m.group(2))))
    rates = []
    for marks in per_cpu.values():
        if len(marks) < 2 or marks[-1][0] <= marks[0][0]:
            return None
        rates.append((marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0]))
    return sum(rates) if rates else None


def _window_runs(cfg: Config, max_bw: int, pin: bool = False, multifd: int = 0
                 ) -> tuple[list[MigrationFigures], list, list]:  # fmt: skip
    """``cfg.repeat`` never-converging pre-copy windows at ``max_bw``: figures, throughputs, and
    brownouts (write rate during pre-copy / the rate in the seconds before ``migrate``)."""
    params = {"max-bandwidth": max_bw, "downtime-limit": 1}
    append = f"ws={cfg.ws >> 20}M rate=0 mark_ms=100"
    undisturbed_s = 2.0
    tputs, brown = [], []
    figs: list[MigrationFigures] = []
    for _ in range(cfg.repeat):
        # The undisturbed rate is read over the seconds before ``migrate``: wait that long.
        ready = _settled(_ready_line("memstress: cpu0 pass"), undisturbed_s + 0.5)
        fig, src, samples = run_livemig(cfg, cfg.dirty_memory, "memstress", append, ready,
                                        params, window=cfg.window, pin=pin,
                                        multifd=multifd)  # fmt: skip
        figs.append(fig)
        tput = window_throughput(samples)
        fig.throughput = tput
        tputs.append(tput)
        active = [t for t, i in samples if i.get("status") == "active"]
        if active:
            t_mig = samples[0][0]
            before = pass_rate(src.lines, t_mig - undisturbed_s, t_mig)
            during = pass_rate(src.lines, active[0] + 0.3, active[-1])
            fig.extra["passes_per_s_before"] = before
            fig.extra["passes_per_s_during"] = during
            brown.append(during / before if before and during is not None else None)
    return figs, tputs, brown


def tcp_beside_guest(cfg: Config) -> tuple[float, dict[int, float]]:
    """Raw loopback TCP while the throughput runs' guest (memstress flat out, ``cfg.smp``
    vCPUs) runs in a livemig process beside it: the baseline with the same competitor for
    the cores. On 2 cores that guest takes one, which the plain TCP baseline has to itself.

    Returns the cached rate and the RAM-to-RAM rates by stream count (1, and ``cfg.multifd``
    for the multifd window), in bytes/s. RAM to RAM moves the traffic of a migration of a
    guest of this size and nothing else: from cold, guest-sized shared memory (random bytes)
    into memory made like a destination's guest RAM (``throughput.GuestMemoryTcp``), median
    of three. It is the most any pre-copy with as many streams could reach beside this guest,
    protocol or not (more streams than one take more of the guest's core too)."""
    from livemig.bench.throughput import GuestMemoryTcp, _median, fill
    from livemig.machine.ram import RAMBlock

    size = cfg.dirty_memory
    sender = RAMBlock("tcp-baseline", size, prefault=True)  # populated before any timing
    fill(sender.array, "random")
    append = f"ws={cfg.ws >> 20}M rate=0 mark_ms=100"
    try:
        with Workdir() as wd:
            src = GuestProcess(_livemig_argv(
                "run", "--guest", "memstress", "--append", append, "--memory", str(size),
                "--smp", str(cfg.smp), "--qmp", f"unix:{wd.sock('tq')}", "--serial", "stdio"),
                wd.sock("tq"), name="livemig guest")  # fmt: skip
            try:
                src.wait_qmp(30.0 + 10.0 * size / (1 << 30))
                src.wait_line(_settled(_ready_line("memstress: cpu0 pass"), 1.0), 120.0)
                cached = loopback_tcp_throughput(cfg.tcp_bytes)
                ram = GuestMemoryTcp(size)
                try:
                    rates = {n: _median([ram.run(n, sender.array) for _ in range(3)]).rate
                             for n in sorted({1, cfg.multifd} - {0})}  # fmt: skip
                finally:
                    ram.close()
                return cached, rates
            finally:
                src.stop()
    finally:
        sender.close()


def bench_throughput(cfg: Config, tcp: float, tcp_loaded: float | None = None,
                     ram_loaded: dict[int, float] | None = None) -> dict[str, Any]:  # fmt: skip
    """Sustained pre-copy throughput and brownout, memstress flat out, never converging.
    ``tcp_loaded``, ``ram_loaded``: ``tcp_beside_guest``'s rates."""
    figs, tputs, brown = _window_runs(cfg, 0)
    beside = [t / tcp_loaded if t and tcp_loaded else None for t in tputs]
    ram_loaded = ram_loaded or {}

    def against_ram(tputs: list, streams: int) -> dict[str, Any]:
        """The RAM-to-RAM baseline beside the guest with ``streams`` streams, the ratio to it,
        and the ceiling it sets: its own ratio to the cached baseline."""
        r = ram_loaded.get(streams)
        return {"tcp_ram_to_ram_beside_guest_bytes_per_s": r,
                "ratio_ram_to_ram_beside_guest": summarize([t / r if t and r else None
                                                            for t in tputs]),
                "ceiling": r / tcp if r and tcp else None}  # fmt: skip

    mf: dict[str, Any] | None = None
    if cfg.multifd:
        mfigs, mtputs, _ = _window_runs(cfg, 0, multifd=cfg.multifd)
        mf = {"channels": cfg.multifd, "throughput": summarize(mtputs),
              "ratio": summarize([t / tcp if t else None for t in mtputs]),
              **against_ram(mtputs, cfg.multifd), "runs": [f.as_dict() for f in mfigs]}  # fmt: skip
    return {
        "scenario": "throughput", "size": cfg.dirty_memory, "ws": cfg.ws,
        "tcp_bytes_per_s": tcp, "throughput": summarize(tputs),
        "ratio": summarize([t / tcp if t else None for t in tputs]),
        "tcp_beside_guest_bytes_per_s": tcp_loaded, "ratio_beside_guest": summarize(beside),
        **against_ram(tputs, 1),
        "brownout": summarize(brown), "tracker": cfg.tracker, "multifd": mf,
        "runs": {"livemig": [f.as_dict() for f in figs]},
    }  # fmt: skip


def bench_brownout(cfg: Config, max_bw: int, pin: bool = False) -> dict[str, Any]:
    """Brownout alone, pre-copy held to ``max_bw`` (0: unlimited), with the vCPUs and the
    migration threads pinned apart or not: what dirty tracking and the sender cost the guest
    when the migration does not also take its core (the unlimited, unpinned run's brownout on a
    2-core host is mostly the two migration processes competing with the vCPU for the cores)."""
    figs, tputs, brown = _window_runs(cfg, max_bw, pin)
    return {
        "scenario": "brownout", "size": cfg.dirty_memory, "ws": cfg.ws, "max_bandwidth": max_bw,
        "pinned": pin,
        "throughput": summarize(tputs), "brownout": summarize(brown), "tracker": cfg.tracker,
        "runs": {"livemig": [f.as_dict() for f in figs]},
    }  # fmt: skip


def _settled(pred: Callable[[str], bool], seconds: float) -> Callable[[str], bool]:
    """``pred``, but only once ``seconds`` have passed since it first held."""
    first: list[float] = []

    def check(line: str) -> bool:
        if not first and pred(line):
            first.append(time.monotonic())
        return bool(first) and time.monotonic() - first[0] >= seconds

    return check


def _pair(runs: dict[str, list[MigrationFigures]], key: str) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": {k: [f.as_dict() for f in v] for k, v in runs.items()}}
    for side, figs in runs.items():
        good = [f for f in figs if f.ok]
        out[side] = summarize([getattr(f, key) for f in good])
        out[f"{side}_ok"] = f"{len(good)}/{len(figs)}"
    lm, qm = out["livemig"]["median"], out["qemu"]["median"]
    out["ratio"] = lm / qm if lm is not None and qm else None
    out["metric"] = key
    return out


# -- the whole benchmark ----------------------------------------------------------------------


def run_bench(cfg: Config, progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Every scenario of ``cfg``; a dict ready for JSON."""
    qemu = None
    if cfg.qemu:
        from livemig.bench.qemu_baseline import (
            build_initramfs,
            fetch_kernel,
            qemu_available,
            qemu_label,
        )

        if not qemu_available():
            raise UsageError("the QEMU baseline needs QEMU: ./dev setup installs QEMU 10.0 (or "
                             "set LIVEMIG_QEMU; or give --no-qemu)")  # fmt: skip
        progress("QEMU baseline guest: Debian kernel (apt-get download, cached) + initramfs")
        fetch_kernel()
        build_initramfs()
        qemu = qemu_label()
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "qemu": qemu,
        "config": {k: sorted(v) if isinstance(v, set) else v for k, v in vars(cfg).items()},
        "scenarios": [],
    }
    if "idle" in cfg.only:
        for size in cfg.sizes:
            progress(f"idle {format_size(size)}")
            result["scenarios"].append(bench_idle(cfg, size))
    import dataclasses

    modes = ["off", "on"] if cfg.checksums == "both" else [cfg.checksums]

    def each_mode(run: Callable[[Config], dict[str, Any]]) -> None:
        for mode in modes:
            sc = run(dataclasses.replace(cfg, checksums=mode))
            sc["checksums"] = mode
            result["scenarios"].append(sc)

    if "throughput" in cfg.only:
        progress(f"raw loopback TCP, {format_size(cfg.tcp_bytes)} in 1 MiB sendall")
        tcp = loopback_tcp_throughput(cfg.tcp_bytes)
        progress("raw loopback TCP again, cached and RAM to RAM, beside the same guest "
                 "running flat out")  # fmt: skip
        tcp_loaded, ram_loaded = tcp_beside_guest(cfg)
        progress(f"throughput and brownout, {cfg.window:.0f} s of pre-copy")
        each_mode(lambda c: bench_throughput(c, tcp, tcp_loaded, ram_loaded))
    if "brownout" in cfg.only:
        if cfg.pin:
            if placement(cfg.smp) is None:
                progress(f"brownout pinned: skipped, {cfg.smp} vCPUs leave no CPU over")
            else:
                progress(f"brownout, unlimited, vCPUs and migration pinned apart, "
                         f"{cfg.window:.0f} s")  # fmt: skip
                result["scenarios"].append(bench_brownout(cfg, 0, pin=True))
        for bw in cfg.brownout_bws:
            progress(f"brownout at max-bandwidth {_bw_label(bw)}, {cfg.window:.0f} s")
            result["scenarios"].append(bench_brownout(cfg, bw))
    if "downtime" in cfg.only:
        for rate in cfg.rates:
            for limit in cfg.limits:
                progress(f"downtime {format_size(cfg.dirty_memory)}, {rate} MiB/s, limit {limit}")
                each_mode(lambda c, rate=rate, limit=limit: bench_downtime(c, rate, limit))  # type: ignore[misc]
    result["rss"] = _rss_summary(result["scenarios"])
    return result


def _rss_summary(scenarios: list[dict[str, Any]]) -> dict[str, Any]:
    worst: dict[str, float | None] = {"src": None, "dst": None}
    for sc in scenarios:
        for fig in sc["runs"].get("livemig", []):
            for side in ("src", "dst"):
                rss = fig[f"{side}_rss"]
                if rss and fig["guest_ram"]:
                    share = rss / fig["guest_ram"]
                    worst[side] = max(worst[side] or 0.0, share)
    return {"src_max_share": worst["src"], "dst_max_share": worst["dst"], "target": 1.15}


# -- output ------------------------------------------------------------------------------------


def _fmt(s: dict[str, Any] | None, unit: str = "", scale: float = 1.0, digits: int = 0) -> str:
    if not s or s.get("median") is None:
        return "-"
    med = f"{s['median'] * scale:.{digits}f}"
    if s["n"] > 1:
        med += f" ({s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f})"
    return med + unit


def render(result: dict[str, Any]) -> Any:
    """The rich table: each livemig figure beside its in-run baseline, as a ratio."""
    from rich.table import Table

    table = Table(title=f"livemig bench precopy ({result['date']}), median (min-max)")
    for col in ("figure", "livemig", "baseline", "ratio", "target", "ok"):
        table.add_column(col, justify="left" if col == "figure" else "right")

    def ok(flag: bool | None) -> str:
        return "-" if flag is None else ("[green]yes[/]" if flag else "[red]NO[/]")

    vm = result.get("qemu") or "QEMU"
    for sc in result["scenarios"]:
        if "checksums" in sc and result["config"].get("checksums") == "both":
            table.add_row(f"[dim]checksums {sc['checksums']}:[/]", "", "", "", "", "")
        if sc["scenario"] == "idle":
            r = sc["ratio"]
            table.add_row(
                f"idle {format_size(sc['size'])}: total ms (integrity {sc['livemig_ok']}, "
                f"{vm} {sc['qemu_ok']})",
                _fmt(sc["livemig"]), _fmt(sc["qemu"]) + f" {vm}", _x(r), "<= 0.5x",
                ok(None if r is None else r <= 0.5),
            )  # fmt: skip
        elif sc["scenario"] == "throughput":
            r, b = sc["ratio"]["median"], sc["brownout"]["median"]
            table.add_row(
                f"pre-copy throughput, {format_size(sc['ws'])} flat out",
                _fmt(sc["throughput"], " MB/s", 1e-6), f"{sc['tcp_bytes_per_s'] / 1e6:.0f} MB/s TCP",
                _x(r), ">= 0.8x", ok(None if r is None else r >= 0.8),
            )  # fmt: skip
            loaded = sc.get("tcp_beside_guest_bytes_per_s")
            if loaded:
                rl = sc["ratio_beside_guest"]["median"]
                table.add_row(
                    "  the same, against TCP beside the same flat-out guest",
                    _fmt(sc["throughput"], " MB/s", 1e-6), f"{loaded / 1e6:.0f} MB/s TCP",
                    _x(rl), "(context)", "-",
                )  # fmt: skip
            _ceiling_row(table, sc, "  the same, against TCP RAM to RAM beside that guest")
            mf = sc.get("multifd")
            if mf:
                rm = mf["ratio"]["median"]
                table.add_row(
                    f"  the same with multifd, {mf['channels']} channels",
                    _fmt(mf["throughput"], " MB/s", 1e-6),
                    f"{sc['tcp_bytes_per_s'] / 1e6:.0f} MB/s TCP", _x(rm), ">= 0.8x",
                    ok(None if rm is None else rm >= 0.8),
                )  # fmt: skip
                _ceiling_row(table, mf, f"    against TCP RAM to RAM, {mf['channels']} streams, "
                             "beside that guest")  # fmt: skip
            table.add_row(
                f"brownout ({sc['tracker']}): write rate kept", _fmt(sc["brownout"], "", 1, 2),
                "1.00 undisturbed", _x(b), ">= 0.9x", ok(None if b is None else b >= 0.9),
            )  # fmt: skip
        elif sc["scenario"] == "brownout":
            b = sc["brownout"]["median"]
            where = ("unlimited, vCPU and migration threads pinned apart" if sc.get("pinned")
                     else f"at max-bandwidth {_bw_label(sc['max_bandwidth'])}")  # fmt: skip
            table.add_row(
                f"brownout ({sc['tracker']}) {where} "
                f"({_fmt(sc['throughput'], ' MB/s', 1e-6)} sent)",
                _fmt(sc["brownout"], "", 1, 2), "1.00 undisturbed", _x(b), ">= 0.9x",
                ok(None if b is None else b >= 0.9),
            )  # fmt: skip
        elif sc["scenario"] == "downtime":
            lm = sc["livemig"]["median"]
            qm = sc["qemu"]["median"]
            good = None if lm is None else lm < sc["limit_ms"] and (qm is None or lm <= qm)
            table.add_row(
                f"downtime {format_size(sc['size'])} {sc['rate_mib_s']} MiB/s, limit "
                f"{sc['limit_ms']} ms (integrity {sc['livemig_ok']}, {vm} {sc['qemu_ok']})",
                _fmt(sc["livemig"], " ms"), _fmt(sc["qemu"], " ms") + f" {vm}", _x(sc["ratio"]),
                f"< {sc['limit_ms']} ms, <= {vm}", ok(good),
            )  # fmt: skip
    rss = result.get("rss") or {}
    for side, name in (("src", "source"), ("dst", "destination")):
        share = rss.get(f"{side}_max_share")
        table.add_row(f"peak RSS {name} / guest RAM (worst run)", "-" if share is None else
                      f"{share:.3f}", "1.00", _x(share), "<= 1.15x",
                      ok(None if share is None else share <= 1.15))  # fmt: skip
    return table


def _bw_label(bw: int) -> str:
    """Bytes/s as a user would name it: 1 Gbit/s for a link rate, 128.0 MiB/s otherwise."""
    return f"{bw * 8 / 1e9:g} Gbit/s" if bw % 125_000_000 == 0 else f"{format_size(bw)}/s"


def _ceiling_row(table: Any, fig: dict[str, Any], label: str) -> None:
    """A throughput figure against its RAM-to-RAM baseline beside the guest, if measured."""
    ram = fig.get("tcp_ram_to_ram_beside_guest_bytes_per_s")
    if ram:
        table.add_row(
            f"{label} (the most a migration could do here: {fig['ceiling']:.2f}x of TCP)",
            _fmt(fig["throughput"], " MB/s", 1e-6),
            f"{ram / 1e6:.0f} MB/s TCP",
            _x(fig["ratio_ram_to_ram_beside_guest"]["median"]),
            "(context)",
            "-",
        )


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


# -- command line ------------------------------------------------------------------------------


def _size_list(text: str) -> list[int]:
    try:
        return [parse_size(s) for s in text.split(",") if s]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _int_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas: {text!r}") from exc


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("precopy", help="pre-copy migration: time, throughput, downtime, "
                       "brownout, RSS, beside real QEMU (10.0 by default)")  # fmt: skip
    p.add_argument("--sizes", type=_size_list, default=None, help="idle guest sizes (1G,4G)")
    p.add_argument("--rates", type=_int_list, default=None,
                   help="dirty rates in MiB/s for the downtime figure (50,200)")  # fmt: skip
    p.add_argument("--limits", type=_int_list, default=None, help="downtime-limits in ms (300,50)")
    p.add_argument("--dirty-memory", type=parse_size, default=None,
                   help="guest RAM of the dirty-guest runs (1G)")  # fmt: skip
    p.add_argument("--ws", type=parse_size, default=None, help="memstress working set (256M)")
    p.add_argument("--window", type=float, default=None,
                   help="seconds of pre-copy for throughput and brownout (4)")  # fmt: skip
    p.add_argument("--repeat", type=int, default=1, help="runs per figure (median, min-max)")
    p.add_argument("--smp", type=int, default=1, help="livemig vCPUs (QEMU runs -smp 1)")
    p.add_argument("--only", type=lambda s: set(s.split(",")), default=None,
                   help="scenarios to run: idle,throughput,brownout,downtime")  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="small and short: 256M idle, 256M dirty guest with 64M working set, "
                   "one rate and limit")  # fmt: skip
    p.add_argument("--no-qemu", action="store_true", help="skip the QEMU baseline")
    p.add_argument("--verify", action="store_true",
                   help="livemig x-verify (RAM hashes compared; adds to downtime)")  # fmt: skip
    p.add_argument("--tracker", default="uffd-wp-async", help="livemig x-dirty-tracker")
    p.add_argument("--multifd", type=int, default=2, metavar="N",
                   help="channels of the extra multifd throughput run (2; 0: none)")  # fmt: skip
    p.add_argument("--no-pin", action="store_true",
                   help="skip the brownout run with vCPUs and migration threads pinned apart")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--checksums", choices=("on", "off", "both"), default="on",
                   help="livemig's checksums (x-checksums): on (the command line's default), "
                   "off, or both: throughput and downtime without then with them")  # fmt: skip
    p.set_defaults(func=main)


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = Config()
    if args.quick:
        cfg.sizes, cfg.dirty_memory, cfg.ws = [256 << 20], 256 << 20, 64 << 20
        cfg.rates, cfg.limits, cfg.window, cfg.tcp_bytes = [50], [300], 2.0, 512 << 20
        cfg.brownout_bws = [128 << 20]
    for name in ("sizes", "rates", "limits", "dirty_memory", "ws", "window", "only"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    unknown = cfg.only - {"idle", "throughput", "brownout", "downtime"}
    if unknown:
        raise UsageError(f"--only: unknown scenario(s) {', '.join(sorted(unknown))}")
    if args.repeat < 1:
        raise UsageError("--repeat must be at least 1")
    cfg.repeat, cfg.smp, cfg.qemu = args.repeat, args.smp, not args.no_qemu
    cfg.verify, cfg.tracker, cfg.pin = args.verify, args.tracker, not args.no_pin
    if not 0 <= args.multifd <= 255:
        raise UsageError("--multifd takes 0 to 255 channels")
    cfg.multifd = args.multifd
    cfg.checksums = getattr(args, "checksums", "on")
    return cfg


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    cfg = config_from_args(args)
    err = Console(stderr=True)
    result = run_bench(cfg, progress=lambda s: err.print(f"[dim]bench precopy: {s}[/]"))
    if args.json:
        json.dump(result, sys.stdout, indent=2, sort_keys=True, default=str)
        print()
    else:
        table_console().print(render(result))
    return 0
