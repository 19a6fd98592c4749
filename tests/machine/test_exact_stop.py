"""A stopped vCPU resumes exactly: no instruction is lost or executed twice (issue #24).

unicorn's ``emu_stop`` from another thread could stop a vCPU after the store of a
read-modify-write instruction and rewind rip to that instruction, so the resumed vCPU applied
it twice (``livemig.machine.stop_hook``). These guests update memory with read-modify-write
and locked instructions and keep a register count of the same updates; any double execution
breaks the relation for good.
"""

from __future__ import annotations

import random
import threading
import time

from livemig.machine import Machine
from livemig.machine.unicorn_cpu import UnicornCPU

from . import guests
from .conftest import MakeMachine, assemble

PAGE = 0x300000


def _word(m: Machine, gpa: int) -> int:
    return int.from_bytes(bytes(m.read_guest(gpa, 8)), "little")


def _check(m: Machine) -> list[int]:
    states = m.cpu_states()
    for cpu, state in enumerate(states):
        base = PAGE + cpu * 4096
        rcx, w0, w1 = state.reg("rcx"), _word(m, base), _word(m, base + 8)
        assert rcx <= w0 <= rcx + 1, (cpu, rcx, w0, hex(state.rip))
        assert w1 in (rcx - 1, rcx) or rcx == 0, (cpu, rcx, w1)
        rdx, w3 = state.reg("rdx"), _word(m, base + 24)
        assert rdx <= w3 <= rdx + 1, (cpu, rdx, w3)
    return [s.reg("rcx") for s in states]


def test_thousands_of_pauses_repeat_no_instruction(make_machine: MakeMachine) -> None:
    m = make_machine(smp=2)
    m.load_guest(assemble(guests.RMW_COUNTER))
    rng = random.Random(24)
    m.start()
    for _ in range(2000):
        time.sleep(rng.choice((0, 0, 1e-5, 1e-4, 5e-4)))
        m.pause()
        _check(m)
        m.resume()
    m.pause()
    counts = _check(m)
    assert min(counts) > 10_000, counts  # both vCPUs really ran between the pauses


def test_backend_stopped_from_another_thread_resumes_exactly(make_machine: MakeMachine) -> None:
    """The bare backend, no machine logic: one thread runs, another stops it at random."""
    m = make_machine(smp=1)
    m.load_guest(assemble(guests.RMW_COUNTER))
    cpu = m.vcpus[0].backend
    assert isinstance(cpu, UnicornCPU)
    # The machine's own vCPU thread stays parked (never started); this test drives the backend.
    rng = random.Random(7)
    base = PAGE
    for _ in range(1500):
        timer = threading.Timer(rng.uniform(0, 3e-4), cpu.stop)
        timer.start()
        reason, detail = cpu.run()
        timer.join()
        assert reason == "stopped", detail
        rcx = cpu.get_state().reg("rcx")
        w0 = _word(m, base)
        assert rcx <= w0 <= rcx + 1, (rcx, w0)
    assert cpu.hook_stops >= 1500


def test_a_stop_before_run_is_not_lost(make_machine: MakeMachine) -> None:
    m = make_machine(smp=1)
    m.load_guest(assemble(guests.RMW_COUNTER))
    cpu = m.vcpus[0].backend
    rip = cpu.get_state().rip
    cpu.stop()
    assert cpu.run() == ("stopped", None)
    assert cpu.get_state().rip == rip  # stopped before the first instruction
    cpu.clear_stop()
    timer = threading.Timer(0.01, cpu.stop)
    timer.start()
    assert cpu.run() == ("stopped", None)
    timer.join()
    assert _word(m, PAGE) > 0


# -- the compute guest against its host-side reference -----------------------------------------

from livemig.guests import build_guest  # noqa: E402
from livemig.guests.compute import ComputeReference, snapshot  # noqa: E402


def _compute_machine(make_machine: MakeMachine, smp: int) -> Machine:
    m = make_machine(smp=smp, mib=16)
    m.load_guest(build_guest("compute").data, "buf=128K seed=11")
    return m


def _checked(m: Machine, ref: ComputeReference | None) -> ComputeReference:
    snap = snapshot(m.read_guest)
    ref = ref or ComputeReference.for_snapshot(snap)
    report = ref.check(snap)
    assert report.ok, report.problems
    return ref


def test_compute_guest_survives_hundreds_of_pauses(make_machine: MakeMachine) -> None:
    for smp in (1, 2):
        m = _compute_machine(make_machine, smp)
        rng = random.Random(smp)
        m.start()
        time.sleep(0.05)
        ref = None
        for i in range(400):
            time.sleep(rng.choice((0, 1e-4, 5e-4, 2e-3)))
            m.pause()
            if i % 20 == 0:
                ref = _checked(m, ref)
            m.resume()
        m.pause()
        ref = _checked(m, ref)
        assert min(ref._ops) > 1000, ref._ops


def test_compute_guest_state_moves_to_a_new_machine_exactly(make_machine: MakeMachine) -> None:
    """Stop, save CPU and device state, load it with the RAM into a fresh machine, go on:
    what every migration and every snapshot restore does, ten times over."""
    m = _compute_machine(make_machine, 2)
    m.start()
    ref = None
    for _ in range(10):
        time.sleep(0.02)
        m.pause()
        ref = _checked(m, ref)
        nxt = make_machine(smp=2, mib=16)
        nxt.load_ram_from(m)
        nxt.load_state(m.save_state())
        m.close()
        m = nxt
        m.start()
    time.sleep(0.02)
    m.pause()
    ref = _checked(m, ref)
    assert min(ref._ops) > 1000


def test_throttled_compute_guest_stays_exact(make_machine: MakeMachine) -> None:
    """Auto-converge's throttle stops every vCPU at each of its cycles (25 ms at 60 %)."""
    m = _compute_machine(make_machine, 2)
    m.start()
    m.set_throttle(60)
    ref = None
    for _ in range(8):
        time.sleep(0.1)
        m.pause()
        ref = _checked(m, ref)
        m.resume()
    m.set_throttle(0)
    stops = sum(v.backend.hook_stops for v in m.vcpus)
    assert stops > 40, stops  # 60 %: a 25 ms cycle, each vCPU stopped once a cycle
