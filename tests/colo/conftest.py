"""Fixtures for the end-to-end tests: a ProcHarness whose processes die at teardown."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from livemig.testing.procs import ProcHarness


@pytest.fixture
def harness() -> Iterator[ProcHarness]:
    with ProcHarness(memory="64M", smp=2) as h:
        yield h
