"""``livemig bench memtrack``: dirty-tracking cost per backend, beside an untracked baseline.

For each backend, on one pre-faulted shared anonymous region (1 GiB by default; first touch is
slow here, so it is paid once before any timing): the time of ``sync()`` on a clean region and
on a fully dirty one, and the cost of dirtying it, one byte per page with numpy, tracked vs
untracked. The untracked write is measured in the same run, just before each backend, and the
tracked one is printed as a ratio to it. Each figure is the median of ``--repeat`` rounds.
"""

from __future__ import annotations

import argparse
import json
import mmap
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from livemig.bench.common import table_console
from livemig.errors import UsageError
from livemig.memtrack import TRACKERS, open_tracker, probe
from livemig.memtrack._sys import PAGE_SIZE, buffer_address
from livemig.units import format_size, parse_size


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("memtrack", help="dirty-tracking sync time and write overhead")
    parser.add_argument("--size", default="1G", help="region size (default 1G)")
    parser.add_argument(
        "--backend",
        action="append",
        choices=list(TRACKERS),
        help="backend to measure (repeatable; default: every backend that works here)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds per figure (median)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.set_defaults(func=run)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def _touch_every_page(pages: np.ndarray) -> None:
    pages[:, 0] += 1  # one byte per page: the guest-like write pattern being measured


def measure(size: int, backends: list[str], repeat: int) -> dict[str, Any]:
    """Run the benchmark; returns the figures (seconds) per backend and the baseline."""
    if size < PAGE_SIZE or size % PAGE_SIZE:
        raise UsageError(f"bench memtrack: --size must be a multiple of {PAGE_SIZE}, not {size}")
    if repeat < 1:
        raise UsageError("bench memtrack: --repeat must be at least 1")
    area = mmap.mmap(-1, size, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    view = memoryview(area)
    pages = np.frombuffer(area, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    npages = len(pages)
    prefault_s, _ = _timed(lambda: pages[:, ::512].fill(1))
    region = ("bench.ram", buffer_address(view), size, view)
    results: dict[str, Any] = {
        "size": size,
        "pages": npages,
        "prefault_s": prefault_s,
        "backends": {},
    }
    for name in backends:
        # The first write after a tracker stopped takes one minor fault per page (the kernel
        # left the PTEs read-only): warm up once so the baseline is a plain store.
        _touch_every_page(pages)
        base = statistics.median(_timed(lambda: _touch_every_page(pages))[0] for _ in range(repeat))
        tracker = open_tracker([region], name)
        start_s, _ = _timed(tracker.start)
        clean, write, dirty = [], [], []
        try:
            for _ in range(repeat):
                tracker.sync()
                clean.append(_timed(tracker.sync)[0])
                write.append(_timed(lambda: _touch_every_page(pages))[0])
                seconds, bitmaps = _timed(tracker.sync)
                found = int(bitmaps["bench.ram"].sum())
                if found != npages:
                    raise UsageError(f"bench memtrack: {name} found {found} of {npages} pages")
                dirty.append(seconds)
        finally:
            tracker.stop()
        tracked = statistics.median(write)
        results["backends"][name] = {
            "start_s": start_s,
            "clean_sync_s": statistics.median(clean),
            "dirty_sync_s": statistics.median(dirty),
            "write_untracked_s": base,
            "write_tracked_s": tracked,
            "write_overhead_per_page_us": (tracked - base) / npages * 1e6,
            "write_ratio": tracked / base if base > 0 else float("inf"),
        }
    return results


def _print(results: dict[str, Any], console: Console) -> None:
    size, npages = results["size"], results["pages"]
    table = Table(
        title=f"dirty tracking, {format_size(size)} region ({npages} pages), "
        f"pre-faulted in {results['prefault_s']:.2f} s"
    )
    table.add_column("backend", no_wrap=True)
    for column in ("start ms", "clean sync ms", "dirty sync ms", "write ms", "tracked ms"):
        table.add_column(column, justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("µs/page", justify="right")
    for name, r in results["backends"].items():
        table.add_row(
            name,
            f"{r['start_s'] * 1e3:.1f}",
            f"{r['clean_sync_s'] * 1e3:.2f}",
            f"{r['dirty_sync_s'] * 1e3:.2f}",
            f"{r['write_untracked_s'] * 1e3:.2f}",
            f"{r['write_tracked_s'] * 1e3:.2f}",
            f"{r['write_ratio']:.1f}x" if r["write_ratio"] < 100 else f"{r['write_ratio']:.0f}x",
            f"{r['write_overhead_per_page_us']:.2f}",
        )
    console.print(table)
    console.print(
        "write = one byte stored into every page with numpy, untracked; tracked = the same "
        "while tracking; ratio = tracked / write, both measured in this run; µs/page = added "
        "cost of the first write to a page."
    )


def run(args: argparse.Namespace) -> int:
    size = parse_size(args.size, "--size")
    console = table_console(stderr=args.json)
    backends = args.backend or list(TRACKERS)
    usable = []
    for name in backends:
        reason = probe(name)
        if reason is None:
            usable.append(name)
        else:
            console.print(f"[yellow]skipping {name}: {reason}[/yellow]")
    if not usable:
        raise UsageError("bench memtrack: no requested backend works on this kernel")
    results = measure(size, usable, args.repeat)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print(results, console)
    return 0
