"""The userfaultfd wrapper: missing- and minor-mode round trips on shmem (post-copy's use) and
sync WP."""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time

import numpy as np
import pytest

from livemig.machine.ram import RAMBlock
from livemig.memtrack._sys import MADV_DONTNEED, MADV_REMOVE, madvise
from livemig.memtrack.pagemap import present_pages
from livemig.memtrack.uffd import (
    UFFD_FEATURE_MINOR_SHMEM,
    UFFD_FEATURE_MISSING_SHMEM,
    UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
    UFFDIO_CONTINUE,
    UFFDIO_COPY,
    UFFDIO_REGISTER_MODE_MINOR,
    UFFDIO_REGISTER_MODE_MISSING,
    UFFDIO_REGISTER_MODE_WP,
    UFFDIO_WRITEPROTECT,
    UffdError,
    Userfaultfd,
    supported_features,
    uffdio_continue,
    uffdio_copy,
)

PAGE = 4096


def test_ioctl_numbers_match_the_kernel_headers() -> None:
    # Values of the macros as expanded by <linux/userfaultfd.h> on x86-64.
    assert UFFDIO_COPY == 0xC028AA03
    assert UFFDIO_WRITEPROTECT == 0xC018AA06
    assert ctypes.sizeof(uffdio_copy) == 40
    assert UFFDIO_CONTINUE == 0xC020AA07
    assert ctypes.sizeof(uffdio_continue) == 32


class Reader(threading.Thread):
    """Reads pages with ctypes.memmove, which releases the GIL, like a vCPU would."""

    def __init__(self, addr: int, pages: list[int]) -> None:
        super().__init__(daemon=True)
        self.addr, self.pages = addr, pages
        self.got: dict[int, bytes] = {}

    def run(self) -> None:
        buf = ctypes.create_string_buffer(PAGE)
        for p in self.pages:
            ctypes.memmove(buf, self.addr + p * PAGE, PAGE)
            self.got[p] = buf.raw


def serve(uffd: Userfaultfd, addr: int, reader: Reader, content, zero: set[int]) -> list[int]:
    """Resolve faults until the reader is done; return the faulting pages in order."""
    faults = []
    deadline = time.monotonic() + 10
    while reader.is_alive():
        assert time.monotonic() < deadline, f"reader still blocked after faults {faults}"
        if not uffd.wait(0.05):
            continue
        for ev in uffd.read_events():
            assert ev.is_pagefault and not ev.is_write
            page = (ev.address - addr) // PAGE
            faults.append(page)
            if page in zero:
                uffd.zeropage(addr + page * PAGE, PAGE, exist_ok=True)
            else:
                src = content(page)
                uffd.copy(addr + page * PAGE, src.ctypes.data, PAGE, exist_ok=True)
    return faults


def test_missing_mode_round_trip_on_shared_memory(ram) -> None:
    addr, npages = ram.region.host_addr, 32
    length = npages * PAGE

    def content(page: int) -> np.ndarray:
        return np.full(PAGE, page + 1, dtype=np.uint8)

    with Userfaultfd(UFFD_FEATURE_MISSING_SHMEM) as uffd:
        uffd.register(addr, length, UFFDIO_REGISTER_MODE_MISSING)
        pages = [0, 5, 6, 31, 5]  # the second read of 5 must not fault again
        reader = Reader(addr, pages)
        reader.start()
        faults = serve(uffd, addr, reader, content, zero={6})
        reader.join(10)
        assert not reader.is_alive()
        assert faults == [0, 5, 6, 31]
        assert reader.got[5] == bytes([6]) * PAGE and reader.got[31] == bytes([32]) * PAGE
        assert reader.got[6] == bytes(PAGE)
        assert np.flatnonzero(present_pages(addr, length)).tolist() == [0, 5, 6, 31]

        # Installing over a present page: EEXIST, unless the caller says it may happen.
        with pytest.raises(UffdError, match=r"UFFDIO_COPY dst=0x.*EEXIST") as info:
            uffd.copy(addr, content(0).ctypes.data, PAGE)
        assert info.value.errno == errno.EEXIST
        assert uffd.copy(addr, content(0).ctypes.data, PAGE, exist_ok=True) == 0

        # shmem: MADV_REMOVE (not MADV_DONTNEED) drops the page so that it faults again.
        madvise(addr + 5 * PAGE, PAGE, MADV_REMOVE)
        reader = Reader(addr, [5])
        reader.start()
        assert serve(uffd, addr, reader, lambda p: np.full(PAGE, 0xEE, np.uint8), set()) == [5]
        reader.join(10)
        assert reader.got[5] == bytes([0xEE]) * PAGE


