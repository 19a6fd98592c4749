"""The live migration display: it fits 80 columns and says what the judge concluded."""

from __future__ import annotations

import io

from rich.console import Console

from livemig.migration.planner import ProgressJudge
from livemig.report.progress import (
    ProgressDisplay,
    follow,
    progress_line,
    progress_table,
    summary_table,
)

BUSY = {
    "status": "active",
    "total-time": 1234567,
    "expected-downtime": 30000,
    "ram": {
        "transferred": 123 << 40,
        "remaining": 345 << 30,
        "dirty-pages-rate": 10**7,
        "page-size": 4096,
        "mbps": 123456.7,
        "dirty-sync-count": 1234,
    },
}


def _render(table: object, width: int = 80) -> list[str]:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(table)
    return out.getvalue().splitlines()


def test_display_fits_80_columns_without_wrapping_a_cell() -> None:
    lines = _render(progress_table(BUSY, "diverging", 123.4))
    assert len(lines) == 3, lines  # title, header, one row: nothing wrapped
    assert all(len(line.rstrip()) <= 80 for line in lines)
    assert lines[0].startswith("active · pass 1234 · diverging, about 123.4 s left")
    assert "123.0 TiB" in lines[2] and "345.0 GiB" in lines[2] and "30000 ms" in lines[2]


def test_verdict_equal_to_status_is_not_repeated() -> None:
    assert progress_line({"status": "completed", "ram": {"dirty-sync-count": 4}},
                         "completed", 0.0) == "completed · pass 4"  # fmt: skip
    assert progress_line({"status": "setup"}) == "setup"


def test_follow_ends_its_display_with_a_newline_in_a_log_file() -> None:
    out = io.StringIO()
    console = Console(file=out, width=80, color_system=None)
    replies = iter([dict(BUSY, status="active"), dict(BUSY, status="completed")])
    final = follow(lambda: next(replies), interval=0, console=console)
    console.print("next line")
    assert final["status"] == "completed"
    assert "\nnext line" in out.getvalue()


def test_post_copy_has_no_pass_count_and_no_downtime_ahead() -> None:
    pc = dict(BUSY, status="postcopy-active")
    verdict, left = ProgressJudge().update(1.0, pc)
    assert verdict == "guest on the destination, pulling the rest" and left is not None
    lines = _render(progress_table(pc, verdict, left))
    assert "pass" not in lines[0] and "first pass" not in lines[0]
    row = lines[-1].split()
    assert row[4] == "-" and row[6] == "-", row  # dirtied, exp. downtime
    assert "30000 ms" not in lines[-1]


def test_first_pass_is_only_the_first() -> None:
    j = ProgressJudge()
    ram = {"remaining": 100 << 20, "mbps": 800.0, "dirty-pages-rate": 0, "page-size": 4096}
    assert j.update(0, {"status": "active", "ram": dict(ram, **{"dirty-sync-count": 1})})[0] \
        == "first pass"  # fmt: skip
    for n in (2, 3):
        verdict, left = j.update(
            n, {"status": "active", "ram": dict(ram, **{"dirty-sync-count": n})}
        )
        assert verdict == "" and left is not None
        line = progress_line({"status": "active", "ram": {"dirty-sync-count": n}}, verdict, left)
        assert line.startswith(f"active · pass {n} · about ") and "first" not in line


def test_a_pipe_gets_a_line_a_second_and_a_failed_run_says_what_it_sent() -> None:
    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None)  # not a terminal
    replies = iter([dict(BUSY)] * 6 + [{"status": "failed", "error-desc": "link down"}])
    final = follow(lambda: next(replies), interval=0.45, console=console)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    assert 3 <= len(lines) <= 5, lines  # ~2.7 s: t=0, 1, 2 and the final line
    assert lines[0].startswith("active · pass 1234") and "sent 123.0 TiB" in lines[0]
    assert lines[-1].startswith("failed") and "sent 123.0 TiB" in lines[-1]
    assert final["x-last-progress"]["ram"]["transferred"] == 123 << 40
    summary = "\n".join(_render(summary_table(final), 120))
    assert "sent before it ended" in summary and "123.0 TiB in 1234.6 s" in summary


def test_verification_is_its_own_line_not_downtime() -> None:
    done = {"status": "completed", "downtime": 87, "x-verify-ms": 35.0, "total-time": 900,
            "ram": {"transferred": 1, "dirty-sync-count": 3}}  # fmt: skip
    text = "\n".join(_render(summary_table(done, None, {"x-verify-ms": 40.0}), 120))
    assert "downtime" in text and " 12 ms" in text
    assert "75 ms more, guest stopped (source 35 ms + destination 40 ms)" in text


def test_setup_has_no_verdict_and_does_not_pin_the_countdown() -> None:
    j = ProgressJudge()
    assert j.update(0, {"status": "setup"}) == ("", None)
    ram = {"remaining": 100 << 20, "mbps": 800.0, "dirty-pages-rate": 0, "page-size": 4096,
           "dirty-sync-count": 1}  # fmt: skip
    verdict, left = j.update(0.2, {"status": "active", "ram": ram, "expected-downtime": 300})
    assert verdict == "first pass" and left is not None and left > 0.5


def test_zero_pages_split_as_analyze_counts_them() -> None:
    done = {"status": "completed", "downtime": 5, "total-time": 90,
            "ram": {"duplicate": 6139, "x-unpopulated": 6000, "dirty-sync-count": 2}}  # fmt: skip
    text = "\n".join(_render(summary_table(done), 140))
    assert "6139 (139 as zero records, 6000 never populated: not sent)" in text


def test_the_display_as_a_progress_callback_and_stopped_before_a_cancel_message() -> None:
    """What livemig migrate passes as control.migrate's on_progress: a line for the first
    reply, none after stop (the time-out or Ctrl-C message comes below the last one), and the
    failed reply given back with the last figures seen."""
    out = io.StringIO()
    display = ProgressDisplay(Console(file=out, width=200, color_system=None))
    assert display(dict(BUSY))["status"] == "active"
    display.stop()
    final = display({"status": "failed", "error-desc": "link down"})
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("active · pass 1234"), lines
    assert final["x-last-progress"]["ram"]["transferred"] == 123 << 40
