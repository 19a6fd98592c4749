"""Post-copy with preempt: the destination installs consecutive preempt-channel pages in runs.

Regression: a guest sweeping its memory faults on the very next page as soon as a requested
one is in. That page came in the readahead head on the main channel, behind up to 512 KiB of
background PARTs the destination had not installed yet and behind the return-path thread
sending the rest of the head: 0.4-1.2 ms, the slowest requests of a run (traced in
``bench postcopy --smp 1 --rate 1024``, preempt p99 above 1 ms in some runs). Now the head's
first ``PREEMPT_LEAD`` pages go on the preempt channel, and the destination installs what one
read of it holds as runs (one write and one UFFDIO_CONTINUE / UFFDIO_COPY per run) instead of
page by page (~30 us each). The source's half: ``test_readahead.py``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from livemig.machine import Machine, RAMBlockSpec
from livemig.memtrack import uffd as U
from livemig.memtrack._sys import MADV_DONTNEED, MADV_REMOVE, madvise
from livemig.migration import postcopy_dest as PD
from livemig.migration.postcopy_dest import PostcopyIncoming
from livemig.migration.postcopy_source import page_checksums

PAGE = 4096
NPAGES = 1024


@pytest.fixture(params=[True, False], ids=["minor", "missing"])
def dest(request: Any) -> Any:
    machine = Machine([RAMBlockSpec("pc.ram", NPAGES * PAGE)], smp=1)
    inc = SimpleNamespace(machine=machine, capabilities=frozenset({"postcopy-ram"}),
                          params={"x-postcopy-minor-faults": request.param},
                          loader=SimpleNamespace(received={"pc.ram": np.zeros(NPAGES, bool)}))  # fmt: skip
    d = PostcopyIncoming(inc)
    if request.param and not d.minor:
        machine.close()
        pytest.skip(d.discard_why)
    b = machine.ram_blocks[0]
    b.array[:] = 0xEE  # stale bytes: a page left out must keep them
    madvise(b.host_addr + 100 * PAGE, 100 * PAGE, MADV_DONTNEED if d.minor else MADV_REMOVE)
    d.need["pc.ram"][100:200] = True
    features = PD.UFFD_FEATURES | (U.UFFD_FEATURE_MINOR_SHMEM if d.minor else 0)
    mode = U.UFFDIO_REGISTER_MODE_MISSING | (U.UFFDIO_REGISTER_MODE_MINOR if d.minor else 0)
    d.uffd = U.Userfaultfd(features)
    d.uffd.register(b.host_addr, b.size, mode)
    d._ranges.append((b.host_addr, b.host_addr + b.size, "pc.ram"))
    calls: list[int] = []  # pages per install call (UFFDIO_CONTINUE / COPY / ZEROPAGE)

    def counted(real: Any, at: int) -> Any:
        def call(*a: Any, **kw: Any) -> int:
            calls.append(a[at] // PAGE)
            return real(*a, **kw)

        return call

    u = d.uffd
    u.continue_, u.copy, u.zeropage = (counted(u.continue_, 1), counted(u.copy, 2),
                                       counted(u.zeropage, 1))  # fmt: skip
    yield SimpleNamespace(d=d, block=b, calls=calls)
    d.uffd.unregister(b.host_addr, b.size)
    d.uffd.close()
    machine.close()


def _page(i: int) -> bytes:
    return i.to_bytes(4, "little") * (PAGE // 4)


def test_consecutive_preempt_records_go_in_as_runs(dest) -> None:
    d, b = dest.d, dest.block
    for i in (100, 101, 117):  # asked for by the guest
        d.requested["pc.ram"][i] = True
        d._req_time[("pc.ram", i)] = 0.0
    d.need["pc.ram"][120] = False  # installed meanwhile (a zero fault, say): left alone
    records = [("pc.ram", i * PAGE, memoryview(_page(i))) for i in range(100, 140)]
    records.insert(5, ("pc.ram", 160 * PAGE, None))  # a zero page breaks the run
    d.source_checksums = {}  # x-verify: the pages installed are added up
    d._install_records(records)
    # the first record alone (the one a vCPU waits for), then runs of at most RUN_PAGES
    assert dest.calls[0] == 1 and max(dest.calls) <= PD.RUN_PAGES
    assert sum(dest.calls) == 40 - 1 + 1  # every page but the one not needed, and the zero one
    assert len(dest.calls) <= 6, dest.calls  # not one call per page
    assert not d.need["pc.ram"][100:140].any() and not d.need["pc.ram"][160]
    assert d.need["pc.ram"][140:160].all()
    assert d.pages_placed == 40
    assert len(d.latencies) == 3 and not d.requested["pc.ram"].any()
    assert d.inc.loader.received["pc.ram"][100:140].sum() == 39
    data = [i for i in range(100, 140) if i != 120]
    words = np.frombuffer(b"".join(_page(i) for i in data), np.uint64).reshape(len(data), -1)
    assert d.checksums["pc.ram"] == page_checksums(words, np.array(data, dtype=np.int64))
    d.uffd.unregister(b.host_addr, b.size)
    d._ranges.clear()
    for i in range(100, 140):
        # page 120 was never written: stale bytes in the page cache (minor), or a hole
        want = bytes([0xEE if d.minor else 0]) * PAGE if i == 120 else _page(i)
        assert bytes(b.array[i * PAGE : (i + 1) * PAGE]) == want, i
    assert not b.array[160 * PAGE : 161 * PAGE].any()
    d.uffd.register(b.host_addr, b.size, U.UFFDIO_REGISTER_MODE_MISSING)  # for the teardown
