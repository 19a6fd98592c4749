"""Fixtures for ``livemig.control``'s tests: real ``livemig run`` processes, killed at teardown."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from livemig.testing.procs import ProcHarness


@pytest.fixture
def harness() -> Iterator[ProcHarness]:
    with ProcHarness(memory="32M", smp=1) as h:
        yield h
