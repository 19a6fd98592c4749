"""query-migrate's ``downtime`` in whole milliseconds, counted as QEMU counts it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from livemig.migration.stats import MigrationStats, qemu_ms_between


def test_two_millisecond_clocks_subtracted_as_qemu_does() -> None:
    # QEMU: downtime = qemu_clock_get_ms(end) - qemu_clock_get_ms(start), each truncated.
    assert qemu_ms_between(100.0009, 100.0011) == 1  # 0.2 ms across a millisecond tick
    assert qemu_ms_between(100.0001, 100.0009) == 0  # 0.8 ms within one
    assert qemu_ms_between(100.0005, 100.0023) == 2  # 1.8 ms across two ticks


def test_stats_report_qemus_count_not_the_truncated_duration() -> None:
    s = MigrationStats()
    s.set_downtime(100.0005, 100.0023)
    assert abs(s.downtime - 0.0018) < 1e-9
    assert s.downtime_ms == 2  # truncating the duration (livemig before) said 1: too kind


@given(st.floats(1.0, 1e6), st.floats(0.0, 0.05))
def test_never_more_than_a_millisecond_either_side(start: float, length: float) -> None:
    ms = qemu_ms_between(start, start + length)
    assert length * 1000 - 1 - 1e-6 <= ms <= length * 1000 + 1 + 1e-6
