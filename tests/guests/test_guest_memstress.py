"""memstress under the test harness: the invariant holds at every pause, and the checker
detects every kind of damage a broken migration could do."""

from __future__ import annotations

import dataclasses
import random
import re
import struct

import numpy as np
import pytest
from guest_harness import Harness

from livemig.guests import REPORT_KIND_COMPUTE, REPORT_KIND_IDLE
from livemig.guests.memstress import (
    MEMSTRESS_INFO_ADDR,
    InvariantReport,
    check_invariant,
    page_pattern,
)
from livemig.machine import abi

pytestmark = pytest.mark.timeout(90)


def _published(h: Harness) -> bool:
    return struct.unpack_from("<Q", h.mem, abi.GUEST_REPORT_ADDR)[0] == abi.REPORT_MAGIC


def _swept(h: Harness, passes: int) -> bool:
    rep = check_invariant(h.read)
    return rep.ok and not rep.filling and min(rep.passes) >= passes


def _running(images: dict, ncpus: int = 2, cmdline: str = "ws=1M seed=7") -> Harness:
    h = Harness(images["memstress"].data, cmdline, ncpus=ncpus)
    assert h.run_until(lambda: _swept(h, 2), timeout=30), h.text
    return h


def test_invariant_holds_at_many_pauses(images: dict) -> None:
    h = Harness(images["memstress"].data, "ws=1M seed=7 mark_ms=0", ncpus=2)
    assert h.run_until(lambda: _published(h), timeout=20), h.text
    rng = random.Random(1)
    previous: InvariantReport | None = None
    seen_filling = seen_mid_sweep = False
    for _ in range(60):
        # Odd, varying slice lengths stop the vCPUs at arbitrary points of a sweep.
        h.step(rng.randrange(1, 40_000))
        rep = check_invariant(h.read, previous)
        assert rep.ok, rep.problems
        assert rep.pages == 256 and rep.nslices == 2 and rep.seed == 7
        seen_filling |= rep.filling
        seen_mid_sweep |= not rep.filling and rep.max_counter != rep.min_counter
        previous = rep
    assert seen_filling and seen_mid_sweep
    assert previous is not None and previous.total_passes > 0
    assert re.search(r"memstress: cpu1 pass \d+", h.text)


