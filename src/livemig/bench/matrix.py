"""``livemig bench matrix``: a scenario matrix in the spirit of QEMU's guestperf.

A scenario is guest size x dirty rate x strategy. Each one is a real migration between two
``livemig run`` processes (source booting memstress, destination ``--incoming defer``) over TCP
loopback, driven through QMP the way QEMU is driven, so that with ``--vs-qemu`` the same
scenarios run on real QEMU (10.0 by default, named in every label and record) under TCG with
the Linux guest of ``livemig.bench.qemu_baseline``
(Debian kernel + the *dirtier* initramfs; the kernel is fetched with ``apt-get download`` only
then) and every figure is printed as ``livemig / QEMU``.

Strategies (QEMU's names for what they switch on):

- ``precopy``: pre-copy alone (``max-bandwidth`` and ``downtime-limit`` as given);
- ``autoconverge``: capability ``auto-converge`` (the vCPUs are throttled until it converges);
- ``postcopy``: ``postcopy-ram`` on both sides (``postcopy-blocktime`` on the destination) and
  ``migrate-start-postcopy`` once the first full pass is done (``dirty-sync-count`` >= 2, as
  QEMU's own tests wait);
- ``multifdN`` (``multifd4``): capability ``multifd`` with N channels on both sides;
  ``multifdN-zstd`` / ``multifdN-zlib`` add ``multifd-compression`` (guestperf's compression).

Dirty rates are MiB/s written into a working set of a quarter of guest RAM (``--ws-share``):
memstress ``rate=`` pages/s = MiB/s x 256 for livemig, the dirtier's ``dirty=WS,RATE`` for QEMU.
Rate 0 is an idle guest on both sides: livemig's ``idle`` guest, QEMU's kernel with the
dirtier asleep. QEMU always runs ``-smp 1``, so livemig does too unless ``--smp`` says else.

Both sides run with capability ``return-path`` (``--no-return-path``: neither), so that both
report the same downtime: QEMU's source, like livemig's, then counts it until the destination's
SHUT (``close_return_path_on_source`` comes before ``migration_calculate_complete``), where
without a return path it ends at the last byte sent.

The limit (``--limit-seconds``, 30 s by default) leaves QEMU's own auto-converge schedule room to
reach its cap and converge: with QEMU's defaults (``cpu-throttle-initial`` 20,
``cpu-throttle-increment`` 10, ``max-cpu-throttle`` 99) the throttle climbs 20, 30, ... 90, 99:
nine raises, each after two periods of at least 1 s, so 18 s at the very least (~19-20 s
measured, as a period ends at the first sync past its second), and a guest that rewrites its
working set faster than the link slows down for good only near the cap (memstress catches up
whatever a park of less than 100 ms cost it: below 91 % a park is shorter). At 20 s both VMs
were cut while their throttle reached 99 % in the 200 MiB/s cell; 30 s is that schedule plus
half again for the last passes, and costs only the cells that cannot converge (pre-copy alone
against a faster guest) 10 s more each.

Like for like: a cell compares the two VMs fairly only when their guests dirtied memory at
comparable rates (``ram.dirty-pages-rate``, measured by each VM: within ``LIKE_FOR_LIKE`` of each
other). A TCG guest can lose its CPU to QEMU's own migration threads (72-89 against livemig's
128 MiB/s, multifd4 at 200 MiB/s, sessions 13-14), and then the cell says so ("not like for
like").
``--match-rates`` also re-runs such a cell with the faster guest asked for the slower one's
measured rate (memstress ``rate=``, the dirtier's ``dirty=WS,RATE``), and prints that run as an
extra row, ``RATE (matched)``, beside the same runs of the other VM.

Pre-copy alone cannot converge where the guest dirties its working set faster than
``max-bandwidth`` (200 MiB/s against QEMU's default 128): both VMs judge the switch-over by the
bandwidth they measured, which the limit holds at 128 MiB/s, so no pass ends below
``max-bandwidth x downtime-limit``. QEMU 8.2+'s answer for a throttled pre-copy over a faster
link is ``avail-switchover-bandwidth``: the bandwidth the final pass will have (neither VM holds
that pass to ``max-bandwidth``). ``--set avail-switchover-bandwidth=1G`` gives it to both VMs;
the downtime measured then shows whether the estimate was honest.

A scenario that has not finished after ``--limit-seconds`` is cancelled (``migrate_cancel``) and
reported as ``limit``, with why it did not converge (the dirty rate against the bandwidth, the
throttle reached, what was left); if it still does not reach a final state (a post-copy cannot be undone
once the destination runs), its processes are killed and it is reported as ``killed``. Nothing
here waits without a time-out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from livemig.bench.common import (
    FINAL_STATES,
    POLL_INTERVAL,
    GuestProcess,
    Workdir,
    _event_time,
    _wait_event,
    free_port,
    set_migration,
    table_console,
)
from livemig.cli.argtypes import setting
from livemig.errors import LivemigError, MigrationError, UsageError
from livemig.units import format_size, parse_size

PAGES_PER_MIB = 256
PAGE_BYTES = 4096  # the unit of ram.dirty-pages-rate (pages per second) on both VMs
QEMU_MAX_RATE = 1024  # MiB/s asked of the dirtier for "max" (TCG reaches what it can)
CANCEL_GRACE_S = 15.0  # after migrate_cancel, how long a migration may take to end
LIMIT_SECONDS = 30.0  # the default limit: QEMU's auto-converge schedule and then some (above)
# Measured dirty rates within this ratio of each other are comparable: the bench's own spread
# between runs of one VM is ~5 %, and 72 against 128 MiB/s (0.56) is not like for like.
LIKE_FOR_LIKE = 0.85
_STRATEGY = re.compile(r"^(precopy|autoconverge|postcopy|multifd(\d+)(?:-(zlib|zstd))?)$")

# Every figure of one run; the JSON always carries all of them (None when not applicable).
FIELDS = (
    "outcome", "status", "total_ms", "downtime_ms", "blackout_ms", "transferred", "passes",
    "throttle_pct", "throttle_steps", "sync_times", "dirty_mib_s", "remaining", "sent_mib_s",
    "postcopy_switched", "postcopy_bytes", "postcopy_requests", "blocktime_ms", "verified",
    "guest_ok", "src_rss", "dst_rss", "wall_s",
)  # fmt: skip
NUMERIC = ("total_ms", "downtime_ms", "blackout_ms", "transferred", "passes", "throttle_pct",
           "dirty_mib_s", "remaining", "sent_mib_s", "postcopy_bytes", "postcopy_requests",
           "blocktime_ms", "src_rss", "dst_rss", "wall_s")  # fmt: skip
# what the runs cut at the limit had done by then: why they did not converge
AT_LIMIT = ("transferred", "passes", "throttle_pct", "dirty_mib_s", "remaining", "sent_mib_s")


@dataclass(frozen=True)
class Strategy:
    """One migration strategy: capabilities and parameters for each side."""

    name: str
    caps: dict[str, bool]
    dest_caps: dict[str, bool]
    params: dict[str, Any]
    postcopy: bool = False


def parse_strategy(name: str) -> Strategy:
    """``precopy``, ``autoconverge``, ``postcopy``, ``multifdN`` or ``multifdN-zstd|zlib``."""
    m = _STRATEGY.match(name)
    if not m:
        raise UsageError(f"unknown strategy {name!r}: expected precopy, autoconverge, postcopy, "
                         "multifdN or multifdN-zstd / multifdN-zlib")  # fmt: skip
    if name == "precopy":
        return Strategy(name, {}, {}, {})
    if name == "autoconverge":
        return Strategy(name, {"auto-converge": True}, {}, {})
    if name == "postcopy":
        return Strategy(name, {"postcopy-ram": True},
                        {"postcopy-ram": True, "postcopy-blocktime": True}, {},
                        postcopy=True)  # fmt: skip
    channels = int(m.group(2))
    if not 1 <= channels <= 255:
        raise UsageError(f"strategy {name!r}: multifd takes 1 to 255 channels")
    params = {"multifd-channels": channels, "multifd-compression": m.group(3) or "none"}
    return Strategy(name, {"multifd": True}, {"multifd": True}, params)


@dataclass
class Config:
    """What to run. The defaults make a run of a few minutes on 2 cores (livemig alone)."""

    sizes: list[int] = field(default_factory=lambda: [256 << 20])
    rates: list[int | str] = field(default_factory=lambda: [0, 50, 200])  # MiB/s or "max"
    strategies: list[str] = field(
        default_factory=lambda: ["precopy", "autoconverge", "postcopy", "multifd4"]
    )
    repeat: int = 1
    limit_seconds: float = LIMIT_SECONDS
    # QEMU's default max-bandwidth: dirty rates above it make the strategies differ.
    bandwidth: int = 128 << 20
    downtime_limit: int = 300
    # QEMU 8.2+'s estimate of the switchover's bandwidth (0: measured, QEMU's default). The
    # final pass is not held to max-bandwidth on either VM, so with a fast link a throttled
    # pre-copy can switch over well inside downtime-limit while the measured rate says not.
    avail_switchover_bandwidth: int = 0
    ws_share: float = 0.25
    smp: int = 1
    verify: bool = True
    vs_qemu: bool = False
    return_path: bool = True  # on both sides (QEMU's downtime then also waits for its SHUT)
    match_rates: bool = False  # re-run a cell whose guests' rates differ at the slower's rate


@dataclass
class RunFigures:
    """What one migration of one scenario measured (times in ms, sizes in bytes)."""

    outcome: str = "error"  # completed | limit | killed | failed | error
    status: str = "?"
    total_ms: float | None = None
    downtime_ms: float | None = None
    blackout_ms: float | None = None  # source STOP event -> destination RESUME event
    transferred: int | None = None
    passes: int | None = None  # dirty-sync-count
    throttle_pct: int | None = None  # highest cpu-throttle-percentage seen
    # [seconds after migrate, percentage] at each change of cpu-throttle-percentage seen
    throttle_steps: list[list[float]] | None = None
    # seconds after migrate of each dirty-bitmap sync (MIGRATION_PASS, capability events on
    # both VMs): auto-converge decides at syncs, so their cadence sets when its periods close
    sync_times: list[float] | None = None
    # The guest's dirty rate as the migration saw it (ram.dirty-pages-rate, median of the
    # samples while active): what a like-for-like cell needs equal on both sides. A guest that
    # loses its CPU to the migration (or to the throttle) writes less than it was asked to.
    dirty_mib_s: float | None = None
    remaining: int | None = None  # bytes still dirty at the last query-migrate before the end
    # transferred over the time up to the cancel, in MiB/s: query-migrate's mbps is one
    # window's (bursty with multifd: 168 MiB/s on a 128 MiB/s limit that held on average)
    sent_mib_s: float | None = None
    postcopy_switched: bool | None = None  # migrate-start-postcopy was sent before the end
    postcopy_bytes: int | None = None
    postcopy_requests: int | None = None
    blocktime_ms: float | None = None
    verified: bool | None = None  # livemig x-verify (RAM hashes equal at switch-over)
    guest_ok: bool | None = None  # the destination guest keeps running after it
    src_rss: int | None = None
    dst_rss: int | None = None
    wall_s: float | None = None  # host time from migrate to a final state
    notes: list[str] = field(default_factory=list)


# -- one migration, either VM -----------------------------------------------------------------


def drive(
    src: GuestProcess,
    dst: GuestProcess,
    strategy: Strategy,
    *,
    caps: dict[str, bool],
    params: dict[str, Any],
    limit_s: float,
    fig: RunFigures,
) -> dict[str, Any]:
    """Migrate ``src`` to ``dst`` with ``strategy``, filling ``fig``; returns the last reply.

    Cancels at ``limit_s``; raises MigrationError if the migration does not reach a final state
    within CANCEL_GRACE_S after that (the caller then kills both processes).
    """
    uri = f"tcp:127.0.0.1:{free_port()}"
    with src.qmp() as sq, dst.qmp() as dq:
        set_migration(dq, strategy.dest_caps, strategy.params)
        dq.command("migrate-incoming", uri=uri)
        # events: MIGRATION_PASS at every sync, on both VMs (their cadence is in the figures)
        set_migration(sq, {**caps, **strategy.caps, "events": True},
                      {**params, **strategy.params})  # fmt: skip
        sq.events()  # only this migration's events from here on
        dq.events()
        t0, t0_wall = time.monotonic(), time.time()  # event timestamps are wall-clock
        sq.command("migrate", uri=uri)
        switched = cancelled = False
        t_cancel = t0
        throttle = 0
        steps: list[list[float]] = []
        info: dict[str, Any] = {}
        last_ram: dict[str, Any] = {}
        dirty_rates: list[int] = []
        events: list[dict[str, Any]] = []
        while True:
            now = time.monotonic()
            info = sq.command("query-migrate")
            events += sq.events()
            status = info.get("status", "")
            if "ram" in info:
                last_ram = info["ram"]  # a cancelled migration's reply has no ram member
            pct = int(info.get("cpu-throttle-percentage") or 0)
            if pct and pct != (steps[-1][1] if steps else 0):
                steps.append([round(now - t0, 2), pct])
            throttle = max(throttle, pct)
            if status in FINAL_STATES:
                break
            rate = info.get("ram", {}).get("dirty-pages-rate")
            if status == "active" and rate:
                dirty_rates.append(int(rate))
            if (strategy.postcopy and not switched and status == "active"
                    and info.get("ram", {}).get("dirty-sync-count", 0) >= 2):  # fmt: skip
                sq.command("migrate-start-postcopy")
                switched = True
            if not cancelled and now - t0 > limit_s:
                fig.notes.append(f"not finished after {limit_s:g} s ({status}): cancelled")
                sq.command("migrate_cancel")
                cancelled = True
                t_cancel = now
            if now - t0 > limit_s + CANCEL_GRACE_S:
                raise MigrationError(f"migration still {status!r} {CANCEL_GRACE_S:g} s after "
                                     "migrate_cancel")  # fmt: skip
            time.sleep(POLL_INTERVAL)
        fig.wall_s = round(time.monotonic() - t0, 3)
        fig.status = status
        fig.outcome = {"completed": "completed", "failed": "failed"}.get(status, "cancelled")
        if cancelled and status != "completed":
            fig.outcome = "limit"
        if status == "failed" and info.get("error-desc"):
            fig.notes.append(str(info["error-desc"]))
        ram = info.get("ram", last_ram)
        fig.total_ms = info.get("total-time")
        fig.downtime_ms = info.get("downtime")
        fig.transferred = ram.get("transferred")
        if status != "completed":
            fig.remaining = last_ram.get("remaining")
            if cancelled and fig.transferred:
                fig.sent_mib_s = round(fig.transferred / (t_cancel - t0) / 2**20, 1)
        fig.passes = ram.get("dirty-sync-count")
        fig.throttle_pct = throttle
        fig.throttle_steps = steps or None
        events += sq.events()
        syncs = [round(_event_time(ev) - t0_wall, 3) for ev in events
                 if ev.get("event") == "MIGRATION_PASS"]  # fmt: skip
        fig.sync_times = syncs or None
        if dirty_rates:
            fig.dirty_mib_s = round(statistics.median(dirty_rates) * PAGE_BYTES / 2**20, 1)
        if strategy.postcopy:
            fig.postcopy_switched = switched
            fig.postcopy_bytes = ram.get("postcopy-bytes")
            fig.postcopy_requests = ram.get("postcopy-requests")
            if status == "completed" and not fig.postcopy_bytes:
                # asked for after the first pass, as QEMU's tests do; a guest that converges
                # that fast completes in pre-copy (QEMU too: the switch needs pages left)
                fig.notes.append("pre-copy converged before the switch to post-copy")
        if "x-verified" in info:
            fig.verified = bool(info["x-verified"])
        if status == "completed":
            stop = next((ev for ev in events if ev.get("event") == "STOP"), None)
            stop = stop or _wait_event(sq, "STOP", 5.0)
            resume = _wait_event(dq, "RESUME", 10.0)
            if stop is not None and resume is not None:
                fig.blackout_ms = round((_event_time(resume) - _event_time(stop)) * 1e3, 1)
            if strategy.postcopy:
                # The destination finishes post-copy a moment after the source says completed.
                deadline = time.monotonic() + 10.0
                dinfo = dq.command("query-migrate")
                while dinfo.get("status") != "completed" and time.monotonic() < deadline:
                    time.sleep(POLL_INTERVAL)
                    dinfo = dq.command("query-migrate")
                fig.blocktime_ms = dinfo.get("postcopy-blocktime")
    return info


def _run_pair(
    src: GuestProcess,
    dst: GuestProcess,
    ready: Callable[[str], bool],
    boot_s: float,
    strategy: Strategy,
    caps: dict[str, bool],
    params: dict[str, Any],
    limit_s: float,
    console_socket: bool,
) -> RunFigures:
    """Boot, migrate, check the destination guest, stop both; never raises for a bad run."""
    fig = RunFigures()
    try:
        for g in (src, dst):
            g.wait_qmp(boot_s)
            if console_socket:
                g.connect_console()
        src.wait_line(ready, boot_s)
        drive(src, dst, strategy, caps=caps, params=params, limit_s=limit_s, fig=fig)
        if fig.status == "completed":
            after = time.monotonic()
            try:
                dst.wait_line(ready, 15.0, since=after)
                bad = [ln for _, ln in dst.console_lines()
                       if any(w in ln for w in ("Oops", "Kernel panic", "BUG:"))]  # fmt: skip
                fig.guest_ok = not bad
                if bad:
                    fig.notes.append(f"destination kernel: {bad[0]}")
            except MigrationError as exc:
                fig.guest_ok = False
                fig.notes.append(f"destination guest silent after migration: {exc}")
    except (LivemigError, OSError) as exc:
        if fig.outcome in ("error", "limit") and "after migrate_cancel" in str(exc):
            fig.outcome = "killed"
        fig.notes.append(f"{type(exc).__name__}: {exc}"[:600])
    finally:
        for g in (src, dst):
            try:
                g.stop(timeout=5.0)
            except Exception as exc:
                fig.notes.append(f"stopping {g.name}: {exc}")
    fig.src_rss, fig.dst_rss = src.peak_rss, dst.peak_rss
    return fig


def _livemig_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "livemig", *args]


def migration_params(cfg: Config) -> dict[str, int]:
    """The parameters both VMs get (avail-switchover-bandwidth only when set: QEMU before 8.2
    has no such parameter)."""
    params = {"max-bandwidth": cfg.bandwidth, "downtime-limit": cfg.downtime_limit}
    if cfg.avail_switchover_bandwidth:
        params["avail-switchover-bandwidth"] = cfg.avail_switchover_bandwidth
    return params


def run_livemig(cfg: Config, size: int, rate: int | str, strategy: Strategy) -> RunFigures:
    """One livemig migration of the scenario (size, rate, strategy)."""
    if rate == 0:
        guest, append, prefix = "idle", "", "idle: heartbeat"
    else:
        pages_s = 0 if rate == "max" else int(rate) * PAGES_PER_MIB
        guest, prefix = "memstress", "memstress: cpu0 pass"
        append = f"ws={ws_of(cfg, size) >> 20}M rate={pages_s}"
    caps = {"return-path": cfg.return_path, "x-verify": cfg.verify}
    params = migration_params(cfg)
    with Workdir() as wd:
        mem, smp = str(size), str(cfg.smp)
        src = GuestProcess(_livemig_argv(
            "run", "--guest", guest, "--append", append, "--memory", mem, "--smp", smp,
            "--qmp", f"unix:{wd.sock('lsq')}", "--serial", "stdio"), wd.sock("lsq"),
            name="livemig source")  # fmt: skip
        # Pre-faulted: first touch costs ~5 s/GiB here, and it happens before timing.
        dst = GuestProcess(_livemig_argv(
            "run", "--incoming", "defer", "--prefault", "--memory", mem, "--smp", smp,
            "--qmp", f"unix:{wd.sock('ldq')}", "--serial", "stdio"), wd.sock("ldq"),
            name="livemig destination")  # fmt: skip
        boot = 30.0 + 10.0 * size / (1 << 30)
        fig = _run_pair(src, dst, lambda ln: ln.startswith(prefix), boot, strategy, caps,
                        params, cfg.limit_seconds, console_socket=False)  # fmt: skip
    if not cfg.verify:
        fig.verified = None
    return fig


def run_qemu(cfg: Config, size: int, rate: int | str, strategy: Strategy) -> RunFigures:
    """The same scenario on QEMU (TCG, baseline Linux guest; unaligned RAM before 9.0)."""
    from livemig.bench.qemu_baseline import (
        BOOT_TIMEOUT,
        build_initramfs,
        fetch_kernel,
        qemu_argv,
        qemu_label,
    )

    kernel, initrd = fetch_kernel(), build_initramfs()
    if rate == 0:
        ws_mib, rate_mib = 0, 0
    else:
        ws_mib = ws_of(cfg, size) >> 20
        rate_mib = QEMU_MAX_RATE if rate == "max" else int(rate)
    append = f"console=ttyS0 quiet panic=-1 dirty={ws_mib},{rate_mib}"
    params = migration_params(cfg)
    with Workdir() as wd:
        src = GuestProcess(qemu_argv(size, kernel, initrd, append, wd.sock("sq"), wd.sock("ss")),
                           wd.sock("sq"), console=wd.sock("ss"), name="qemu source")  # fmt: skip
        dst = GuestProcess(qemu_argv(size, kernel, initrd, append, wd.sock("dq"), wd.sock("ds"),
                                     incoming=True),
                           wd.sock("dq"), console=wd.sock("ds"), name="qemu destination")  # fmt: skip
        caps = {"return-path": True} if cfg.return_path else {}
        fig = _run_pair(src, dst, lambda ln: ln.startswith("dirtier: beat"), BOOT_TIMEOUT,
                        strategy, caps, params, cfg.limit_seconds, console_socket=True)  # fmt: skip
    fig.vm = qemu_label()
    return fig


def ws_of(cfg: Config, size: int) -> int:
    """The working set of a guest of ``size``: ``ws_share`` of it, whole MiB, at least 1 MiB."""
    return max(1 << 20, int(size * cfg.ws_share) >> 20 << 20)


# -- the matrix -------------------------------------------------------------------------------


def why_not_converged(s: dict[str, Any], runs: Sequence[RunFigures], cfg: Config,
                      strategy: Strategy) -> str | None:  # fmt: skip
    """Why the runs of a cell that did not complete did not, from what they measured; None when
    every run completed."""
    if s["completed"] == s["runs"]:
        return None
    lim = s["at_limit"]
    bw = cfg.bandwidth / 2**20
    parts: list[str] = []
    if any(r.outcome == "limit" for r in runs):
        parts.append(f"not converged in {cfg.limit_seconds:g} s")
        dirty, sent = lim.get("dirty_mib_s"), lim.get("sent_mib_s")
        if dirty is not None:
            vs = f" against max-bandwidth {bw:.0f} MiB/s" if bw else ""
            parts.append(f"the guest dirtied {dirty:.0f} MiB/s of distinct pages{vs}"
                         + (f" (sent at {sent:.0f} MiB/s)" if sent is not None else ""))  # fmt: skip
            if bw and dirty >= 0.9 * bw and not cfg.avail_switchover_bandwidth:
                threshold = bw * cfg.downtime_limit / 1000
                parts.append(f"at that rate no pass ends with at most {threshold:.0f} MiB "
                             "(max-bandwidth x downtime-limit) left: pre-copy converges only "
                             "while the guest dirties well below the link's rate")  # fmt: skip
        if strategy.caps.get("auto-converge"):
            # when the cut runs got there: a cap reached just before the limit says the limit,
            # not the guest, decided the cell
            last = [r.throttle_steps[-1][0] for r in runs
                    if r.outcome == "limit" and r.throttle_steps]  # fmt: skip
            at = f" at {statistics.median(last):.1f} s" if last else ""
            parts.append(f"auto-converge throttle reached {lim.get('throttle_pct') or 0:.0f} %"
                         f"{at} (cpu-throttle-initial 20, +10 every 2 periods of >= 1 s, "
                         "max-cpu-throttle 99)")  # fmt: skip
        if lim.get("remaining") is not None:
            parts.append(f"{lim['remaining'] / 2**20:.0f} MiB still dirty when cancelled")
    for r in runs:
        if r.outcome not in ("completed", "limit"):
            parts.append(f"{r.outcome}: {r.notes[-1] if r.notes else r.status}")
    return "; ".join(parts)


def summarize_runs(runs: Sequence[RunFigures]) -> dict[str, Any]:
    """Median of each numeric figure over the completed runs; counts of the outcomes."""
    done = [r for r in runs if r.outcome == "completed"]
    out: dict[str, Any] = {"runs": len(runs), "completed": len(done),
                           "outcomes": sorted({r.outcome for r in runs})}  # fmt: skip
    for name in NUMERIC:
        xs = [getattr(r, name) for r in done if getattr(r, name) is not None]
        out[name] = statistics.median(xs) if xs else None
    # What the migrations that hit the limit had done by then (how far from converging).
    limited = [r for r in runs if r.outcome == "limit"]
    out["at_limit"] = {
        name: statistics.median(xs) if xs else None
        for name in AT_LIMIT
        for xs in [[getattr(r, name) for r in limited if getattr(r, name) is not None]]
    }
    # when each run raised the throttle, completed or cut: how fast auto-converge climbed
    out["throttle_steps"] = [r.throttle_steps for r in runs]
    verified = [r.verified for r in done if r.verified is not None]
    out["verified"] = all(verified) if verified else None
    ok = [r.guest_ok for r in done if r.guest_ok is not None]
    out["guest_ok"] = all(ok) if ok else None
    return out


def measured_rate(s: dict[str, Any]) -> float | None:
    """The guest's dirty rate a VM measured in a cell (MiB/s): the median of its completed runs,
    else of the runs cut at the limit."""
    rate = s.get("dirty_mib_s")
    return rate if rate is not None else s.get("at_limit", {}).get("dirty_mib_s")


def rate_mismatch(sc: dict[str, Any]) -> tuple[str, float, str, float] | None:
    """``(faster VM, its rate, slower VM, its rate)`` when the two guests of a cell did not
    dirty memory at comparable rates (the slower below ``LIKE_FOR_LIKE`` of the faster); None
    when they did, or when a side measured nothing (an idle guest, no QEMU side)."""
    if sc.get("rate_mib_s") == 0 or "qemu" not in sc:
        return None
    lm, qm = measured_rate(sc["livemig"]), measured_rate(sc["qemu"])
    if not lm or not qm:
        return None
    fast, slow = sorted([("livemig", lm), ("qemu", qm)], key=lambda x: x[1], reverse=True)
    if slow[1] >= LIKE_FOR_LIKE * fast[1]:
        return None
    return fast[0], fast[1], slow[0], slow[1]


def like_for_like_note(sc: dict[str, Any], qemu_label: str) -> str | None:
    """The cell's "not like for like" line, or None when its guests' rates are comparable."""
    mm = rate_mismatch(sc)
    if mm is None:
        return None
    names = {"livemig": "livemig", "qemu": qemu_label}
    fast, fast_rate, slow, slow_rate = mm
    line = (f"{format_size(sc['size'])} {sc['rate_mib_s']} MiB/s {sc['strategy']}: not like for "
            f"like: {names[slow]}'s guest dirtied {slow_rate:.0f} MiB/s, {names[fast]}'s "
            f"{fast_rate:.0f} MiB/s (asked {sc['rate_mib_s']})")  # fmt: skip
    matched = sc.get("matched")
    if matched:
        got = measured_rate(sc[matched["vm"] + "_matched"])
        line += (f"; matched row: {names[matched['vm']]} asked {matched['rate_mib_s']} MiB/s, "
                 + (f"dirtied {got:.0f} MiB/s" if got is not None else "its rate not measured "
                    "(no dirty-pages-rate: it completed within its first 1 s period)"))  # fmt: skip
    else:
        line += "; --match-rates re-runs it at the slower guest's rate"
    return line


def scenarios(cfg: Config) -> list[tuple[int, int | str, Strategy]]:
    return [(size, rate, parse_strategy(s))
            for size in cfg.sizes for rate in cfg.rates for s in cfg.strategies]  # fmt: skip


def machine_info() -> dict[str, Any]:
    """Where the figures were measured (they mean little elsewhere)."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "python": platform.python_version(),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
            "load_avg_at_start": os.getloadavg()}  # fmt: skip


