"""The source's post-copy request path never waits behind a blocked background send.

Regression test: the migration thread used to hold the bitmap lock across its ``sendv`` of a
background PART; when the main socket was full (the destination busy) the return-path thread's
request for a page waited until the socket drained, 50-200 ms on a loaded host. Here the main
channel's peer reads nothing, so the background send blocks for good, and a request must still
go out on the preempt channel at once.
"""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from livemig.machine import Machine, RAMBlockSpec
from livemig.migration.postcopy_source import PostcopySource
from livemig.migration.stats import MigrationStats
from livemig.savevm.ram import RamSaver
from livemig.transport import Channel
from livemig.transport.ratelimit import RateLimiter
from livemig.wire.encoder import Encoder

PAGE = 4096


class _Source(SimpleNamespace):
    """The parts of an ``OutgoingMigration`` that ``PostcopySource`` uses."""

    def _check_cancel(self) -> None:
        if self.cancelled.is_set():
            raise RuntimeError("cancelled")

    def _check_rp(self) -> None:
        pass


@pytest.fixture
def source() -> Any:
    machine = Machine([RAMBlockSpec("pc.ram", 64 << 20)], smp=1)
    block = machine.ram_blocks[0]
    block.array[:] = 7  # every page normal: the background sends all of it
    main_a, main_b = socket.socketpair()
    pre_a, pre_b = socket.socketpair()
    for s in (main_a, pre_a):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
    mig = _Source(
        config=SimpleNamespace(capabilities={"postcopy-ram", "postcopy-preempt"},
                               params={"x-postcopy-prefetch": 0, "downtime-limit": 300}),
        ram=RamSaver(machine.ram_blocks), encoder=Encoder(), _ram_sid=2,
        channel=Channel.from_socket(main_a, "main", timeout=30), stats=MigrationStats(),
        rate=RateLimiter(0), _wake=threading.Event(), cancelled=threading.Event(),
        _rp_error=None, checks=None,
    )  # fmt: skip
    ps = PostcopySource(mig)
    ps.preempt_channel = Channel.from_socket(pre_a, "preempt", timeout=5)
    ps.preempt_encoder = Encoder()
    ps.active = True
    ps._rp_boosted = True  # no priority change for the test's own thread
    yield SimpleNamespace(mig=mig, ps=ps, block=block, main_peer=main_b, preempt_peer=pre_b)
    mig.cancelled.set()
    mig.channel.shutdown()
    for s in (main_b, pre_b):
        s.close()
    mig.channel.close()
    ps.preempt_channel.close()
    machine.close()


def _recv_all(sock: socket.socket, n: int, timeout: float) -> bytes:
    sock.settimeout(timeout)
    out = b""
    while len(out) < n:
        out += sock.recv(n - len(out))
    return out


def test_request_is_served_while_the_background_send_is_blocked(source) -> None:
    mig, ps = source.mig, source.ps
    pusher = threading.Thread(target=lambda: _swallow(ps._push), daemon=True)
    pusher.start()
    # wait until the background send is stuck on the full main socket
    deadline = time.monotonic() + 10
    while mig.channel.bytes_sent == 0 or mig.channel.unsent() < (32 << 10):
        assert time.monotonic() < deadline, "the background send never filled the socket"
        time.sleep(0.01)
    time.sleep(0.1)
    # a page the background walk has not reached (it walks upwards from page 0)
    want = source.block.npages - 1
    assert mig.ram.dirty["pc.ram"][want]
    served = threading.Event()

    def request() -> None:
        ps.on_page_request("pc.ram", want * PAGE, PAGE)
        served.set()

    threading.Thread(target=request, daemon=True).start()
    assert served.wait(2), "the request waited behind the blocked background send"
    record = _recv_all(source.preempt_peer, 8 + 1 + len("pc.ram") + PAGE, timeout=2)
    assert int.from_bytes(record[:8], "big") & ~0xFFF == want * PAGE
    assert record[-PAGE:] == bytes([7]) * PAGE
    assert ps.requested_sent == 1 and not mig.ram.dirty["pc.ram"][want]


def _swallow(fn: Any) -> None:
    try:
        fn()
    except Exception:  # the fixture's teardown breaks the blocked send: expected
        pass


def test_finish_waits_for_a_request_in_flight(source) -> None:
    """EOS on the preempt channel follows every page the return-path thread took."""
    ps = source.ps
    with ps.lock:
        ps.preempt_lock.acquire()  # as a request's send in progress holds it
    done = threading.Event()

    def deactivate() -> None:
        with ps.lock:
            ps.active = False
        with ps.preempt_lock:
            done.set()

    threading.Thread(target=deactivate, daemon=True).start()
    time.sleep(0.2)
    assert not done.is_set()
    ps.preempt_lock.release()
    assert done.wait(2)
    assert ps._send_requested(ps.preempt_channel, ps.preempt_encoder, source.block, 0, PAGE,
                              "postcopy") is False  # fmt: skip
    assert np.all(source.mig.ram.dirty["pc.ram"])  # nothing taken once inactive


def test_the_staging_buffer_is_faulted_in_at_advise() -> None:
    """The thread that installs background pages after the switch has its staging buffer in
    memory from POSTCOPY_ADVISE on: faulting it in at the first PART after the switch cost
    0.3-0.5 ms, which the guest's first requests waited behind (traced)."""
    from livemig.memtrack import present_pages
    from livemig.memtrack._sys import buffer_address
    from livemig.migration.postcopy_dest import PostcopyIncoming
    from livemig.wire import events as E
    from livemig.wire.decoder import Decoder

    def run() -> np.ndarray:
        dest = PostcopyIncoming.__new__(PostcopyIncoming)
        dest.inc = SimpleNamespace(capabilities=frozenset({"postcopy-ram"}))
        dest._local = threading.local()
        dest._advise(E.PostcopyAdvise(PAGE, PAGE), Decoder(with_header=False))
        stage = dest._local.staging
        addr = buffer_address(memoryview(stage))
        first = addr & ~(PAGE - 1)
        end = (addr + stage.nbytes + PAGE - 1) & ~(PAGE - 1)
        return present_pages(first, end - first)

    out: list[np.ndarray] = []
    t = threading.Thread(target=lambda: out.append(run()))  # a thread of its own, as there
    t.start()
    t.join(10)
    assert out and out[0].all()
