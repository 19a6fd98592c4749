"""The service front's follow logic in one process, with a fake migration: a destination that
never dials (clients told within FOLLOW_TIMEOUT_S), a failed migration (the front serves on),
a wrong token (refused), and the follow address for each URI scheme."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from livemig.machine import Machine
from livemig.migration.state import MigrationState, MigrationStatus
from livemig.service import front as F
from livemig.service.resp import RespClient, RespError
from livemig.testing.procs import free_tcp_port, wait_until


@pytest.fixture
def setup(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[F.ServiceFront, MigrationState, int]]:
    monkeypatch.setattr(F, "FOLLOW_TIMEOUT_S", 0.5)
    machine = Machine(smp=1)
    state = MigrationState("source")
    manager = SimpleNamespace(
        source=state,
        outgoing=SimpleNamespace(config=SimpleNamespace(uri="tcp:127.0.0.1:9", params={})),
        params={"tls-creds": ""},
    )
    port = free_tcp_port()
    front = F.start_service(machine, f"tcp:127.0.0.1:{port}", None, manager)
    try:
        yield front, state, port
    finally:
        front.close()
        machine.close()


def _migrate(state: MigrationState, final: MigrationStatus) -> None:
    state.move(MigrationStatus.SETUP)
    state.move(MigrationStatus.ACTIVE)
    state.move(final)


def test_no_dial_after_completion_tells_the_clients(setup: tuple) -> None:
    front, state, port = setup
    with RespClient("127.0.0.1", port, timeout=10) as c:
        c.sock.sendall(b"PING\r\n")  # queued: this machine's guest never runs
        wait_until(lambda: front.info()["queued-chains"] == 1, 5, "request queued")
        _migrate(state, MigrationStatus.COMPLETED)
        assert front.device.follow is not None and front.follow_address
        t0 = time.monotonic()
        reply = c._replies(1)[0]  # the queued PING's reply is the error
        assert isinstance(reply, RespError) and "did not connect within 0.5 s" in str(reply)
        assert time.monotonic() - t0 < 3
    with (
        RespClient("127.0.0.1", port, timeout=10) as c2,
        pytest.raises(RespError, match="migrated"),
    ):
        c2.call("PING")
    assert front.info()["refused"] == 1


def test_failed_migration_keeps_serving(setup: tuple) -> None:
    front, state, port = setup
    with RespClient("127.0.0.1", port, timeout=10) as c:
        c.sock.sendall(b"PING\r\n")
        _migrate(state, MigrationStatus.FAILED)
        time.sleep(F.FOLLOW_TIMEOUT_S + 0.3)
        assert front.device.follow is None and front.info()["error"] is None
        assert front.info()["queued-chains"] == 1  # still there for the guest
        assert c.sock.fileno() >= 0


def test_a_wrong_token_is_refused(setup: tuple) -> None:
    front, state, _port = setup
    state.move(MigrationStatus.SETUP)
    state.move(MigrationStatus.ACTIVE)
    follow = front.device.follow
    assert follow is not None
    with socket.create_connection((follow.host, follow.port), timeout=5) as s:
        s.sendall(F.TUNNEL_MAGIC + bytes(16))
        assert s.recv(10) == b""  # closed
    assert not front.forwarding


def test_follow_host() -> None:
    assert F.follow_host("tcp:127.0.0.1:4444") == "127.0.0.1"
    assert F.follow_host("unix:/tmp/x.sock") == "127.0.0.1"
    assert F.follow_host("file:/tmp/x.mig") is None
