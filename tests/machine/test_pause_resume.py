"""Pausing and resuming loses no instruction or write; a paused machine's state, loaded into a
new machine, continues the guest exactly (the kernel of every migration)."""

from __future__ import annotations

import time

import pytest

from livemig.errors import MachineError
from livemig.machine import Machine, RunState

from . import guests
from .conftest import MakeMachine, assemble

PAGE = 0x300000


def _counter_words(m: Machine, cpu: int) -> tuple[int, int]:
    raw = bytes(m.read_guest(PAGE + cpu * 4096, 16))
    return int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")


def _check_counters(m: Machine, last: list[int]) -> list[int]:
    """rax-1 <= word1 <= word0 <= rax on every vCPU, and nothing went backwards."""
    states = m.cpu_states()
    now = []
    for cpu, state in enumerate(states):
        w0, w1 = _counter_words(m, cpu)
        rax = state.reg("rax")
        assert rax - 1 <= w1 <= w0 <= rax, (cpu, rax, w0, w1, hex(state.rip))
        assert rax >= last[cpu]
        now.append(rax)
    return now


def test_pause_resume_many_times_loses_nothing(make_machine: MakeMachine) -> None:
    m = make_machine(smp=2)
    m.load_guest(assemble(guests.COUNTER))
    m.start()
    last = [0, 0]
    for _ in range(40):
        time.sleep(0.005)
        m.pause()
        assert m.runstate == RunState.PAUSED
        last = _check_counters(m, last)
        m.resume()
    m.pause()
    final = _check_counters(m, last)
    assert min(final) > 1000  # both vCPUs really ran
    # A vCPU may be paused again before its thread even woke up; most resumes do run it.
    assert all(v.runs >= 10 for v in m.vcpus)


def test_state_moves_to_a_new_machine(make_machine: MakeMachine) -> None:
    src = make_machine(smp=2)
    src.load_guest(assemble(guests.COUNTER))
    src.start()
    time.sleep(0.05)
    src.pause()
    before = _check_counters(src, [0, 0])
    state = src.save_state()

    dst = make_machine(smp=2)
    dst.set_runstate(RunState.INMIGRATE)
    dst.load_ram_from(src)
    dst.load_state(state)
    assert dst.cpu_states() == state.cpus
    dst.set_runstate(RunState.RUNNING)
    time.sleep(0.05)
    dst.pause()
    after = _check_counters(dst, before)
    assert all(a > b for a, b in zip(after, before, strict=True))
    # The source, untouched, still sits where it was.
    assert _check_counters(src, before) == before


def test_restored_state_replays_exactly(make_machine: MakeMachine) -> None:
    """Two machines loaded with the same state and run for the same instruction count end in
    the same state: nothing of the CPU (GPRs, SSE, x87, flags) was lost on the way."""
    src = make_machine()
    src.load_guest(assemble(guests.MIXED))
    src.start()
    time.sleep(0.02)
    src.pause()
    state = src.save_state()
    assert state.cpus[0].reg("r11") > 0

    def replay() -> tuple[object, bytes]:
        m = make_machine()
        m.load_ram_from(src)
        m.load_state(state)
        backend = m.vcpus[0].backend
        uc = backend._uc  # run a fixed instruction count: needs the unicorn handle
        uc.emu_start(state.cpus[0].rip, 0xFFFF_FFFF_FFFF_FFFF, count=100_000)
        return backend.get_state(), bytes(m.read_guest(PAGE, 16))

    a, b = replay(), replay()
    assert a == b
    assert a[0] != state.cpus[0]  # it did run


def test_memstress_invariant_at_every_pause_and_after_a_move(make_machine: MakeMachine) -> None:
    memstress = pytest.importorskip("livemig.guests.memstress")
    from livemig.guests import build_guest

    src = make_machine(smp=2, mib=16)
    src.load_guest(build_guest("memstress").data, "ws=4M mark_ms=50")
    src.start()
    report = None
    for _ in range(10):
        time.sleep(0.03)
        src.pause()
        report = memstress.check_invariant(src.read_guest, report)
        assert report.ok, report.problems
        src.resume()
    src.pause()
    report = memstress.check_invariant(src.read_guest, report)
    assert report.ok and min(report.passes[:2]) > 0
    dst = make_machine(smp=2, mib=16)
    dst.load_ram_from(src)
    dst.load_state(src.save_state())
    dst.start()
    time.sleep(0.1)
    dst.pause()
    moved = memstress.check_invariant(dst.read_guest, report)
    assert moved.ok, moved.problems
    assert moved.passes[:2] > report.passes[:2]
    assert b"pass" in dst.chardev.data


