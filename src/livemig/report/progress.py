"""Following a migration over QMP: polling ``query-migrate``, a live display, and the summary.

Works against any QMP server that speaks QEMU's migration commands: a livemig process or QEMU
itself. ``follow`` polls until the migration ends and returns the last reply; the display is
drawn with rich on a terminal (a table refreshed in place), and is one plain line a second when
the output is a file or a pipe (nothing when ``quiet``). A failed or cancelled migration's reply
has no RAM figures (QEMU's too): ``follow`` keeps the last ones seen under ``x-last-progress``,
so the summary says what was sent before it ended.
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


def _postcopy(info: dict[str, Any]) -> bool:
    return str(info.get("status", "")).startswith("postcopy")


def progress_line(info: dict[str, Any], verdict: str = "", left: float | None = None) -> str:
    """``status · pass N · verdict, ETA``: the words of the display, above its numbers."""
    ram = info.get("ram", {})
    status = info.get("status", "none")
    parts = [status]
    if "dirty-sync-count" in ram and not _postcopy(info):
        parts.append(f"pass {ram['dirty-sync-count']}")
    eta = None if left is None or status in FINAL else f"about {left:.1f} s left"
    if verdict and verdict != status:
        parts.append(verdict if eta is None else f"{verdict}, {eta}")
    elif eta is not None:
        parts.append(eta)
    return " · ".join(parts)


def _numbers(info: dict[str, Any]) -> list[str]:
    """sent, left, dirtied, Mbit/s, exp. downtime, time: what the display shows in figures.
    Post-copy has no downtime ahead and no dirtying that matters (the guest runs on the
    destination): those show as "-"."""
    ram = info.get("ram", {})
    rate = ram.get("dirty-pages-rate", 0) * ram.get("page-size", 4096)
    pc = _postcopy(info)
    if info.get("status") == "completed":
        downtime = f"{info.get('downtime', 0)} ms"
    elif pc:
        downtime = "-"
    else:
        downtime = f"{info.get('expected-downtime', 0)} ms"
    return [
        _mib(ram.get("transferred", 0)),
        _mib(ram.get("remaining", 0)),
        "-" if pc else f"{_mib(rate)}/s",
        f"{ram.get('mbps', 0):.0f}",
        downtime,
        f"{info.get('total-time', 0) / 1000:.1f} s",
    ]


COLUMNS = ("sent", "left", "dirtied", "Mbit/s", "exp. downtime", "time")


def progress_table(info: dict[str, Any], verdict: str = "", left: float | None = None
                   ) -> Table:  # fmt: skip
    """One status table from a ``query-migrate`` reply, with the judge's verdict and ETA.

    The words go in the title and the numbers in six columns, so that the display fits an
    80-column terminal (and a log file, where rich assumes 80) without wrapping a cell.
    """
    t = Table(title=progress_line(info, verdict, left), title_justify="left",
              show_header=True, header_style="bold", box=None, pad_edge=False)  # fmt: skip
    for col in COLUMNS:
        t.add_column("downtime" if col == "exp. downtime" and info.get("status") == "completed"
                     else col, justify="right", no_wrap=True)  # fmt: skip
    t.add_row(*_numbers(info))
    return t


def plain_line(info: dict[str, Any], verdict: str = "", left: float | None = None) -> str:
    """One line of progress for a log file or a pipe."""
    nums = dict(zip(COLUMNS, _numbers(info), strict=True))
    return (f"{progress_line(info, verdict, left)}: sent {nums['sent']}, left {nums['left']}, "
            f"{nums['Mbit/s']} Mbit/s, {nums['time']}")  # fmt: skip


def with_last_progress(info: dict[str, Any], last: dict[str, Any] | None) -> dict[str, Any]:
    """A failed or cancelled reply (no RAM figures) with the last ones seen before it."""
    if "ram" in info or last is None or "ram" not in last:
        return info
    if info.get("status") not in ("failed", "cancelled"):
        return info
    return {**info, "x-last-progress": {"ram": last["ram"], "total-time": last.get("total-time")}}


class ProgressDisplay:
    """The display of a migration being followed: called with each ``query-migrate`` reply, it
    draws a table refreshed in place on a terminal, or one plain line a second (and the final
    one) on a file or a pipe; nothing when ``quiet``. It keeps the last RAM figures seen and
    returns each reply with them (``with_last_progress``). The live table starts with the
    first reply and ends with ``stop`` (or the ``with`` block)."""

    def __init__(self, console: Console | None = None, *, quiet: bool = False,
                 until: tuple[str, ...] = FINAL) -> None:  # fmt: skip
        from livemig.migration.planner import ProgressJudge

        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.until = until
        self.judge = ProgressJudge()
        self.t0: float | None = None
        self.last: dict[str, Any] | None = None  # the last reply with RAM figures
        self.live: Live | None = None
        self._stopped = False
        self._next_line = 0.0

    def __call__(self, info: dict[str, Any]) -> dict[str, Any]:
        now = time.monotonic()
        if self.t0 is None:
            self.t0 = now
            if not self.quiet and self.console.is_terminal and not self._stopped:
                self.live = Live(console=self.console, refresh_per_second=8, transient=False)
                self.live.start()
        if "ram" in info:
            self.last = info
        else:
            info = with_last_progress(info, self.last)
        verdict, left = self.judge.update(now - self.t0, info)
        last = self.last
        shown = info if "ram" in info or last is None else {**last, **info,
                                                             "ram": last["ram"]}  # fmt: skip
        final = info.get("status") in self.until
        if self.live is not None:
            self.live.update(progress_table(shown, verdict, left))
        elif not self.quiet and not self._stopped and (now >= self._next_line or final):
            self.console.print(plain_line(shown, verdict, left), highlight=False, soft_wrap=True)
            self._next_line = now + 1.0
        return info

    def stop(self) -> None:
        """End the display (the live table stays as last drawn); later replies draw nothing."""
        self._stopped = True
        if self.live is not None:
            self.live.stop()
            self.live = None

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def follow(
    query: Callable[[], dict[str, Any]],
    *,
    interval: float = 0.2,
    timeout: float | None = None,
    console: Console | None = None,
    quiet: bool = False,
    on_poll: Callable[[dict[str, Any]], None] | None = None,
    until: tuple[str, ...] = FINAL,
) -> dict[str, Any]:
    """Poll until the migration reaches a final state (or one of ``until``: ``colo`` for a
    replication, which never ends by itself), showing it (``ProgressDisplay``); returns the
    last reply, with the last RAM figures seen if it has none (``with_last_progress``)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with ProgressDisplay(console, quiet=quiet, until=until) as display:
        while True:
            info = query()
            if on_poll is not None:
                on_poll(info)
            info = display(info)
            if info.get("status") in until:
                return info
            if deadline is not None and time.monotonic() > deadline:
                return info
            time.sleep(interval)


