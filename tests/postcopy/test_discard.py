"""The post-copy discard thread (``migration/postcopy_discard.py``): what it was given is
dropped when ``wait`` returns, its failures fail the switch, nothing comes after the guest ran."""

from __future__ import annotations

import pytest

from livemig.errors import MigrationError
from livemig.machine.ram import RAMBlock
from livemig.memtrack._sys import MADV_DONTNEED, MADV_REMOVE
from livemig.memtrack.pagemap import present_pages
from livemig.migration.postcopy_discard import CHUNK, Discarder

PAGE = 4096


@pytest.fixture
def block():
    b = RAMBlock("pc.ram", 4 * CHUNK + 16 * PAGE, prefault=True)
    b.array[:] = 7
    yield b
    b.close()


@pytest.mark.parametrize("advice", [MADV_DONTNEED, MADV_REMOVE])
def test_ranges_are_dropped_when_wait_returns(block, advice: int) -> None:
    d = Discarder(advice)
    ranges = [(0, PAGE), (5 * PAGE, 3 * CHUNK + PAGE), (block.size - PAGE, PAGE)]  # > CHUNK too
    for start, length in ranges:
        d.add(block.host_addr + start, length)
    d.wait(10)
    present = present_pages(block.host_addr, block.size)
    dropped = sum(length for _, length in ranges) // PAGE
    assert block.npages - int(present.sum()) == dropped
    assert not present[0] and present[1] and not present[5] and not present[-1]
    assert d.busy > 0 and d.waited >= 0
    # MADV_REMOVE freed the pages (zero); MADV_DONTNEED only unmapped them (the page cache
    # still holds the old bytes, which minor faults replace)
    assert block.array[0] == (0 if advice == MADV_REMOVE else 7)
    with pytest.raises(MigrationError, match="after the guest was started"):
        d.add(block.host_addr, PAGE)


def test_nothing_to_drop_starts_no_thread() -> None:
    d = Discarder(MADV_REMOVE)
    d.wait(1)
    assert d._thread is None


def test_a_failed_madvise_fails_the_wait(block) -> None:
    d = Discarder(MADV_REMOVE)
    d.add(block.host_addr + 1, PAGE)  # not page aligned: EINVAL
    d.add(block.host_addr, PAGE)
    with pytest.raises(MigrationError, match=r"post-copy discard failed: .*EINVAL"):
        d.wait(10)
