"""The post-copy push never runs far ahead of the destination's listen thread.

Traced on a loaded 2-core host (session 12): a page sent on the main channel at a request
waited behind everything the push had sent before it and the destination had not read yet,
megabytes of socket buffer: 14-22 ms for the first requests when the push started while the
destination was still loading the package, 4-11 ms later when the walk ran ahead of it in the
burst at the start of a rate window. Here the main channel's peer reads everything at once (the
kernel never holds the push back), so only ``PostcopySource`` can: it waits for PONG 4 before
the push starts, and the walk keeps at most ``PIPE_LIMIT`` bytes past the destination's last
PONG.
"""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from livemig.machine import Machine, RAMBlockSpec
from livemig.migration import postcopy_readahead as RA
from livemig.migration import postcopy_source as PS
from livemig.migration.postcopy_source import PostcopySource
from livemig.migration.stats import MigrationStats
from livemig.savevm.ram import RamSaver
from livemig.transport import Channel
from livemig.transport.ratelimit import RateLimiter
from livemig.wire import constants as C
from livemig.wire import events as E
from livemig.wire.encoder import Encoder

PAGE = 4096


class _Source(SimpleNamespace):
    """The parts of an ``OutgoingMigration`` that ``PostcopySource`` uses."""

    def _check_cancel(self) -> None:
        if self.cancelled.is_set():
            raise RuntimeError("cancelled")

    def _check_rp(self) -> None:
        pass


class _Drain:
    """The destination's side of the main channel: reads everything as it comes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = bytearray()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                got = self.sock.recv(1 << 20)
            except OSError:
                return
            if not got:
                return
            with self.lock:
                self.data += got

    def count(self) -> int:
        with self.lock:
            return len(self.data)


@pytest.fixture
def source(monkeypatch: pytest.MonkeyPatch) -> Any:
    # no PONG ever comes unless a test answers: the limit must not time out under a slow run
    monkeypatch.setattr(PS, "PIPE_SILENT", 60.0)
    machine = Machine([RAMBlockSpec("pc.ram", 64 << 20)], smp=1)
    block = machine.ram_blocks[0]
    block.array[:] = 7  # every page normal: the walk sends all of it
    main_a, main_b = socket.socketpair()
    mig = _Source(
        config=SimpleNamespace(capabilities={"postcopy-ram"},
                               params={"x-postcopy-prefetch": 0, "downtime-limit": 300,
                                       "x-io-timeout": 30000}),
        ram=RamSaver(machine.ram_blocks), encoder=Encoder(), _ram_sid=2,
        channel=Channel.from_socket(main_a, "main", timeout=30), stats=MigrationStats(),
        rate=RateLimiter(0), _wake=threading.Event(), cancelled=threading.Event(),
        _rp_error=None, checks=None,
    )  # fmt: skip
    ps = PostcopySource(mig)
    ps.active = True
    ps._rp_boosted = True  # no priority change for the test's own thread
    ps._pipe_reset()
    drain = _Drain(main_b)
    yield SimpleNamespace(mig=mig, ps=ps, block=block, drain=drain)
    mig.cancelled.set()
    mig.channel.shutdown()
    main_b.close()
    mig.channel.close()
    machine.close()


def _run(fn: Any) -> threading.Thread:
    def body() -> None:
        try:
            fn()
        except Exception:  # the fixture's cancel ends it: expected
            pass

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t


def _settle(read: Any, quiet: float = 0.3, limit: float = 10) -> int:
    """``read()`` once it stopped changing for ``quiet`` seconds."""
    deadline = time.monotonic() + limit
    last, since = read(), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "never settled"
        time.sleep(0.02)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
    return last


def _answer(ps: PostcopySource) -> None:
    """The destination's PONGs to every pipe PING sent so far."""
    for value, _sent, _t in list(ps._pipe_pings):
        ps.on_pong(value)


def test_the_push_waits_for_the_destination_to_listen(source) -> None:
    """No background page before PONG 4 (the destination's incoming thread reads nothing until
    its package is loaded); the push starts at once after it."""
    mig, ps = source.mig, source.ps
    before = mig.channel.bytes_sent
    _run(ps._loop)
    time.sleep(0.3)
    assert mig.channel.bytes_sent == before and source.drain.count() == 0
    ps.on_pong(3)  # another PING's answer changes nothing
    time.sleep(0.1)
    assert mig.channel.bytes_sent == before
    ps.on_pong(PS.LISTENING_PING)
    deadline = time.monotonic() + 5
    while source.drain.count() == 0:
        assert time.monotonic() < deadline, "the push did not start after PONG 4"
        time.sleep(0.01)


