"""The destination's reason reaches a livemig source, and only a livemig source: a stream that
announces it (a PING of X_FEATURES_PING, which a QEMU source never sends) gets XError before
SHUT(1); one that does not (what QEMU sends) gets PONG and SHUT(1) only, as from QEMU. And
the x-machine section makes a destination refuse a mismatched machine at setup."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from livemig.machine import Machine, parse_ram_blocks
from livemig.migration.destination import IncomingMigration
from livemig.migration.options import Parameters
from livemig.migration.state import MigrationState, MigrationStatus
from livemig.savevm.machine_check import MACHINE_IDSTR, MACHINE_VMSD, describe_machine
from livemig.wire import Encoder, Pong, ReturnPathDecoder, Shut, XError
from livemig.wire import events as E
from livemig.wire.constants import X_FEATURES_PING


def _run(tmp_path: Path, announce: bool, source_cpus: int = 1) -> tuple[list, MigrationState]:
    machine = Machine(parse_ram_blocks("8M"), smp=1, serial="null")
    try:
        state = MigrationState("destination")
        path = tmp_path / "in.sock"
        inc = IncomingMigration(machine, f"unix:{path}", state, Parameters().query())
        inc.start()
        enc = Encoder()
        bufs = [*enc.send(E.Header()), *enc.send(E.Configuration("livemig-x86_64")),
                *enc.send(E.OpenReturnPath()), *enc.send(E.Ping(1))]  # fmt: skip
        if announce:
            bufs += enc.send(E.Ping(X_FEATURES_PING))
        shape = describe_machine(machine)
        shape["cpus"] = source_cpus
        enc.devices[MACHINE_IDSTR] = MACHINE_VMSD
        bufs += enc.send(E.SectionFull(1, MACHINE_IDSTR, 0, 1, shape))
        if source_cpus == 1:  # a device this machine lacks: refused at the end, as QEMU does
            enc.devices["nodev"] = MACHINE_VMSD
            bufs += enc.send(E.SectionFull(2, "nodev", 0, 1, shape))
            bufs += enc.send(E.Eof())
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(path))
            s.sendall(b"".join(bytes(b) for b in bufs))
            dec = ReturnPathDecoder()
            deadline = time.monotonic() + 10
            msgs: list = []
            while not any(isinstance(m, Shut) for m in msgs) and time.monotonic() < deadline:
                data = s.recv(4096)
                if not data:
                    break
                dec.receive_data(data)
                msgs += dec.events()
        inc.join(10)
        return msgs, state
    finally:
        machine.close()


def test_a_livemig_source_gets_the_reason(tmp_path: Path) -> None:
    msgs, state = _run(tmp_path, announce=True)
    assert msgs[:2] == [Pong(1), Pong(X_FEATURES_PING)] and msgs[-1] == Shut(1)
    (err,) = [m for m in msgs if isinstance(m, XError)]
    assert "device section 'nodev' instance 0" in err.reason
    assert state.status == MigrationStatus.FAILED and state.error == err.reason


def test_a_source_that_did_not_ask_gets_what_qemu_sends(tmp_path: Path) -> None:
    msgs, _state = _run(tmp_path, announce=False)
    assert msgs == [Pong(1), Shut(1)]


@pytest.mark.parametrize("announce", [True, False])
def test_vcpu_mismatch_refused_at_setup(tmp_path: Path, announce: bool) -> None:
    msgs, state = _run(tmp_path, announce=announce, source_cpus=2)
    assert msgs[-1] == Shut(1)
    assert "the source has 2 vCPUs, this machine 1 (start the destination with --smp 2)" in (
        state.error or "")  # fmt: skip