def postcopy_summary(dest_info: dict[str, Any]) -> str | None:
    """The destination's post-copy figures in one line (None when no page was requested)."""
    pc = dest_info.get("x-postcopy")
    if not pc or not pc.get("requests"):
        return None
    lat = pc.get("latency", {})
    return (f"{pc['requests']} (p50 {lat.get('p50-us', '?')} us, p99 {lat.get('p99-us', '?')} "
            f"us), blocktime {pc.get('blocktime-ms', '?')} ms")  # fmt: skip


def _zero_pages(ram: dict[str, Any]) -> str:
    """QEMU's "duplicate", split as livemig sends them: zero records in the stream (what
    ``livemig analyze`` counts) and pages never populated, which are not sent at all."""
    dup = ram.get("duplicate", 0)
    unpop = ram.get("x-unpopulated")
    if not unpop:
        return str(dup)
    return f"{dup} ({dup - unpop} as zero records, {unpop} never populated: not sent)"


def _verify_ms(info: dict[str, Any], dest_info: dict[str, Any] | None) -> tuple[float, str]:
    """Milliseconds of --verify hashing inside the blackout, and where they were measured."""
    src = info.get("x-verify-ms")
    if src is None:
        return 0.0, ""
    dst = (dest_info or {}).get("x-verify-ms")
    if dst is None:
        return float(src), f"source {src:.0f} ms; the destination hashed too"
    return float(src) + float(dst), f"source {src:.0f} ms + destination {dst:.0f} ms"


def summary_table(info: dict[str, Any], extra: dict[str, Any] | None = None,
                  dest_info: dict[str, Any] | None = None) -> Table:  # fmt: skip
    """The final summary of a migration. The downtime is the migration's own: --verify's
    hashing, which stops the guest too, is its own line. A failed run shows what it had sent
    (``x-last-progress``, from ``follow``)."""
    ram = info.get("ram", {})
    last = info.get("x-last-progress")
    t = Table(title="migration summary", show_header=False, box=None)
    t.add_column(style="bold")
    t.add_column(justify="right")
    rows: list[tuple[str, str]] = [("status", info.get("status", "?"))]
    if "error-desc" in info:
        rows.append(("error", info["error-desc"]))
    if not ram and last:
        lram = last["ram"]
        rows += [
            ("sent before it ended", f"{_mib(lram.get('transferred', 0))} in "
             f"{(last.get('total-time') or 0) / 1000:.1f} s, {lram.get('dirty-sync-count', 0)} "
             "passes (at the last progress sample)"),
        ]  # fmt: skip
    if ram:
        downtime = f"{info.get('downtime', '-')} ms"
        verify, where = _verify_ms(info, dest_info)
        if verify and isinstance(info.get("downtime"), int | float):
            downtime = f"{max(0.0, info['downtime'] - verify):.0f} ms"
        rows += [
            ("total time", f"{info.get('total-time', 0)} ms"),
            ("setup time", f"{info.get('setup-time', 0)} ms"),
            ("downtime", downtime),
        ]
        if verify:
            rows.append(("verification", f"{verify:.0f} ms more, guest stopped ({where})"))
        rows += [
            ("passes (dirty syncs)", str(ram.get("dirty-sync-count", 0))),
            ("transferred", _mib(ram.get("transferred", 0))),
            ("throughput", f"{ram.get('mbps', 0):.0f} Mbit/s"),
            ("pages sent", str(ram.get("normal", 0))),
            ("zero pages", _zero_pages(ram)),
            ("guest RAM", _mib(ram.get("total", 0))),
        ]
    for k, v in (extra or {}).items():
        rows.append((k, str(v)))
    for k, v in rows:
        t.add_row(k, v)
    return t
