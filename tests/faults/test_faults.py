"""Fault injection between real processes, at setup, pre-copy, completion and post-copy (issue 7).

Each case runs one scenario of ``livemig.bench.faults`` (the same code ``livemig bench faults``
tabulates) and asserts every check it made. Pre-copy: the source guest runs on with its memory
intact, ``query-migrate`` says failed with a reason, the destination exits 1 (or never runs the
guest), no fd or thread is left behind, and a second migration completes. Post-copy: a cut
link or a stalled peer pauses both sides and ``migrate-recover`` + ``migrate resume`` completes
and verifies; a killed source leaves the destination failed with its incomplete guest stopped;
a killed destination leaves the source paused, its guest never restarted (that guest is lost,
as in QEMU: ``expected_loss``). The guest never runs on both sides. Pre-copy cut links, killed
destinations and cancels are in tests/e2e.
"""

from __future__ import annotations

import pytest

from livemig.bench.faults import SCENARIOS, run_fault
from livemig.testing.procs import ProcHarness


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("fault", "phase"), SCENARIOS, ids=[f"{f}-{p}" for f, p in SCENARIOS])
def test_fault(fault: str, phase: str) -> None:
    with ProcHarness(memory="32M", smp=1) as h:
        res = run_fault(fault, phase, h)
    if res.skipped:
        pytest.skip(res.skipped)
    failed = [k for k, v in res.checks.items() if not v]
    assert not failed, f"{fault} at {phase}: {failed}; {res.detail}"
    assert not res.guest_lost or res.expected_loss
    assert res.survived
