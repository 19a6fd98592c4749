"""The built-in guests on the real machine: memstress's invariant holds at every pause and
survives moving the paused state into a new machine, and the checker detects every kind of
damage a broken migration could do. Also compute's and idle's reports."""

from __future__ import annotations

import dataclasses
import random
import re
import time

import numpy as np
import pytest
from guest_helpers import Boot, Images, poke, report_words, wait_for, wait_passes

from livemig.guests import REPORT_KIND_COMPUTE, REPORT_KIND_IDLE
from livemig.guests.memstress import (
    MEMSTRESS_INFO,
    MEMSTRESS_INFO_ADDR,
    InvariantReport,
    check_invariant,
    page_pattern,
)
from livemig.machine import Machine, RAMBlockSpec, abi

pytestmark = pytest.mark.timeout(90)


def _paused_memstress(
    boot: Boot, images: Images, smp: int = 2, cmdline: str = "ws=1M seed=7"
) -> Machine:
    m = boot(images["memstress"], cmdline, smp=smp)
    wait_passes(m, 2)
    m.pause()
    return m


def _gpa(rep: InvariantReport, page: int, word: int = 0) -> int:
    return rep.ws_start + page * abi.PAGE_SIZE + word * 8


def test_invariant_holds_at_many_pauses(boot: Boot, images: Images) -> None:
    m = boot(images["memstress"], "ws=2M seed=7 mark_ms=0", smp=2)
    wait_for(lambda: report_words(m)[0] == abi.REPORT_MAGIC, 20, "the memstress report")
    rng = random.Random(1)
    previous: InvariantReport | None = None
    seen_mid_sweep = 0
    for _ in range(40):
        time.sleep(rng.uniform(0.0005, 0.02))  # stop the vCPUs at arbitrary points
        m.pause()
        rep = check_invariant(m.read_guest, previous)
        assert rep.ok, rep.problems
        assert rep.pages == 512 and rep.nslices == 2 and rep.seed == 7
        seen_mid_sweep += not rep.filling and rep.max_counter != rep.min_counter
        previous = rep
        m.resume()
    assert seen_mid_sweep >= 10
    assert previous is not None and previous.total_passes > 0
    assert re.search(rb"memstress: cpu1 pass \d+", m.chardev.data)


def test_invariant_survives_moving_to_a_new_machine(boot: Boot, images: Images) -> None:
    """The kernel of every migration: RAM + CPU + device state into a fresh machine."""
    m = _paused_memstress(boot, images)
    before = check_invariant(m.read_guest)
    assert before.ok, before.problems
    state = m.save_state()
    with Machine([RAMBlockSpec("pc.ram", 8 << 20)], smp=2) as m2:
        m2.load_ram_from(m)
        m2.load_state(state)
        m2.start()
        wait_passes(m2, max(before.passes) + 3)
        m2.pause()
        after = check_invariant(m2.read_guest, before)
        assert after.ok, after.problems
        assert min(after.passes) > min(before.passes)


