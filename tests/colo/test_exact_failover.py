"""A standby that takes over continues the guest *exactly* from its last checkpoint: the
deterministic compute guest, checked against its host-side reference at stop/cont cycles on
the replicated primary (checkpoints every 10-50 ms) and right after each takeover, through a
chain of three SIGKILLed primaries (``livemig.testing.exact``, kind ``failover``; the
every-kind soak of tests/e2e/test_exact_resume.py has one with 2 vCPUs)."""

from __future__ import annotations

from pathlib import Path

from livemig.testing.exact import SoakConfig, soak


def test_three_failovers_in_a_row_resume_exactly(tmp_path: Path) -> None:
    cfg = SoakConfig(smp=1, cycles=60, migrations=3, kinds=("failover",), rng_seed=22,
                     workdir=str(tmp_path))  # fmt: skip
    result = soak(cfg)
    assert not result.problems, result.problems
    assert result.migrations == {"failover": 3}
    assert result.checks >= 60 + 3 and result.guest_ops > 10_000
