"""x-machine: the source's machine shape, refused at setup when this machine cannot take it."""

from __future__ import annotations

import pytest

from livemig.errors import StreamError
from livemig.machine import Machine, parse_ram_blocks
from livemig.savevm.machine_check import MACHINE_VMSD, check_machine, describe_machine


@pytest.fixture
def machine():
    m = Machine(parse_ram_blocks("8M"), smp=2, serial="null")
    yield m
    m.close()


def test_same_shape_passes_and_round_trips(machine: Machine) -> None:
    state = describe_machine(machine)
    values, _ = MACHINE_VMSD.decode(MACHINE_VMSD.encode(state))
    check_machine(machine, values, 0)
    assert b"livemig-ring/0/1" in values["devices"]


def _with_devices(machine: Machine, text: bytes) -> dict:
    return {"cpus": 2, "devices": text.ljust(512, b"\0")}


def test_device_missing_or_newer_is_refused(machine: Machine) -> None:
    with pytest.raises(StreamError, match="the source has device 'virtio-net' instance 0, "
                                          "this machine does not"):  # fmt: skip
        check_machine(machine, _with_devices(machine, b"serial/0/1;virtio-net/0/1"), 7)
    with pytest.raises(StreamError, match="'livemig-ring' is version 9 at the source, newer"):
        check_machine(machine, _with_devices(machine, b"livemig-ring/0/9"), 7)
    with pytest.raises(StreamError, match="malformed device list"):
        check_machine(machine, _with_devices(machine, b"nonsense"), 7)
    with pytest.raises(StreamError, match=r"2 vCPUs, this machine 1|1 vCPUs, this machine 2"):
        check_machine(machine, {"cpus": 1, "devices": b"\0" * 512}, 7)
