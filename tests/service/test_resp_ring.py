"""The host-side RESP framer and the ring device on their own: command boundaries, chain
limits, and a device whose state is saved with requests in flight and loaded elsewhere."""

from __future__ import annotations

import struct

import pytest

from livemig.errors import MachineError, StreamError
from livemig.machine.abi import RING_SETUP_PORT, RING_SIZE, RING_WAIT_PORT
from livemig.machine.devices.ring import (
    CHAIN_MAX,
    RING_MAGIC,
    RING_SETUP_INIT,
    RING_SETUP_TOUCHED,
    RING_SLOTS,
    RING_WAIT_TOUCH,
    RingDevice,
)
from livemig.service.resp import RequestFramer, encode_command, parse_reply


def test_framer_splits_whole_commands_fed_byte_by_byte() -> None:
    stream = encode_command(["SET", "k", "v" * 100]) + b"PING\r\n" + encode_command(["GET", "k"])
    f = RequestFramer(limit=1 << 16)
    chains = [c for i in range(len(stream)) for c in f.feed(stream[i : i + 1])]
    assert b"".join(chains) == stream and f.leftover() == b"" and f.commands == 3


def test_framer_batches_up_to_the_limit_and_refuses_a_larger_command() -> None:
    cmd = encode_command(["SET", "key", "x" * 50])
    f = RequestFramer(limit=len(cmd) * 3)
    chains = f.feed(cmd * 10)
    assert [len(c) for c in chains] == [len(cmd) * 3] * 3 + [len(cmd)]
    with pytest.raises(StreamError, match="exceeds"):
        RequestFramer(limit=64).feed(encode_command(["SET", "k", "y" * 100]))
    with pytest.raises(StreamError):
        RequestFramer(limit=64).feed(b"*x\r\n")


def test_parse_reply_nested() -> None:
    data = b"*3\r\n$1\r\na\r\n$-1\r\n:5\r\n"
    assert parse_reply(data) == ([b"a", None, 5], len(data))
    assert parse_reply(data[:-1]) is None


def _ring() -> tuple[RingDevice, memoryview]:
    mem = memoryview(bytearray(RING_SIZE))
    dev = RingDevice(mem)
    struct.pack_into("<Q", mem, 0, RING_MAGIC)
    dev.io_write(0, RING_SETUP_PORT, 4, RING_SETUP_INIT)
    dev.vm_state_change(True)
    return dev, mem


def test_chains_enter_whole_and_state_moves_with_requests_in_flight() -> None:
    dev, mem = _ring()
    big = b"x" * (CHAIN_MAX - 10)  # takes every slot
    dev.submit(7, b"PING\r\n")
    dev.submit(8, big)
    assert dev.io_read(0, RING_WAIT_PORT, 4) == 1  # the big chain does not fit beside it
    assert dev.in_flight()["queued-chains"] == 1
    with pytest.raises(MachineError):
        dev.submit(9, b"y" * (CHAIN_MAX + 1))
    dev.vm_state_change(False)
    state = dev.save_state()
    assert (state["req_prod"], state["req_cons"]) == (1, 0)
    other = RingDevice(memoryview(bytearray(mem)))  # RAM migrates alongside
    other.load_state(state)
    other.vm_state_change(True)
    assert other.io_read(0, RING_WAIT_PORT, 4) == RING_WAIT_TOUCH
    other.io_write(0, RING_SETUP_PORT, 4, RING_SETUP_TOUCHED)
    assert other.io_read(0, RING_WAIT_PORT, 4) == 1  # the in-flight request is still there
    assert dev.take_pending() == [(8, big)]
    assert RING_SLOTS * 4096 < RING_SIZE
