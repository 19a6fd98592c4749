"""Fixtures for the dirty-tracking tests: small shared anonymous RAM regions, like RAM blocks."""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import numpy as np
import pytest

from livemig.memtrack import Region
from livemig.memtrack._sys import buffer_address


class Ram:
    """A shared anonymous mapping with a numpy view, as the machine hands RAM blocks over."""

    def __init__(self, name: str, size: int) -> None:
        self.map = mmap.mmap(-1, size, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self.map)
        self.array = np.frombuffer(self.map, dtype=np.uint8)
        self.words = self.array.view(np.uint64).reshape(-1, 512)  # one row per page
        self.region = Region(name, buffer_address(self.view), size, self.view)
        self.npages = size // 4096


@pytest.fixture
def ram() -> Iterator[Ram]:
    yield Ram("pc.ram", 4 << 20)


@pytest.fixture
def two_rams() -> Iterator[tuple[Ram, Ram]]:
    yield Ram("pc.ram", 2 << 20), Ram("vga.vram", 1 << 20)


@pytest.fixture
def make_ram() -> type[Ram]:
    """``Ram`` itself, for a test that needs fresh regions inside one test (hypothesis)."""
    return Ram
