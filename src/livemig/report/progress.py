"""Following a migration over QMP: polling ``query-migrate``, a live display, and the summary.

Works against any QMP server that speaks QEMU's migration commands: a livemig process or QEMU
itself. ``follow`` polls until the migration ends and returns the last reply; the display is
drawn with rich (a one-line refresh on a terminal, nothing when ``quiet``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from livemig.units import format_size

FINAL = ("completed", "failed", "cancelled")


def _mib(n: float) -> str:
    return format_size(n)


def progress_line(info: dict[str, Any], verdict: str = "", left: float | None = None) -> str:
    """``status · pass N · verdict, ETA``: the words of the display, above its numbers."""
    ram = info.get("ram", {})
    status = info.get("status", "none")
    parts = [status]
    if "dirty-sync-count" in ram:
        parts.append(f"pass {ram['dirty-sync-count']}")
    if verdict and verdict != status:
        parts.append(verdict if left is None else f"{verdict}, about {left:.1f} s left")
    return " · ".join(parts)


def progress_table(info: dict[str, Any], verdict: str = "", left: float | None = None
                   ) -> Table:  # fmt: skip
    """One status table from a ``query-migrate`` reply, with the judge's verdict and ETA.

    The words go in the title and the numbers in six columns, so that the display fits an
    80-column terminal (and a log file, where rich assumes 80) without wrapping a cell.
    """
    ram = info.get("ram", {})
    t = Table(title=progress_line(info, verdict, left), title_justify="left",
              show_header=True, header_style="bold", box=None, pad_edge=False)  # fmt: skip
    for col in ("sent", "left", "dirtied", "Mbit/s", "exp. downtime", "time"):
        t.add_column(col, justify="right", no_wrap=True)
    rate = ram.get("dirty-pages-rate", 0) * ram.get("page-size", 4096)
    t.add_row(
        _mib(ram.get("transferred", 0)),
        _mib(ram.get("remaining", 0)),
        f"{_mib(rate)}/s",
        f"{ram.get('mbps', 0):.0f}",
        f"{info.get('expected-downtime', info.get('downtime', 0))} ms",
        f"{info.get('total-time', 0) / 1000:.1f} s",
    )
    return t


def follow(
    query: Callable[[], dict[str, Any]],
    *,
    interval: float = 0.2,
    timeout: float | None = None,
    console: Console | None = None,
    quiet: bool = False,
    on_poll: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Poll until the migration reaches a final state; returns the last reply."""
    console = console or Console(stderr=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    from livemig.migration.planner import ProgressJudge

    judge = ProgressJudge()
    t0 = time.monotonic()
    info: dict[str, Any] = {}
    live = None if quiet else Live(console=console, refresh_per_second=8, transient=False)
    try:
        if live is not None:
            live.start()
        while True:
            info = query()
            if on_poll is not None:
                on_poll(info)
            verdict, left = judge.update(time.monotonic() - t0, info)
            if live is not None:
                live.update(progress_table(info, verdict, left))
            if info.get("status") in FINAL:
                return info
            if deadline is not None and time.monotonic() > deadline:
                return info
            time.sleep(interval)
    finally:
        if live is not None:
            live.stop()
            if not console.is_terminal:
                # rich ends a live display with a newline only on a terminal; in a log file
                # the next line would start at the end of the table's last row
                console.line()


def postcopy_summary(dest_info: dict[str, Any]) -> str | None:
    """The destination's post-copy figures in one line (None when no page was requested)."""
    pc = dest_info.get("x-postcopy")
    if not pc or not pc.get("requests"):
        return None
    lat = pc.get("latency", {})
    return (f"{pc['requests']} (p50 {lat.get('p50-us', '?')} us, p99 {lat.get('p99-us', '?')} "
            f"us), blocktime {pc.get('blocktime-ms', '?')} ms")  # fmt: skip


def summary_table(info: dict[str, Any], extra: dict[str, Any] | None = None) -> Table:
    """The final summary of a migration."""
    ram = info.get("ram", {})
    t = Table(title="migration summary", show_header=False, box=None)
    t.add_column(style="bold")
    t.add_column(justify="right")
    rows: list[tuple[str, str]] = [("status", info.get("status", "?"))]
    if "error-desc" in info:
        rows.append(("error", info["error-desc"]))
    if ram:
        rows += [
            ("total time", f"{info.get('total-time', 0)} ms"),
            ("setup time", f"{info.get('setup-time', 0)} ms"),
            ("downtime", f"{info.get('downtime', '-')} ms"),
            ("passes (dirty syncs)", str(ram.get("dirty-sync-count", 0))),
            ("transferred", _mib(ram.get("transferred", 0))),
            ("throughput", f"{ram.get('mbps', 0):.0f} Mbit/s"),
            ("pages sent", str(ram.get("normal", 0))),
            ("zero pages", str(ram.get("duplicate", 0))),
            ("guest RAM", _mib(ram.get("total", 0))),
        ]
    for k, v in (extra or {}).items():
        rows.append((k, str(v)))
    for k, v in rows:
        t.add_row(k, v)
    return t