def test_sync_write_protect_fault_is_reported_and_resolved(ram) -> None:
    addr = ram.region.host_addr
    ram.array[: 4 * PAGE] = 0
    with Userfaultfd(UFFD_FEATURE_WP_HUGETLBFS_SHMEM) as uffd:
        uffd.register(addr, 4 * PAGE, UFFDIO_REGISTER_MODE_WP)
        uffd.writeprotect(addr, 4 * PAGE, True)
        writer = threading.Thread(target=ctypes.memset, args=(addr + 2 * PAGE + 8, 0x77, 4))
        writer.start()
        assert uffd.wait(5), "no write-protect fault was reported"
        (ev,) = uffd.read_events()
        assert ev.is_pagefault and ev.is_wp and ev.is_write
        assert ev.address & ~(PAGE - 1) == addr + 2 * PAGE
        assert ram.array[2 * PAGE + 8] == 0  # the writer is still held
        uffd.writeprotect(addr + 2 * PAGE, PAGE, False)  # lifts and wakes
        writer.join(10)
        assert not writer.is_alive()
        assert ram.array[2 * PAGE + 8] == 0x77
        assert uffd.read_events() == []


def test_closed_fd_and_missing_features_are_reported() -> None:
    uffd = Userfaultfd()
    uffd.close()
    uffd.close()
    with pytest.raises(UffdError, match="closed"):
        uffd.register(0, PAGE, UFFDIO_REGISTER_MODE_WP)
    with pytest.raises(UffdError, match="lacks features 0x80000000"):
        Userfaultfd(1 << 31)


@pytest.mark.skipif(not supported_features() & UFFD_FEATURE_MINOR_SHMEM,
                    reason="this kernel has no userfaultfd minor faults on shmem")  # fmt: skip
def test_minor_mode_round_trip_on_a_memfd_block() -> None:
    # Post-copy's discard with minor faults: MADV_DONTNEED keeps a shmem page in the page
    # cache (its old bytes), the next access is a MINOR fault; the new bytes go in with pwrite
    # on the memfd and UFFDIO_CONTINUE maps them. A page never populated takes a MISSING
    # fault, and the same pwrite + CONTINUE resolves it.
    b = RAMBlock("pc.ram", 16 * PAGE)
    try:
        assert b.fd is not None
        addr = b.host_addr
        b.view[: 8 * PAGE] = bytes([0x11]) * (8 * PAGE)  # pages 0-7 populated, 8-15 not
        with Userfaultfd(UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MINOR_SHMEM) as uffd:
            uffd.register(addr, b.size, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR)
            madvise(addr, 8 * PAGE, MADV_DONTNEED)
            assert np.flatnonzero(present_pages(addr, b.size)).tolist() == []
            for page, minor in ((2, True), (10, False)):
                reader = Reader(addr, [page])
                reader.start()
                assert uffd.wait(5)
                (ev,) = uffd.read_events()
                assert ev.address == addr + page * PAGE and ev.is_minor == minor
                assert os.pwrite(b.fd, bytes([page]) * PAGE, page * PAGE) == PAGE
                assert uffd.continue_(addr + page * PAGE, PAGE) == PAGE
                reader.join(5)
                assert not reader.is_alive() and reader.got[page] == bytes([page]) * PAGE
            # a run of pages in one call, before anyone faults on them
            os.pwrite(b.fd, bytes([0x55]) * (3 * PAGE), 4 * PAGE)
            assert uffd.continue_(addr + 4 * PAGE, 3 * PAGE) == 3 * PAGE
            assert bytes(b.view[6 * PAGE : 7 * PAGE]) == bytes([0x55]) * PAGE
            # mapped already: EEXIST, unless the caller says it may happen
            with pytest.raises(UffdError, match=r"UFFDIO_CONTINUE.*EEXIST"):
                uffd.continue_(addr + 2 * PAGE, PAGE)
            assert uffd.continue_(addr + 2 * PAGE, PAGE, exist_ok=True) == 0
            assert uffd.continue_(addr + 3 * PAGE, 2 * PAGE, exist_ok=True) == PAGE
            # the page cache still holds page 0: UFFDIO_COPY finds it there
            with pytest.raises(UffdError, match="EEXIST"):
                uffd.copy(addr, np.zeros(PAGE, np.uint8).ctypes.data, PAGE)
    finally:
        b.close()
