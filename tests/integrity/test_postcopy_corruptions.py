"""Live post-copy migrations damaged in transit (``livemig.testing.integrity_postcopy``): with
checksums on, none completes with RAM other than the source's; damage after the switch-over,
on the main or the preempt channel, pauses post-copy for a recovery instead of losing the
guest; a paused (-S) destination whose post-copy fails stops its incomplete guest for good."""

from __future__ import annotations

from pathlib import Path

import pytest

from livemig.testing.integrity_postcopy import Damage, migrate_once, run_postcopy_corruptions

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize(
    ("checksums", "preempt", "damage", "expected"),
    [
        # zeroed bytes on the main channel after the switch-over do not parse: with checksums
        # nothing of them reached the guest, and a recovery re-sends it (they failed the
        # migration and lost the guest before)
        (True, False, Damage(0, -1, "zero", part="main"), "recovered"),
        (True, True, Damage(0, -1, "zero", part="main"), "recovered"),
        # the same on the preempt channel (the thread ended quietly; its pages never came,
        # the migration failed at the end with pages missing)
        (True, True, Damage(1, 40960, "zero", part="preempt"), "recovered"),
        # a preempt channel cut is a broken link: pause, recover (the same failure before)
        (True, True, Damage(1, 30000, "cut", part="preempt"), "recovered"),
        (False, True, Damage(1, 30000, "cut", part="preempt"), "recovered"),
        # without checksums garbage on the preempt channel fails the migration at once; the
        # destination, started paused, stops the incomplete guest (internal-error): it stayed
        # paused before, and ``cont`` would have run it on zero-filled pages
        (False, True, Damage(1, 40960, "zero", part="preempt"), "stopped"),
    ],
    ids=["main-zero", "main-zero-preempt", "preempt-zero", "preempt-cut", "preempt-cut-unchecked",
         "preempt-zero-unchecked"],
)  # fmt: skip
def test_damage_after_the_switch_over(tmp_path: Path, checksums: bool, preempt: bool,
                                      damage: Damage, expected: str) -> None:  # fmt: skip
    outcome, detail, _layout, hit = migrate_once(checksums, preempt, damage, tmp_path)
    assert hit, (outcome, detail)
    assert outcome == expected, detail


def test_bounded_postcopy_corruptions_never_complete_wrong_with_checksums(tmp_path: Path) -> None:
    """The post-copy row of ``livemig bench faults --corruptions`` on a small scale."""
    tallies = run_postcopy_corruptions(3, seed=11, workdir=str(tmp_path))
    on, off = tallies["on"], tallies["off"]
    assert on.inputs + len([e for e in on.examples if "not counted" in e]) == 3
    assert on.wrong == 0, on.examples
    assert on.hangs == on.crashes == off.hangs == off.crashes == 0, (on, off)
    assert on.refused + on.identical + on.recovered + on.stopped == on.inputs
