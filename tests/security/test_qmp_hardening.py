"""QMP hardening beyond tests/qmp: mutual TLS on a TCP monitor, stalled handshakes and
half-sent messages do not block other clients, unknown arguments are refused without running
the command, and a real ``livemig run`` creates its QMP and migration unix sockets mode 0600."""

from __future__ import annotations

import os
import socket
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from qmp_wire import json_lines

from livemig.qmp import Arg, CommandRegistry, QMPServer
from livemig.testing.procs import ProcHarness
from livemig.transport.tls import load_creds

TIMEOUT = 10.0


def _registry(calls: list[str]) -> CommandRegistry:
    reg = CommandRegistry()
    reg.add("touch", lambda text: calls.append(text) or text, args={"text": Arg(str)})
    return reg


@pytest.fixture
def tls_server(creds: dict[str, Path]) -> Iterator[tuple[QMPServer, list[str]]]:
    calls: list[str] = []
    server = QMPServer("tcp:127.0.0.1:0", _registry(calls),
                       tls=load_creds(creds["good"], "server"))  # fmt: skip
    server.start()
    yield server, calls
    server.close()


def _port(server: QMPServer) -> int:
    return int(server.address.rsplit(":", 1)[1])


def _client_ctx(d: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(d / "client-cert.pem", d / "client-key.pem")
    ctx.load_verify_locations(d / "ca-cert.pem")
    return ctx


def _session(sock: socket.socket) -> Iterator[dict]:
    it = json_lines(sock)
    assert "QMP" in next(it)
    sock.sendall(b'{"execute": "qmp_capabilities"}\n')
    assert next(it) == {"return": {}}
    return it


def test_qmp_tls_good_client(tls_server: tuple[QMPServer, list[str]], creds) -> None:
    server, calls = tls_server
    raw = socket.create_connection(("127.0.0.1", _port(server)), timeout=TIMEOUT)
    with _client_ctx(creds["good2"]).wrap_socket(raw, server_hostname="localhost") as s:
        it = _session(s)
        s.sendall(b'{"execute": "touch", "arguments": {"text": "hi"}}\n')
        assert next(it) == {"return": "hi"}
    assert calls == ["hi"]


@pytest.mark.parametrize("who", ["rogue", "plain"])
def test_qmp_tls_refuses_bad_client(
    tls_server: tuple[QMPServer, list[str]], creds, who: str
) -> None:
    server, calls = tls_server
    raw = socket.create_connection(("127.0.0.1", _port(server)), timeout=TIMEOUT)
    got = b""
    try:
        if who == "rogue":
            ctx = _client_ctx(creds["rogue"])
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # even trusting anything, we have no valid cert
            s = ctx.wrap_socket(raw, server_hostname="localhost")
        else:
            s = raw
        s.sendall(b'{"execute": "qmp_capabilities"}\n'
                  b'{"execute": "touch", "arguments": {"text": "x"}}\n')  # fmt: skip
        while chunk := s.recv(4096):
            got += chunk
    except (ssl.SSLError, OSError):
        pass
    finally:
        raw.close()
    assert b"QMP" not in got and b"return" not in got  # no greeting, nothing executed
    assert calls == []
    # the monitor still serves a valid client afterwards
    raw = socket.create_connection(("127.0.0.1", _port(server)), timeout=TIMEOUT)
    with _client_ctx(creds["good"]).wrap_socket(raw, server_hostname="localhost") as s:
        _session(s)


def test_stalled_clients_do_not_block_others(tls_server, creds) -> None:
    server, calls = tls_server
    # one client stops in the middle of the TLS handshake, one in the middle of a message
    stalled = socket.create_connection(("127.0.0.1", _port(server)), timeout=TIMEOUT)
    stalled.sendall(b"\x16\x03\x01\x00")  # a TLS record header, then silence
    raw = socket.create_connection(("127.0.0.1", _port(server)), timeout=TIMEOUT)
    half = _client_ctx(creds["good"]).wrap_socket(raw, server_hostname="localhost")
    _session(half)
    half.sendall(b'{"execute": "touch", "argu')
    raw2 = socket.create_connection(("127.0.0.1", _port(server)), timeout=TIMEOUT)
    with _client_ctx(creds["good"]).wrap_socket(raw2, server_hostname="localhost") as s:
        it = _session(s)
        s.sendall(b'{"execute": "touch", "arguments": {"text": "ok"}}\n')
        assert next(it) == {"return": "ok"}
    stalled.close()
    half.close()
    assert calls == ["ok"]


def test_unknown_argument_refused_without_running(tmp_path: Path) -> None:
    calls: list[str] = []
    path = f"/tmp/lm-qmp-{os.getpid()}.sock"
    server = QMPServer(f"unix:{path}", _registry(calls))
    server.start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(TIMEOUT)
            s.connect(path)
            it = _session(s)
            s.sendall(b'{"execute": "touch", "arguments": {"text": "a", "evil": 1}}\n')
            err = next(it)["error"]
            assert "evil" in err["desc"]
            s.sendall(b'{"execute": "touch", "arguments": {"text": 7}}\n')
            assert "error" in next(it)
            s.sendall(b'{"execute": "nope"}\n')
            assert next(it)["error"]["class"] == "CommandNotFound"
    finally:
        server.close()
    assert calls == []


@pytest.mark.timeout(60)
def test_real_process_sockets_are_private() -> None:
    with ProcHarness(memory="16M", smp=1) as h:
        dst = h.destination()
        assert dst.incoming is not None
        for path in (str(dst.qmp_path), dst.incoming[len("unix:") :]):
            mode = stat.S_IMODE(os.stat(path).st_mode)
            assert mode == 0o600, (path, oct(mode))
