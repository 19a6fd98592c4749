"""SwitchoverRefiner: one more pass only when it cuts the blackout by at least a quarter."""

from __future__ import annotations

from livemig.migration.convergence import SwitchoverRefiner

MiB = 1 << 20
GBs = 1e9


def test_zero_passes_is_qemu_rule() -> None:
    assert not SwitchoverRefiner(0).another_pass(100 * MiB, 0.0, GBs)


def test_slow_dirtier_gets_extra_passes_while_they_halve() -> None:
    r = SwitchoverRefiner(3)
    # 50 MB/s against 1 GB/s: re-sending 100 MiB dirties ~5 MiB meanwhile
    assert r.another_pass(100 * MiB, 50e6, GBs)
    assert r.another_pass(6 * MiB, 50e6, GBs)
    assert r.another_pass(2 * MiB, 50e6, GBs)
    assert not r.another_pass(1.5 * MiB, 50e6, GBs), "max_passes reached"
    assert r.passes == 3


def test_fast_dirtier_switches_at_once() -> None:
    # the guest would dirty more than three quarters of what we re-send: no gain worth a pass
    assert not SwitchoverRefiner(3).another_pass(100 * MiB, 0.8 * GBs, GBs)


def test_guest_at_two_thirds_of_the_link_gets_passes() -> None:
    """The bench matrix's matched 200 MiB/s cells: ~85 of 128 MiB/s. Each pass leaves ~2/3 of
    what it started with; with a half as the bar the blackout carried all of it."""
    r = SwitchoverRefiner(3)
    link = 128 * MiB
    assert r.another_pass(36 * MiB, 85 * MiB, link)
    assert r.another_pass(24 * MiB, 85 * MiB, link)
    assert r.another_pass(16 * MiB, 85 * MiB, link)
    assert r.passes == 3


def test_pass_that_did_not_shrink_by_a_quarter_stops_refining() -> None:
    r = SwitchoverRefiner(5)
    assert r.another_pass(100 * MiB, 10e6, GBs)
    assert not r.another_pass(80 * MiB, 10e6, GBs)
    # and it stays off, even if the next figures look good again
    assert not r.another_pass(10 * MiB, 10e6, GBs)


def test_small_remainder_and_unknown_bandwidth_switch() -> None:
    assert not SwitchoverRefiner(3).another_pass(SwitchoverRefiner.FLOOR, 0.0, GBs)
    assert not SwitchoverRefiner(3).another_pass(100 * MiB, 0.0, 0.0)
