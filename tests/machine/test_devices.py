"""Devices driven by real guest code: serial console out and in, clock, sleep, power port."""

from __future__ import annotations

import socket
import time

import pytest

from livemig.errors import UsageError
from livemig.machine import BufferChardev, RunState, open_chardev
from livemig.machine.devices import GuestClock, Serial16550

from . import guests
from .conftest import MakeMachine, assemble


def test_serial_output_and_exit_status(make_machine: MakeMachine) -> None:
    m = make_machine()
    m.load_guest(assemble(guests.HELLO_AND_EXIT_7))
    m.start()
    assert m.wait_for_end(10)
    assert m.runstate == RunState.SHUTDOWN
    assert m.exit_status == 7 and m.shutdown_reason == "guest-shutdown"
    assert m.chardev.data == b"hello\n"


def test_serial_input(make_machine: MakeMachine) -> None:
    chardev = BufferChardev()
    m = make_machine(serial=chardev)
    m.load_guest(assemble(guests.ECHO_PLUS_ONE))
    m.start()
    chardev.feed(b"HAL" * 10)  # more than the 16-byte FIFO holds at once
    chardev.wait_for(b"IBM" * 10, timeout=10)


def test_serial_state_round_trip_keeps_unread_input() -> None:
    a, b = Serial16550(BufferChardev()), Serial16550(BufferChardev())
    a.io_write(0, 0x3FB, 1, 0x83)  # DLAB on, 8N1
    a.io_write(0, 0x3F8, 1, 0x01)  # divisor 115200 baud
    a.io_write(0, 0x3FB, 1, 0x03)
    a.io_write(0, 0x3FA, 1, 0x07)  # FIFO on
    a.receive(b"xyz")
    assert a.io_read(0, 0x3F8, 1) == ord("x")
    assert a.save_state()["serial/recv_fifo"]["recv_fifo"]["num"] == 2
    payload = a.save()
    b.load(payload, Serial16550.vmsd.version_id)
    assert b.divider == 1 and b.lcr == 0x03 and b.iir == 0xC1
    assert b.io_read(0, 0x3FD, 1) & 1
    assert bytes([b.io_read(0, 0x3F8, 1), b.io_read(0, 0x3F8, 1)]) == b"yz"
    assert not b.io_read(0, 0x3FD, 1) & 1
    assert "serial/recv_fifo" not in b.save_state()  # empty FIFO: subsection omitted


def test_console_lock_is_per_vcpu_and_not_part_of_the_stream() -> None:
    from livemig.machine.abi import CONSOLE_LOCK_PORT as P

    s = Serial16550(BufferChardev())
    assert s.io_read(0, P, 4) == 0 and s.io_read(0, P, 4) == 0  # taken; re-entrant for cpu0
    assert s.io_read(1, P, 4) == 1  # cpu1 waits
    s.io_write(1, P, 4, 0)  # not its lock: ignored
    assert s.io_read(1, P, 4) == 1
    s.io_write(0, P, 4, 0)
    assert s.io_read(1, P, 4) == 0
    assert "_console_owner" not in s.save_state()  # QEMU's serial fields only


def test_clock_stops_while_paused_and_continues(make_machine: MakeMachine) -> None:
    m = make_machine()
    m.load_guest(assemble(guests.CLOCK_STORE))
    m.start()
    time.sleep(0.2)
    m.pause()
    seen = int.from_bytes(m.read_guest(0x300000, 8), "little")
    frozen = m.clock.now_ns()
    assert 0.05e9 < seen <= frozen
    time.sleep(0.3)
    assert m.clock.now_ns() == frozen  # the pause is invisible to the guest
    m.resume()
    time.sleep(0.1)
    m.pause()
    after = int.from_bytes(m.read_guest(0x300000, 8), "little")
    assert frozen < after < frozen + 0.25e9


def test_clock_state_continues_on_another_clock() -> None:
    a = GuestClock()
    a.vm_state_change(True)
    time.sleep(0.05)
    a.vm_state_change(False)
    a.io_read(3, 0x510, 4)  # latch on vCPU 3 between the two halves
    state = a.save_state()
    b = GuestClock()
    b.load_state(state)
    assert b.now_ns() == a.now_ns() >= 0.05e9
    assert b.io_read(3, 0x514, 4) == a.latch[3] >> 32
    b.vm_state_change(True)
    time.sleep(0.01)
    assert b.now_ns() > a.now_ns()


def test_pause_wakes_a_sleeping_guest(make_machine: MakeMachine) -> None:
    m = make_machine()
    m.load_guest(assemble(guests.SLEEPER))
    m.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    m.pause()
    assert time.monotonic() - t0 < 0.5
    assert m.runstate == RunState.PAUSED


def test_guest_fault_is_an_internal_error(make_machine: MakeMachine) -> None:
    m = make_machine()
    m.load_guest(assemble(guests.UD2))
    m.start()
    assert m.wait_for_end(10)
    assert m.runstate == RunState.INTERNAL_ERROR
    assert m.error is not None and "rip 0x100001" in m.error and "vCPU 0" in m.error


def test_jump_to_unmapped_memory_is_an_internal_error(make_machine: MakeMachine) -> None:
    m = make_machine()
    m.load_guest(assemble(guests.JUMP_NOWHERE))
    m.start()
    assert m.wait_for_end(10)
    assert m.error is not None and "0x7f0000000000" in m.error


def test_all_vcpus_halted_ends_the_run(make_machine: MakeMachine) -> None:
    m = make_machine(smp=2)
    m.load_guest(assemble(guests.HALT))
    m.start()
    assert m.wait_for_end(10)
    assert m.runstate == RunState.SHUTDOWN and m.exit_status == 0
    assert all(s.halted for s in m.cpu_states())


def test_unix_socket_console(make_machine: MakeMachine, tmp_path: object) -> None:
    path = f"{tmp_path}/console.sock"
    m = make_machine(serial=f"unix:{path}")
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(10)
    client.connect(path)
    time.sleep(0.05)  # let the server thread accept before the guest writes
    m.load_guest(assemble(guests.ECHO_PLUS_ONE))
    m.start()
    client.sendall(b"abc")
    got = b""
    while len(got) < 3:
        got += client.recv(16)
    assert got == b"bcd"
    client.close()


def test_file_console(tmp_path: object) -> None:
    dev = open_chardev(f"file:{tmp_path}/out.txt")
    dev.write(b"ok")
    dev.close()
    with open(f"{tmp_path}/out.txt", "rb") as f:
        assert f.read() == b"ok"


@pytest.mark.parametrize("spec", ["tcp:1234", "file:", "serial"])
def test_bad_console_spec(spec: str) -> None:
    with pytest.raises(UsageError, match="expected stdio"):
        open_chardev(spec)


def test_unknown_port_reads_all_ones(make_machine: MakeMachine) -> None:
    m = make_machine()
    assert m.bus.read(0, 0x80, 1) == 0xFF and m.bus.read(0, 0x80, 4) == 0xFFFF_FFFF
