"""Who may talk to a QMP monitor: clients that never negotiate cannot lock management out, and
a TCP monitor beyond loopback needs TLS unless ``--qmp-insecure`` says the exposure is meant.

Both failed before: sixteen idle connections made the server answer every other client with
"too many QMP clients (limit 16)" for as long as they stayed open, and ``livemig run --qmp
tcp:0.0.0.0:PORT`` listened on every interface without authentication.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
from qmp_wire import json_lines

from livemig.errors import UsageError
from livemig.qmp import Arg, CommandRegistry, QMPServer
from livemig.testing.procs import free_tcp_port

TIMEOUT = 10.0


def _registry() -> CommandRegistry:
    reg = CommandRegistry()
    reg.add("echo", lambda text: text, args={"text": Arg(str)})
    return reg


def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(TIMEOUT)
    s.connect(path)
    return s


def test_idle_clients_do_not_lock_management_out(tmp_path) -> None:
    path = str(tmp_path / "qmp.sock")
    server = QMPServer(f"unix:{path}", _registry(), max_clients=4)
    server.start()
    idle = []
    try:
        for _ in range(4):  # every slot taken by a client that never negotiates
            s = _connect(path)
            assert "QMP" in next(json_lines(s))  # the greeting: the session exists
            idle.append(s)
        mgmt = _connect(path)
        it = json_lines(mgmt)
        first = next(it)
        assert "QMP" in first, first  # not "too many QMP clients"
        mgmt.sendall(b'{"execute": "qmp_capabilities"}\n')
        assert next(it) == {"return": {}}
        mgmt.sendall(b'{"execute": "echo", "arguments": {"text": "hi"}}\n')
        assert next(it) == {"return": "hi"}
        # the oldest idle client lost its slot, and was told why
        dropped = list(json_lines(idle[0]))
        assert dropped and "not negotiated" in dropped[-1]["error"]["desc"]
        mgmt.close()
    finally:
        for s in idle:
            s.close()
        server.close()


def test_client_that_never_negotiates_is_dropped(tmp_path) -> None:
    path = str(tmp_path / "qmp.sock")
    server = QMPServer(f"unix:{path}", _registry(), negotiation_timeout=0.5)
    server.start()
    try:
        s = _connect(path)
        t0 = time.monotonic()
        msgs = list(json_lines(s))  # ends when the server closes the connection
        assert time.monotonic() - t0 < 5
        assert "no qmp_capabilities within 0.5 s" in msgs[-1]["error"]["desc"]
        # a client that negotiates in time keeps its session past the time-out
        ok = _connect(path)
        it = json_lines(ok)
        next(it)
        ok.sendall(b'{"execute": "qmp_capabilities"}\n')
        assert next(it) == {"return": {}}
        time.sleep(1.0)
        ok.sendall(b'{"execute": "echo", "arguments": {"text": "still here"}}\n')
        assert next(it) == {"return": "still here"}
        ok.close()
        s.close()
    finally:
        server.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1"])
def test_tcp_monitor_beyond_loopback_needs_tls(host: str) -> None:
    with pytest.raises(UsageError, match="--qmp-insecure"):
        QMPServer(f"tcp:[{host}]:0" if ":" in host else f"tcp:{host}:0", _registry())


def test_loopback_and_insecure_are_allowed() -> None:
    for addr, kw in (("tcp:127.0.0.1:0", {}), ("tcp:[::1]:0", {}), ("tcp:localhost:0", {}),
                     ("tcp:0.0.0.0:0", {"insecure": True})):  # fmt: skip
        server = QMPServer(addr, _registry(), **kw)
        server.start()
        server.close()


@pytest.mark.timeout(60)
def test_livemig_run_refuses_an_open_monitor() -> None:
    port = free_tcp_port()
    cmd = [sys.executable, "-m", "livemig", "run", "--guest", "idle", "--memory", "16M",
           "--qmp", f"tcp:0.0.0.0:{port}"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "--qmp-insecure" in out.stderr and "TLS" in out.stderr, out.stderr
    # with the flag it starts (and is stopped from here)
    proc = subprocess.Popen([*cmd, "--qmp-insecure"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    assert b"QMP" in s.recv(4096)
                    break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "the insecure monitor did not come up"
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(10)