def test_the_walk_stays_within_the_pipe_limit_of_the_last_pong(source) -> None:
    mig, ps = source.mig, source.ps
    start = mig.channel.bytes_sent
    _run(ps._push)
    ahead = _settle(lambda: mig.channel.bytes_sent) - start
    # at most one PART (and its PING) past the limit: the check comes before each PART
    part = PS.BACKGROUND_PAGES * (PAGE + 16) + 64
    assert PS.PIPE_LIMIT <= ahead <= PS.PIPE_LIMIT + part
    assert source.drain.count() == mig.channel.bytes_sent - start  # all read, none answered
    assert mig.ram.pending_pages() > 0  # held back, not finished
    pings = [v for v, _s, _t in ps._pipe_pings]
    assert pings and all(v & PS.PIPE_PING_FLAG for v in pings)
    _answer(ps)
    more = _settle(lambda: mig.channel.bytes_sent) - start
    assert ps._pipe_read - start <= ahead < more <= ps._pipe_read - start + PS.PIPE_LIMIT + part


def test_the_pings_are_qemu_pings_between_whole_sections(source) -> None:
    """What the pipe adds to the stream is QEMU's PING command (0x08, MIG_CMD_PING, length 4,
    be32 value), right after a PART's footer, and its value never one of the switch's (1-4)
    or livemig's features PING."""
    mig, ps = source.mig, source.ps
    _run(ps._push)
    _settle(lambda: mig.channel.bytes_sent)
    with source.drain.lock:
        data = bytes(source.drain.data)
    want = [v for v, _s, _t in ps._pipe_pings]
    assert want
    footer = bytes([C.QEMU_VM_SECTION_FOOTER]) + mig._ram_sid.to_bytes(4, "big")
    for v in want:
        assert v not in (1, 2, 3, 4, C.X_FEATURES_PING)
        cmd = bytes([C.QEMU_VM_COMMAND]) + C.Command.PING.to_bytes(2, "big") + \
            (4).to_bytes(2, "big") + v.to_bytes(4, "big")  # fmt: skip
        at = data.find(cmd)
        assert at > 0 and data[at - len(footer) : at] == footer
        assert b"".join(bytes(x) for x in Encoder().send(E.Ping(v))) == cmd


def test_a_readahead_window_goes_while_the_walk_waits(source) -> None:
    """A sequential stream's window is the guest's next pages: the pipe holds back the walk,
    not the window."""
    mig, ps = source.mig, source.ps
    _run(ps._push)
    _settle(lambda: mig.channel.bytes_sent)
    assert ps._pipe_full()
    ps.readahead = RA.Readahead(first=64, limit=64)
    d = mig.ram.dirty["pc.ram"]
    far = source.block.npages - 1024
    with ps.lock:
        d[far : far + 2] = False  # served on the request path elsewhere
    ps._note_request(source.block, far * PAGE, PAGE)
    ps._note_request(source.block, (far + 1) * PAGE, PAGE)
    deadline = time.monotonic() + 5
    while d[far + 2 : far + 66].any():
        assert time.monotonic() < deadline, "the window waited behind the walk's pipe limit"
        time.sleep(0.01)


def test_a_destination_that_answers_no_ping_never_stalls_the_push(source, monkeypatch) -> None:
    monkeypatch.setattr(PS, "PIPE_SILENT", 0.3)
    mig, ps = source.mig, source.ps
    mig.rate.rate = 64 << 20  # 6.4 MiB a 100 ms window: the walk goes on, paced
    done = threading.Event()
    _run(lambda: ps._push() and done.set())
    assert done.wait(15), "the push stalled waiting for PONGs that never come"
    assert ps._pipe_off


def test_the_push_gives_up_the_interpreter_lock_before_each_parts_encoding(
    source, monkeypatch
) -> None:
    """A request's thread, woken while the push builds a PART, gets the interpreter lock when
    the push has taken the PART's pages, not only at its next send."""
    mig, ps = source.mig, source.ps
    seen: list[int] = []
    monkeypatch.setattr(PS, "_yield_gil", lambda: seen.append(mig.channel.bytes_sent))
    _run(ps._push)
    deadline = time.monotonic() + 5
    while len(seen) < 3:
        assert time.monotonic() < deadline, "the push never gave the lock up"
        time.sleep(0.01)
    first = seen[:3]
    assert first == sorted(set(first))  # once before each PART's send, a send in between
