"""A guest resumes exactly after stop/cont and every kind of migration (issue #24).

The compute guest in real ``livemig run`` processes, checked at every stop against its
host-side reference (``livemig.testing.exact``): hundreds of stop/cont cycles with randomised
timing and one migration of each kind (pre-copy, x-verify over TCP, multifd, post-copy with
and without preempt, XBZRLE, auto-converge, snapshots plain and mapped-ram, a paused guest, a
cancelled and a failed migration), with 2 vCPUs; a shorter chain with 1. Before the stop hook
(``livemig.machine.stop_hook``) this diverged within about 30 cycles.
"""

from __future__ import annotations

from pathlib import Path

from livemig.testing.exact import KINDS, SoakConfig, soak


def test_two_vcpus_every_kind_of_migration(tmp_path: Path) -> None:
    result = soak(SoakConfig(smp=2, cycles=300, rng_seed=24, workdir=str(tmp_path)))
    assert not result.problems, result.problems
    assert result.migrations == dict.fromkeys(KINDS, 1)
    assert result.cycles == 300 and result.checks >= 300 + len(KINDS)
    assert result.guest_ops > 100_000  # the guest really ran between the checks


def test_one_vcpu_chain(tmp_path: Path) -> None:
    kinds = ("precopy", "multifd", "postcopy", "snapshot", "paused")
    cfg = SoakConfig(smp=1, cycles=100, migrations=8, kinds=kinds, rng_seed=1,
                     workdir=str(tmp_path))  # fmt: skip
    result = soak(cfg)
    assert not result.problems, result.problems
    assert result.migrations_total == 8 and result.cycles == 100