def run_matrix(cfg: Config, progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Every scenario of ``cfg``, ``cfg.repeat`` times on each VM; a dict ready for JSON."""
    todo = scenarios(cfg)
    qemu_version = None
    if cfg.vs_qemu:
        from livemig.bench.qemu_baseline import (
            build_initramfs,
            fetch_kernel,
            qemu_available,
            qemu_label,
        )

        if not qemu_available():
            raise UsageError("--vs-qemu needs QEMU: ./dev setup installs QEMU 10.0 (or set "
                             "LIVEMIG_QEMU)")  # fmt: skip
        progress("QEMU baseline guest: Debian kernel (apt-get download, cached) + initramfs")
        fetch_kernel()
        build_initramfs()
        qemu_version = qemu_label()
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_info(),
        "qemu": qemu_version,
        "config": asdict(cfg),
        "fields": list(FIELDS),
        "scenarios": [],
    }
    for i, (size, rate, strat) in enumerate(todo, 1):
        label = f"{format_size(size)} {rate} MiB/s {strat.name}"
        runs: dict[str, list[RunFigures]] = {"livemig": []}
        if cfg.vs_qemu:
            runs["qemu"] = []
        for k in range(cfg.repeat):
            progress(f"[{i}/{len(todo)}] {label}: livemig run {k + 1}/{cfg.repeat}")
            runs["livemig"].append(run_livemig(cfg, size, rate, strat))
            if cfg.vs_qemu:
                progress(f"[{i}/{len(todo)}] {label}: QEMU run {k + 1}/{cfg.repeat}")
                runs["qemu"].append(run_qemu(cfg, size, rate, strat))
        sc: dict[str, Any] = {"size": size, "rate_mib_s": rate, "strategy": strat.name,
                              "ws": 0 if rate == 0 else ws_of(cfg, size)}  # fmt: skip
        for vm, figs in runs.items():
            sc[vm] = summarize_runs(figs)
            sc[vm]["why"] = why_not_converged(sc[vm], figs, cfg, strat)
            sc[f"{vm}_runs"] = [asdict(f) for f in figs]
        mm = rate_mismatch(sc) if cfg.match_rates else None
        if mm is not None:
            # the faster guest again, asked for what the slower one measured: like for like
            vm, rate = mm[0], max(1, round(mm[3]))
            run = run_livemig if vm == "livemig" else run_qemu
            figs = []
            for k in range(cfg.repeat):
                progress(f"[{i}/{len(todo)}] {label}: {vm} run {k + 1}/{cfg.repeat} at the "
                         f"other guest's measured rate, {rate} MiB/s")  # fmt: skip
                figs.append(run(cfg, size, rate, strat))
            sc["matched"] = {"vm": vm, "rate_mib_s": rate}
            sc[f"{vm}_matched"] = summarize_runs(figs)
            sc[f"{vm}_matched"]["why"] = why_not_converged(sc[f"{vm}_matched"], figs, cfg, strat)
            sc[f"{vm}_matched_runs"] = [asdict(f) for f in figs]
        result["scenarios"].append(sc)
    return result


# -- output ------------------------------------------------------------------------------------


def _num(v: Any, scale: float = 1.0, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v * scale:.{digits}f}"


def _flag(v: bool | None) -> str:
    return "-" if v is None else ("yes" if v else "NO")


# (column, figure, scale, digits)
COLUMNS = (
    ("total s", "total_ms", 1e-3, 2),
    ("downtime ms", "downtime_ms", 1.0, 0),
    ("blackout ms", "blackout_ms", 1.0, 0),
    ("sent MiB", "transferred", 1 / 2**20, 0),
    ("passes", "passes", 1.0, 0),
    ("throttle %", "throttle_pct", 1.0, 0),
    ("dirtied MiB/s", "dirty_mib_s", 1.0, 0),
    ("pc req", "postcopy_requests", 1.0, 0),
    ("blocktime ms", "blocktime_ms", 1.0, 0),
)


def _fig(s: dict[str, Any], name: str, scale: float, digits: int) -> str:
    """The median of the completed runs, else (in parentheses) of the runs cut at the limit."""
    if s[name] is None and s["at_limit"].get(name) is not None:
        return f"({_num(s['at_limit'][name], scale, digits)})"
    return _num(s[name], scale, digits)


def _done(s: dict[str, Any]) -> str:
    text = f"{s['completed']}/{s['runs']}"
    others = [o for o in s["outcomes"] if o != "completed"]
    return text + (f" ({','.join(others)})" if others else "")


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Column names and cells; with a QEMU side every cell reads ``livemig / QEMU``."""
    vs = any("qemu" in sc for sc in result["scenarios"])
    head = ["size", "rate MiB/s", "strategy", "done", *(c[0] for c in COLUMNS), "verified",
            "guest ok"]  # fmt: skip
    rows = []

    def cell(text_lm: str, text_qm: str) -> str:
        return f"{text_lm} / {text_qm}" if vs else text_lm

    for sc in result["scenarios"]:
        sides = [(str(sc["rate_mib_s"]), sc["livemig"], sc.get("qemu"))]
        matched = sc.get("matched")
        if matched:  # the re-run side beside the other VM's same runs
            vm = matched["vm"]
            lm = sc["livemig_matched"] if vm == "livemig" else sc["livemig"]
            qm = sc["qemu_matched"] if vm == "qemu" else sc["qemu"]
            sides.append((f"{matched['rate_mib_s']} (matched)", lm, qm))
        for rate, lm, qm in sides:
            row = [format_size(sc["size"]), rate, sc["strategy"],
                   cell(_done(lm), _done(qm) if qm else "-")]  # fmt: skip
            for _, name, scale, digits in COLUMNS:
                row.append(cell(_fig(lm, name, scale, digits),
                                _fig(qm, name, scale, digits) if qm else "-"))  # fmt: skip
            row.append(cell(_flag(lm["verified"]), "n/a"))  # QEMU has no RAM hash comparison
            row.append(cell(_flag(lm["guest_ok"]), _flag(qm["guest_ok"]) if qm else "-"))
            rows.append(row)
    return head, rows


def render(result: dict[str, Any]) -> Any:
    from rich.table import Table

    cfg = result["config"]
    vs = any("qemu" in sc for sc in result["scenarios"])
    title = (f"livemig bench matrix ({result['date']}), median of completed runs "
             "((at the limit) when none completed), "
             f"max-bandwidth {format_size(cfg['bandwidth']) if cfg['bandwidth'] else 'unlimited'}"
             f", downtime-limit {cfg['downtime_limit']} ms, limit {cfg['limit_seconds']:g} s"
             + (f", avail-switchover-bandwidth {format_size(asb)}"
                if (asb := cfg.get("avail_switchover_bandwidth")) else "")
             + (f", livemig / {result.get('qemu') or 'QEMU'} TCG" if vs else ""))  # fmt: skip
    table = Table(title=title)
    head, rows = table_rows(result)
    for i, col in enumerate(head):
        table.add_column(col, justify="left" if i in (0, 2) else "right")
    for row in rows:
        table.add_row(*row)
    return table


def why_lines(result: dict[str, Any]) -> list[str]:
    """One line per VM and cell that did not converge, saying why, and one per cell whose
    guests did not dirty memory at comparable rates."""
    lines = []
    qemu = result.get("qemu") or "QEMU"
    for sc in result["scenarios"]:
        cell = f"{format_size(sc['size'])} {sc['rate_mib_s']} MiB/s {sc['strategy']}"
        matched = sc.get("matched") or {}
        for vm, label in (("livemig", "livemig"), ("qemu", qemu),
                          ("livemig_matched", f"livemig at {matched.get('rate_mib_s')} MiB/s"),
                          ("qemu_matched", f"{qemu} at {matched.get('rate_mib_s')} MiB/s")):  # fmt: skip
            why = sc.get(vm, {}).get("why")
            if why:
                lines.append(f"{cell}, {label}: {why}")
        note = like_for_like_note(sc, qemu)
        if note:
            lines.append(note)
    return lines


# -- command line ------------------------------------------------------------------------------


def _list(conv: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            return [conv(s.strip()) for s in text.split(",") if s.strip()]
        except (ValueError, LivemigError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return parse


def _rate(text: str) -> int | str:
    if text == "max":
        return "max"
    value = int(text)
    if value < 0:
        raise ValueError(f"dirty rate {value} MiB/s: must be >= 0 (or 'max')")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("matrix", help="scenario matrix (size x dirty rate x strategy), "
                       "optionally beside real QEMU (10.0 by default)")  # fmt: skip
    p.add_argument("--sizes", type=_list(parse_size), default=None, help="guest RAM sizes (256M)")
    p.add_argument("--rates", type=_list(_rate), default=None,
                   help="dirty rates in MiB/s, 0 = idle, max = flat out (0,50,200)")  # fmt: skip
    p.add_argument("--strategies", type=_list(str), default=None,
                   help="precopy,autoconverge,postcopy,multifdN[-zstd|-zlib] "
                   "(precopy,autoconverge,postcopy,multifd4)")  # fmt: skip
    p.add_argument("--repeat", type=int, default=1, help="runs per scenario (median)")
    p.add_argument("--limit-seconds", type=float, default=LIMIT_SECONDS,
                   help="cancel a migration not finished after this long (30: QEMU's "
                   "auto-converge needs 9 raises x 2 periods >= 1 s, at least 18 s, to reach "
                   "its 99 %% cap, then its last passes)")  # fmt: skip
    p.add_argument("--set", dest="params", action="append", type=setting, default=[],
                   metavar="PARAM=VALUE", help="max-bandwidth (128M, QEMU's default; 0 = "
                   "unlimited), downtime-limit (300 ms) or avail-switchover-bandwidth (0: "
                   "measured; QEMU 8.2+), named as for livemig migrate, set on both VMs")  # fmt: skip
    p.add_argument("--ws-share", type=float, default=0.25,
                   help="working set as a share of guest RAM (0.25)")  # fmt: skip
    p.add_argument("--smp", type=int, default=1, help="livemig vCPUs (QEMU runs -smp 1)")
    p.add_argument("--no-verify", action="store_true", help="no livemig x-verify RAM hashes")
    p.add_argument("--no-return-path", action="store_true",
                   help="capability return-path off on both sides (needs --no-verify); QEMU's "
                   "downtime then ends at its last byte sent, livemig's at its close")  # fmt: skip
    p.add_argument("--vs-qemu", action="store_true",
                   help="the same scenarios on real QEMU, 10.0 by default (TCG, Linux guest; slow)")  # fmt: skip
    p.add_argument("--match-rates", action="store_true",
                   help="with --vs-qemu: where one VM's guest dirtied memory well below the "
                   "other's (measured), re-run the faster one at the slower one's measured rate "
                   "and show it as a row of its own, like for like")  # fmt: skip
    p.add_argument("--json", metavar="FILE", default=None, help="write the results as JSON")
    p.set_defaults(func=main)


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = Config()
    for name in ("sizes", "rates", "strategies"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    for s in cfg.strategies:
        parse_strategy(s)
    if not (cfg.sizes and cfg.rates and cfg.strategies):
        raise UsageError("--sizes, --rates and --strategies need at least one value each")
    if args.repeat < 1:
        raise UsageError("--repeat must be at least 1")
    if args.limit_seconds <= 0:
        raise UsageError("--limit-seconds must be positive")
    if not 0 < args.ws_share <= 0.75:
        raise UsageError("--ws-share must be in (0, 0.75]: the guest needs room beside it")
    params = dict(args.params)
    unknown = set(params) - {"max-bandwidth", "downtime-limit", "avail-switchover-bandwidth"}
    if unknown:
        raise UsageError(f"--set: bench matrix takes max-bandwidth, downtime-limit and "
                         f"avail-switchover-bandwidth, not {', '.join(sorted(unknown))}")  # fmt: skip
    cfg.repeat, cfg.limit_seconds = args.repeat, args.limit_seconds
    cfg.bandwidth = params.get("max-bandwidth", cfg.bandwidth)
    cfg.downtime_limit = params.get("downtime-limit", cfg.downtime_limit)
    cfg.avail_switchover_bandwidth = params.get("avail-switchover-bandwidth", 0)
    cfg.ws_share, cfg.smp = args.ws_share, args.smp
    cfg.verify, cfg.vs_qemu = not args.no_verify, args.vs_qemu
    cfg.return_path = not args.no_return_path
    cfg.match_rates = args.match_rates
    if cfg.match_rates and not cfg.vs_qemu:
        raise UsageError("--match-rates needs --vs-qemu: it matches livemig's and QEMU's guests")
    if cfg.verify and not cfg.return_path:
        raise UsageError("--no-return-path needs --no-verify: x-verify's verdict comes back on "
                         "the return path")  # fmt: skip
    return cfg


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    cfg = config_from_args(args)
    err = Console(stderr=True)
    result = run_matrix(cfg, progress=lambda s: err.print(f"[dim]bench matrix: {s}[/]"))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
        err.print(f"bench matrix: results in {args.json}")
    out = table_console()
    out.print(render(result))
    for line in why_lines(result):
        out.print(line)
    return 0