def test_report_layout_and_passes(boot: Boot, images: Images) -> None:
    m = _paused_memstress(boot, images, smp=3, cmdline="ws=600K seed=3")
    rep = check_invariant(m.read_guest)
    assert rep.ok, rep.problems
    assert rep.pages == 150 and rep.nslices == 3 and len(rep.passes) == 3
    assert rep.ws_start % abi.HEAP_ALIGN == 0 and rep.ws_start >= abi.LOAD_ADDR
    for s in range(3):
        c = rep.counters[150 * s // 3 : 150 * (s + 1) // 3]
        assert rep.passes[s] <= c.min() <= c.max() <= rep.passes[s] + 1


def test_pages_hold_the_pattern(boot: Boot, images: Images) -> None:
    m = _paused_memstress(boot, images)
    rep = check_invariant(m.read_guest)
    words = np.frombuffer(m.read_guest(rep.ws_start, rep.pages * abi.PAGE_SIZE), "<u8")
    words = words.reshape(rep.pages, 512)
    assert (words[:, 1:] == page_pattern(7, np.arange(rep.pages, dtype=np.uint64))).all()
    assert (words[:, 1:] != 0).any(axis=1).all()  # no page is a zero page


def test_comp_makes_pages_compressible(boot: Boot, images: Images) -> None:
    """``comp=50``: about half the pages repeat every 8 words; zstd shrinks those, and the
    invariant checker knows which ones they are (a damaged one is still caught)."""
    import zstandard

    m = _paused_memstress(boot, images, cmdline="ws=1M seed=7 comp=50")
    rep = check_invariant(m.read_guest)
    assert rep.ok, rep.problems
    words = np.frombuffer(m.read_guest(rep.ws_start, rep.pages * abi.PAGE_SIZE), "<u8")
    words = words.reshape(rep.pages, 512)
    repeats = (words[:, 9:17] == words[:, 1:9]).all(axis=1)
    assert 0.3 < repeats.mean() < 0.7
    raw = bytes(m.read_guest(rep.ws_start, rep.pages * abi.PAGE_SIZE))
    assert len(zstandard.ZstdCompressor(level=1).compress(raw)) < 0.7 * len(raw)
    short = int(np.flatnonzero(repeats)[0])
    poke(m, _gpa(rep, short, 9), int(words[short, 9]) ^ 1)
    assert any(f"page {short} " in p for p in check_invariant(m.read_guest).problems)


def test_detects_flipped_counter(boot: Boot, images: Images) -> None:
    m = _paused_memstress(boot, images)
    rep = check_invariant(m.read_guest)
    assert rep.ok
    old = poke(m, _gpa(rep, 40), rep.max_counter + 5)
    bad = check_invariant(m.read_guest)
    assert not bad.ok
    assert any("page 41" in p or "page 40" in p for p in bad.problems), bad.problems
    poke(m, _gpa(rep, 40), old)
    assert check_invariant(m.read_guest).ok


def test_detects_counter_one_pass_behind(boot: Boot, images: Images) -> None:
    """The subtle case: the first page of a slice one pass behind the page after it."""
    m = _paused_memstress(boot, images)
    rep = check_invariant(m.read_guest)
    poke(m, _gpa(rep, 0), int(rep.counters[1]) - 1)
    bad = check_invariant(m.read_guest)
    assert not bad.ok and any("slice 0" in p for p in bad.problems), bad.problems


def test_detects_clobbered_pattern_byte(boot: Boot, images: Images) -> None:
    m = _paused_memstress(boot, images)
    rep = check_invariant(m.read_guest)
    addr = _gpa(rep, 200) + 3001
    m.write_guest(addr, bytes([m.read_guest(addr, 1)[0] ^ 0x10]))
    bad = check_invariant(m.read_guest)
    assert not bad.ok
    assert any("page 200" in p and "pattern word 375" in p for p in bad.problems), bad.problems


def test_detects_zeroed_and_swapped_pages(boot: Boot, images: Images) -> None:
    m = _paused_memstress(boot, images)
    rep = check_invariant(m.read_guest)
    a, b = _gpa(rep, 10), _gpa(rep, 11)
    page_a, page_b = bytes(m.read_guest(a, abi.PAGE_SIZE)), bytes(m.read_guest(b, abi.PAGE_SIZE))
    m.write_guest(a, page_b)
    m.write_guest(b, page_a)
    swapped = check_invariant(m.read_guest)
    assert not swapped.ok and any("page 10 " in p for p in swapped.problems)
    m.write_guest(_gpa(rep, 100), bytes(abi.PAGE_SIZE))
    zeroed = check_invariant(m.read_guest)
    assert any("page 100 " in p and "pattern" in p for p in zeroed.problems), zeroed.problems


def test_detects_going_backwards(boot: Boot, images: Images) -> None:
    m = _paused_memstress(boot, images)
    rep = check_invariant(m.read_guest)
    ahead = dataclasses.replace(
        rep, counters=rep.counters + np.uint64(1), passes=[p + 1 for p in rep.passes]
    )
    bad = check_invariant(m.read_guest, ahead)
    assert any("went backwards" in p for p in bad.problems)
    assert any(p.startswith("slice 0: passes went backwards") for p in bad.problems)
    assert len(bad.problems) <= 21 and bad.problems[-1].startswith("... and ")
    assert check_invariant(m.read_guest, rep).ok


def test_detects_corrupt_pass_count(boot: Boot, images: Images) -> None:
    m = _paused_memstress(boot, images)
    rep = check_invariant(m.read_guest)
    poke(m, abi.GUEST_REPORT_ADDR + 5 * 8, rep.passes[0] + 3)
    bad = check_invariant(m.read_guest)
    assert not bad.ok and any("completed passes" in p for p in bad.problems)


def test_filling_state_is_checked(boot: Boot, images: Images) -> None:
    """A slice caught half filled: only its filled prefix is checked, and its counters are 0."""
    m = boot(images["memstress"], "ws=1M passes=1 seed=2")
    assert m.wait_for_end(20), m.chardev.data
    rep = check_invariant(m.read_guest)
    # Rewind the memory to what it was halfway through the fill.
    m.write_guest(_gpa(rep, 100), bytes(156 * abi.PAGE_SIZE))
    for p in range(100):
        poke(m, _gpa(rep, p), 0)
    poke(m, abi.GUEST_REPORT_ADDR + 5 * 8, 0)
    filled_addr = MEMSTRESS_INFO_ADDR + 3 * 8
    poke(m, filled_addr, 100)
    half = check_invariant(m.read_guest)
    assert half.ok and half.filling, half.problems
    assert half.min_counter == half.max_counter == 0
    poke(m, _gpa(rep, 5), 1)  # a counter moving before the sweep has begun
    assert any("while filling" in p for p in check_invariant(m.read_guest).problems)
    poke(m, _gpa(rep, 5), 0)
    poke(m, filled_addr, 101)  # claims a page it has not filled
    assert any("page 100 " in p for p in check_invariant(m.read_guest).problems)
    assert MEMSTRESS_INFO.size == 96


def test_no_report_is_not_ok(boot: Boot, images: Images) -> None:
    with Machine([RAMBlockSpec("pc.ram", 8 << 20)], smp=1) as fresh:
        fresh.load_guest(images["memstress"].data, "ws=1M")
        rep = check_invariant(fresh.read_guest)
        assert not rep.ok and "has not started" in rep.problems[0]
    m = boot(images["idle"], "seconds=1 period_ms=20")
    assert m.wait_for_end(10)
    assert "not memstress" in check_invariant(m.read_guest).problems[0]


def test_rate_limits_dirtying(boot: Boot, images: Images) -> None:
    rate = 4000
    m = boot(images["memstress"], f"ws=256K rate={rate}", smp=2)
    wait_passes(m, 1)
    m.pause()
    start = check_invariant(m.read_guest)
    m.resume()
    t0 = time.monotonic()
    time.sleep(1.5)
    m.pause()
    elapsed = time.monotonic() - t0
    end = check_invariant(m.read_guest, start)
    dirtied = int(end.counters.sum() - start.counters.sum())
    assert end.ok, end.problems
    assert dirtied <= rate * elapsed * 1.15 + 64, (dirtied, elapsed)
    assert dirtied >= rate * elapsed * 0.3, (dirtied, elapsed)


def test_passes_limit_and_exit(boot: Boot, images: Images) -> None:
    m = boot(images["memstress"], "ws=512K passes=3 mark_ms=0", smp=2)
    assert m.wait_for_end(30), m.chardev.data
    assert m.exit_status == 0
    assert b"memstress: done, 3 passes on 2 vCPUs" in m.chardev.data
    rep = check_invariant(m.read_guest)
    assert rep.ok and rep.passes == [3, 3] and rep.min_counter == rep.max_counter == 3


def test_working_set_too_big(boot: Boot, images: Images) -> None:
    m = boot(images["memstress"], "ws=64M")
    assert m.wait_for_end(10)
    assert m.exit_status == 2 and b"does not fit" in m.chardev.data


def test_compute_reports_ops(boot: Boot, images: Images) -> None:
    # 2 s, not 1: cpu0 ends the machine when its time is up, and on a busy host cpu1's thread
    # once had not counted its first operation by then
    m = boot(images["compute"], "seconds=2", smp=2)
    assert m.wait_for_end(20), m.chardev.data
    assert m.exit_status == 0
    assert re.search(rb"compute: cpu0 \d+ ops/s", m.chardev.data), m.chardev.data
    # both vCPUs print on the same clock tick: every line must still come out whole
    line = re.compile(rb"compute: (cpu[01] \d+ ops/s \(total \d+, hash [0-9a-f]+\)|done .*)")
    for ln in m.chardev.data.splitlines():
        assert line.fullmatch(ln), m.chardev.data
    words = report_words(m)
    assert words[0] == abi.REPORT_MAGIC and words[1] == REPORT_KIND_COMPUTE
    assert words[5] > 0 and words[6] > 0  # both vCPUs count operations


def test_compute_counter_runs_while_running(boot: Boot, images: Images) -> None:
    m = boot(images["compute"], "")
    wait_for(lambda: report_words(m)[5] > 0, 10, "compute's first operations")
    a = report_words(m)[5]
    time.sleep(0.2)
    assert report_words(m)[5] > a


def test_idle_heartbeats(boot: Boot, images: Images) -> None:
    m = boot(images["idle"], "seconds=3 period_ms=100", smp=2)
    assert m.wait_for_end(10), m.chardev.data
    assert m.exit_status == 0
    beats = re.findall(rb"idle: heartbeat (\d+) at (\d+) ms", m.chardev.data)
    assert [int(b) for b, _ in beats] == [1, 2, 3]
    assert all(int(ms) >= 100 * int(b) for b, ms in beats)
    words = report_words(m)
    assert words[1] == REPORT_KIND_IDLE and words[5] == 3
