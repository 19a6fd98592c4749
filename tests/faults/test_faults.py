"""Fault injection between real processes, at setup, pre-copy and completion (issue 7).

Each case runs one scenario of ``livemig.bench.faults`` (the same code ``livemig bench faults``
tabulates) and asserts every check it made: the source guest runs on with its memory intact,
``query-migrate`` says failed with a reason, the destination exits 1 (or never runs the guest),
no fd or thread is left behind, and a second migration completes. Cut links, killed
destinations and cancels are in tests/e2e; post-copy cases skip until post-copy faults exist.
"""

from __future__ import annotations

import pytest

from livemig.bench.faults import SCENARIOS, run_fault
from livemig.testing_procs import ProcHarness


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("fault", "phase"), SCENARIOS, ids=[f"{f}-{p}" for f, p in SCENARIOS])
def test_fault(fault: str, phase: str) -> None:
    with ProcHarness(memory="32M", smp=1) as h:
        res = run_fault(fault, phase, h)
    if res.skipped:
        pytest.skip(res.skipped)
    failed = [k for k, v in res.checks.items() if not v]
    assert not failed, f"{fault} at {phase}: {failed}; {res.detail}"
    assert not res.guest_lost
    assert res.survived