def test_report_layout_and_passes(images: dict) -> None:
    h = _running(images, ncpus=3, cmdline="ws=600K seed=3")
    rep = check_invariant(h.read)
    assert rep.ok, rep.problems
    assert rep.pages == 150 and rep.nslices == 3 and len(rep.passes) == 3
    assert rep.ws_start % abi.HEAP_ALIGN == 0 and rep.ws_start >= abi.LOAD_ADDR
    # The counters of every slice sit between its passes and passes + 1.
    for s in range(3):
        c = rep.counters[150 * s // 3 : 150 * (s + 1) // 3]
        assert rep.passes[s] <= c.min() <= c.max() <= rep.passes[s] + 1


def test_pages_hold_the_pattern(images: dict) -> None:
    h = _running(images)
    rep = check_invariant(h.read)
    words = np.frombuffer(h.read(rep.ws_start, rep.pages * abi.PAGE_SIZE), "<u8")
    words = words.reshape(rep.pages, 512)
    assert (words[:, 1:] == page_pattern(7, np.arange(rep.pages, dtype=np.uint64))).all()
    assert (words[:, 1:] != 0).any(axis=1).all()  # no page is a zero page


def _gpa(rep: InvariantReport, page: int, word: int = 0) -> int:
    return rep.ws_start + page * abi.PAGE_SIZE + word * 8


def _poke(h: Harness, gpa: int, value: int) -> int:
    old = struct.unpack_from("<Q", h.mem, gpa)[0]
    struct.pack_into("<Q", h.mem, gpa, value)
    return old


def test_detects_flipped_counter(images: dict) -> None:
    h = _running(images)
    rep = check_invariant(h.read)
    assert rep.ok
    old = _poke(h, _gpa(rep, 40), rep.max_counter + 5)
    bad = check_invariant(h.read)
    assert not bad.ok
    assert any("page 41" in p or "page 40" in p for p in bad.problems), bad.problems
    _poke(h, _gpa(rep, 40), old)
    assert check_invariant(h.read).ok


def test_detects_counter_off_by_one_step(images: dict) -> None:
    """The subtle case: a page of the first slice one pass behind its later neighbour."""
    h = _running(images)
    rep = check_invariant(h.read)
    c = rep.counters
    # Page 0 is the first of slice 0, so it is never behind the page after it.
    _poke(h, _gpa(rep, 0), int(c[1]) - 1)
    bad = check_invariant(h.read)
    assert not bad.ok and any("slice 0" in p for p in bad.problems), bad.problems


def test_detects_clobbered_pattern_byte(images: dict) -> None:
    h = _running(images)
    rep = check_invariant(h.read)
    addr = _gpa(rep, 200) + 3001
    h.mem[addr] ^= 0x10
    bad = check_invariant(h.read)
    assert not bad.ok
    assert any("page 200" in p and "pattern word 375" in p for p in bad.problems), bad.problems


def test_detects_zeroed_and_swapped_pages(images: dict) -> None:
    h = _running(images)
    rep = check_invariant(h.read)
    a, b = _gpa(rep, 10), _gpa(rep, 11)
    page_a = bytes(h.mem[a : a + abi.PAGE_SIZE])
    h.mem[a : a + abi.PAGE_SIZE] = bytes(h.mem[b : b + abi.PAGE_SIZE])
    h.mem[b : b + abi.PAGE_SIZE] = page_a
    swapped = check_invariant(h.read)
    assert not swapped.ok and any("page 10" in p for p in swapped.problems)
    z = _gpa(rep, 100)
    h.mem[z : z + abi.PAGE_SIZE] = bytes(abi.PAGE_SIZE)
    zeroed = check_invariant(h.read)
    assert any("page 100 " in p and "pattern" in p for p in zeroed.problems), zeroed.problems


def test_detects_going_backwards(images: dict) -> None:
    h = _running(images)
    rep = check_invariant(h.read)
    ahead = dataclasses.replace(
        rep, counters=rep.counters + np.uint64(1), passes=[p + 1 for p in rep.passes]
    )
    bad = check_invariant(h.read, ahead)
    assert any("went backwards" in p for p in bad.problems)
    assert any(p.startswith("slice 0: passes went backwards") for p in bad.problems)
    assert len(bad.problems) <= 21  # capped, with a count of the rest
    assert bad.problems[-1].startswith("... and ")
    assert check_invariant(h.read, rep).ok


def test_detects_corrupt_pass_count(images: dict) -> None:
    h = _running(images)
    rep = check_invariant(h.read)
    _poke(h, abi.GUEST_REPORT_ADDR + 5 * 8, rep.passes[0] + 3)
    bad = check_invariant(h.read)
    assert not bad.ok and any("completed passes" in p for p in bad.problems)


def test_no_report_is_not_ok(images: dict) -> None:
    h = Harness(images["memstress"].data, "ws=1M", ncpus=1)
    rep = check_invariant(h.read)
    assert not rep.ok and "has not started" in rep.problems[0]
    h2 = Harness(images["idle"].data, "seconds=1 period_ms=50")
    h2.run_for(5)
    assert "not memstress" in check_invariant(h2.read).problems[0]


def test_filling_progress_is_checked(images: dict) -> None:
    h = Harness(images["memstress"].data, "ws=1M", ncpus=1)
    assert h.run_until(lambda: _published(h), timeout=20)
    h.step(50_000)  # part of the fill
    rep = check_invariant(h.read)
    assert rep.ok and rep.filling, rep
    filled = struct.unpack_from("<Q", h.mem, MEMSTRESS_INFO_ADDR + 3 * 8)[0]
    assert 0 < filled < 256
    _poke(h, _gpa(rep, 0), 9)  # a counter moving before the sweep has begun
    assert not check_invariant(h.read).ok


def test_rate_limits_dirtying(images: dict) -> None:
    rate = 4000
    h = Harness(images["memstress"].data, f"ws=256K rate={rate}", ncpus=2)
    assert h.run_until(lambda: _swept(h, 1), timeout=20), h.text
    start = check_invariant(h.read)
    t0 = h.clock_ns()
    h.run_for(1.5)
    end = check_invariant(h.read, start)
    elapsed = (h.clock_ns() - t0) / 1e9
    dirtied = int(end.counters.sum() - start.counters.sum())
    assert end.ok, end.problems
    assert dirtied <= rate * elapsed * 1.15 + 64, (dirtied, elapsed)
    assert dirtied >= rate * elapsed * 0.3, (dirtied, elapsed)


def test_passes_limit_and_exit(images: dict) -> None:
    h = Harness(images["memstress"].data, "ws=512K passes=3 mark_ms=0", ncpus=2)
    h.run_for(30)
    assert h.exit_status == 0, h.text
    assert "memstress: done, 3 passes on 2 vCPUs" in h.text
    rep = check_invariant(h.read)
    assert rep.ok and rep.passes == [3, 3] and rep.min_counter == rep.max_counter == 3


def test_working_set_too_big(images: dict) -> None:
    h = Harness(images["memstress"].data, "ws=64M", ncpus=1)
    h.run_for(10)
    assert h.exit_status == 2 and "does not fit" in h.text


def test_compute_reports_ops(images: dict) -> None:
    h = Harness(images["compute"].data, "seconds=1", ncpus=2)
    h.run_for(20)
    assert h.exit_status == 0, h.text
    assert re.search(r"compute: cpu0 \d+ ops/s", h.text), h.text
    head = abi.GUEST_REPORT.unpack(bytes(h.read(abi.GUEST_REPORT_ADDR, abi.GUEST_REPORT.size)))
    assert head[0] == abi.REPORT_MAGIC and head[1] == REPORT_KIND_COMPUTE
    assert head[5] > 0 and head[6] > 0  # both vCPUs count operations


def test_idle_heartbeats(images: dict) -> None:
    h = Harness(images["idle"].data, "seconds=3 period_ms=100", ncpus=2)
    h.run_for(10)
    assert h.exit_status == 0, h.text
    beats = re.findall(r"idle: heartbeat (\d+) at (\d+) ms", h.text)
    assert [int(b) for b, _ in beats] == [1, 2, 3]
    assert all(int(ms) >= 100 * int(b) for b, ms in beats)
    head = abi.GUEST_REPORT.unpack(bytes(h.read(abi.GUEST_REPORT_ADDR, abi.GUEST_REPORT.size)))
    assert head[1] == REPORT_KIND_IDLE and head[5] == 3