def test_state_is_refused_while_running(make_machine: MakeMachine) -> None:
    m = make_machine()
    m.load_guest(assemble(guests.COUNTER))
    m.start()
    with pytest.raises(MachineError, match="pause it first"):
        m.cpu_states()
    with pytest.raises(MachineError, match="pause it first"):
        m.load_guest(b"\x90")


def test_wrong_vcpu_count_is_refused(make_machine: MakeMachine) -> None:
    one, two = make_machine(smp=1), make_machine(smp=2)
    with pytest.raises(MachineError, match="same --smp"):
        two.load_cpu_states(one.cpu_states())


def test_start_without_guest_is_refused(make_machine: MakeMachine) -> None:
    with pytest.raises(MachineError, match="no guest loaded"):
        make_machine().start()


def test_illegal_transition_leaves_the_machine_running(make_machine: MakeMachine) -> None:
    m = make_machine()
    m.load_guest(assemble(guests.COUNTER))
    m.start()
    with pytest.raises(MachineError, match="running -> inmigrate"):
        m.set_runstate(RunState.INMIGRATE)
    assert m.runstate == RunState.RUNNING
    time.sleep(0.01)
    m.pause()
    assert m.cpu_states()[0].reg("rax") > 0


def test_listeners_see_every_move(make_machine: MakeMachine) -> None:
    m = make_machine()
    seen: list[tuple[str, str]] = []
    m.add_state_listener(lambda old, new: seen.append((old.value, new.value)))
    m.load_guest(assemble(guests.HELLO_AND_EXIT_7))
    m.start()
    assert m.wait_for_end(10)
    assert seen == [("prelaunch", "running"), ("running", "shutdown")]


def test_bad_smp_is_refused() -> None:
    with pytest.raises(MachineError, match="1 to 8 vCPUs"):
        Machine(smp=0)


def _count_for(m: Machine, seconds: float) -> int:
    before = m.cpu_states()[0].reg("rax")
    m.resume()
    time.sleep(seconds)
    m.pause()
    return m.cpu_states()[0].reg("rax") - before


def test_throttle_holds_the_guest_back(make_machine: MakeMachine) -> None:
    m = make_machine()
    m.load_guest(assemble(guests.COUNTER))
    m.start()
    time.sleep(0.05)
    m.pause()
    free = _count_for(m, 0.3)
    m.set_throttle(80)
    assert m.throttle_percentage == 80
    throttled = _count_for(m, 0.3)
    m.set_throttle(0)
    free_again = _count_for(m, 0.3)
    _check_counters(m, [0])
    # 80 % throttle leaves about a fifth; allow a lot of noise from a shared host
    # compare with the better free run: a busy host only ever slows a measurement down
    assert throttled < 0.6 * max(free, free_again), (free, throttled, free_again)
    with pytest.raises(MachineError, match=r"outside 0\.\.99"):
        m.set_throttle(100)


def test_pause_is_quick_while_throttled(make_machine: MakeMachine) -> None:
    m = make_machine(smp=2)
    m.load_guest(assemble(guests.COUNTER))
    m.set_throttle(99)  # vCPUs park for ~1 s at a time
    m.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    m.pause()
    assert time.monotonic() - t0 < 0.5
    _check_counters(m, [0, 0])


def test_throttle_parks_the_vcpus_at_once(make_machine: MakeMachine) -> None:
    """QEMU's cpu_throttle_set ticks at once: at 99 % the vCPU sits out ~990 ms from the moment
    the throttle is set, not after a first period (1 s) of running free."""
    m = make_machine()
    m.load_guest(assemble(guests.COUNTER))
    m.start()
    time.sleep(0.05)
    m.set_throttle(99)
    time.sleep(0.1)
    assert m.vcpus[0].throttle_until > time.monotonic() + 0.5
    m.set_throttle(0)
    m.pause()
