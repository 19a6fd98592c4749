"""Pure pieces of replication: the front link's frames and the service state a checkpoint
carries (round trips, malformed input), a front connection's offsets (output commit, resends
after a failover, what the guest took in), the variable-size vmstate buffer, and the settings
and state tables (x-colo needs the return path; colo in both migration tables and the run
states)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig import vmstate as vs
from livemig.errors import StreamError, UsageError, VMStateError
from livemig.machine.runstate import RunState, is_legal
from livemig.migration.options import Capabilities, Parameters
from livemig.migration.state import (
    DESTINATION_TRANSITIONS,
    SOURCE_TRANSITIONS,
    MigrationStatus,
)
from livemig.service import link as L
from livemig.service.backend import LinkEndpoint


class _FakeLink:
    def __init__(self) -> None:
        self.frames: list[tuple[int, int, int, bytes]] = []

    def write(self, kind: int, conn: int = 0, off: int = 0, payload: bytes = b"") -> None:
        self.frames.append((kind, conn, off, payload))


def test_link_frames_round_trip_in_any_split() -> None:
    frames = [L.frame(L.OPEN, 7, 0), L.frame(L.DATA, 7, 0, b"*1\r\n$4\r\nPING\r\n"),
              L.frame(L.SUCCESSOR, 0, 0, b"tcp:127.0.0.1:7002"), L.frame(L.HEARTBEAT)]  # fmt: skip
    wire = b"".join(frames)
    for step in (1, 5, len(wire)):
        dec = L.LinkDecoder()
        got = []
        for i in range(0, len(wire), step):
            dec.receive_data(wire[i : i + step])
            got += dec.frames()
        assert [(f.kind, f.conn, f.payload) for f in got] == [
            (L.OPEN, 7, b""), (L.DATA, 7, b"*1\r\n$4\r\nPING\r\n"),
            (L.SUCCESSOR, 0, b"tcp:127.0.0.1:7002"), (L.HEARTBEAT, 0, b"")]  # fmt: skip


def test_link_refuses_unknown_types_and_huge_frames() -> None:
    dec = L.LinkDecoder()
    dec.receive_data(L.FRAME.pack(99, 0, 0, 0))
    with pytest.raises(StreamError, match="type 99"):
        dec.frames()
    dec = L.LinkDecoder()
    dec.receive_data(L.FRAME.pack(L.DATA, 1, 0, L.MAX_PAYLOAD + 1))
    with pytest.raises(StreamError, match="at most"):
        dec.frames()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 1 << 40),
                          st.integers(0, 1 << 40), st.binary(max_size=64)), max_size=8))  # fmt: skip
def test_service_state_round_trip(conns: list[tuple[int, int, int, bytes]]) -> None:
    states = [L.ConnState(c, committed, start + len(log), start, log)
              for c, committed, start, log in conns]  # fmt: skip
    raw = L.encode_service_state(states)
    assert L.decode_service_state(raw) == states
    for cut in {0, 3, len(raw) // 2, len(raw) - 1} - {len(raw)}:
        if cut < len(raw):
            with pytest.raises(StreamError):
                L.decode_service_state(raw[:cut] if cut else b"")
    with pytest.raises(StreamError, match="after the last"):
        L.decode_service_state(raw + b"x")


def test_output_commit_holds_replies_until_released() -> None:
    link = _FakeLink()
    ep = LinkEndpoint(5, link)  # type: ignore[arg-type]
    ep.respond(b"+OK\r\n", release=False)
    ep.respond(b":1\r\n", release=False)
    assert link.frames == [] and ep.produced == 9 and ep.released == 0
    ep.release(5)  # the checkpoint that holds the first reply was acknowledged
    assert link.frames == [(L.DATA, 5, 0, b"+OK\r\n")]
    ep.release(9)
    assert link.frames[-1] == (L.DATA, 5, 5, b":1\r\n")
    ep.confirmed(5)  # the front has the first reply
    state = ep.state()
    assert (state.log_start, state.log, state.produced) == (5, b":1\r\n", 9)


def test_a_restored_connection_resends_what_the_front_lacks_and_refuses_the_impossible() -> None:
    ep = LinkEndpoint.restore(L.ConnState(9, 40, 12, 4, b"abcdefgh"))
    link = _FakeLink()
    ep.link = link  # type: ignore[assignment]
    ep.resend_from(6)  # the front had replies up to 6
    assert link.frames == [(L.DATA, 9, 6, b"cdefgh")]
    assert (ep.req_off, ep.committed, ep.framer.offset) == (40, 40, 40)
    with pytest.raises(StreamError, match="kept"):
        ep.resend_from(13)  # more than this process ever produced
    with pytest.raises(StreamError, match="kept"):
        LinkEndpoint.restore(L.ConnState(9, 0, 12, 4, b"abcdefgh")).resend_from(3)


def test_committed_follows_the_chains_the_guest_took_in() -> None:
    ep = LinkEndpoint(1, None)
    chains = ep.framer.feed(b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nPING\r\n*1\r\n$4")
    ep.note_chains(chains)
    assert list(ep.ends) == [28]  # both whole commands in one chain; the rest is leftover
    assert ep.taken_in(still_queued=1) == 0
    assert ep.taken_in(still_queued=0) == 28


def test_vbuffer() -> None:
    d = vs.vmsd("x", 1, [vs.u32("size"), vs.vbuffer("state", "size", 8), vs.u8("after")])
    raw = d.encode({"size": 3, "state": b"abc", "after": 9})
    assert raw == b"\0\0\0\x03abc\x09"
    assert d.decode(raw) == ({"size": 3, "state": b"abc", "after": 9}, 8)
    assert d.describe({"size": 3, "state": b"abc", "after": 9})["fields"][1]["size"] == 3
    with pytest.raises(ValueError, match="says"):
        d.encode({"size": 4, "state": b"abc", "after": 9})
    with pytest.raises(VMStateError, match="at most 8"):
        d.decode(b"\0\0\0\x09" + bytes(10))


def test_x_colo_settings_and_state_tables() -> None:
    caps = Capabilities()
    with pytest.raises(UsageError, match="requires capability 'return-path'"):
        caps.set({"x-colo": True})
    for other in ("postcopy-ram", "multifd", "xbzrle"):
        with pytest.raises(UsageError, match="not compatible"):
            caps.set({"x-colo": True, "return-path": True, other: True})
    caps.set({"x-colo": True, "return-path": True})
    params = Parameters()
    assert params["x-checkpoint-delay"] == 20000  # QEMU's default
    with pytest.raises(UsageError, match="x-colo-heartbeat-timeout"):
        params.set({"x-colo-heartbeat-timeout": 10})
    S = MigrationStatus
    assert {(S.ACTIVE, S.COLO), (S.COLO, S.COMPLETED)} <= SOURCE_TRANSITIONS
    assert {(S.ACTIVE, S.COLO), (S.COLO, S.COMPLETED), (S.COLO, S.FAILED)} <= \
        DESTINATION_TRANSITIONS  # fmt: skip
    assert is_legal(RunState.INMIGRATE, RunState.COLO) and is_legal(RunState.COLO, RunState.RUNNING)
    assert not is_legal(RunState.COLO, RunState.POSTMIGRATE)
