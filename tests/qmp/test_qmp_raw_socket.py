"""The server on a bare socket: exact wire bytes, hostile input, many clients, vanishing clients."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from collections.abc import Callable

import pytest

from livemig.errors import UsageError
from livemig.qmp import Arg, CommandRegistry, QMPServer
from livemig.qmp.server import parse_qmp_address


def registry() -> CommandRegistry:
    reg = CommandRegistry()
    reg.add("echo", lambda text: text, args={"text": Arg(str)})
    reg.add("nothing", lambda: None)
    return reg


def test_wire_bytes_and_negotiation_mode(make_server: Callable[..., QMPServer], raw) -> None:
    server = make_server(registry())
    c = raw(server.address)
    greeting = c.recv_line()
    assert greeting.startswith(
        b'{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}'
    )
    assert greeting.endswith(b'"capabilities": ["oob"]}}\r\n')
    c.send(b'{"execute":"nothing","id":1}')
    assert c.recv_line() == (
        b'{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation'
        b' with \'qmp_capabilities\'"}, "id": 1}\r\n'
    )
    c.send({"execute": "no-such", "id": "x"})
    assert c.recv()["error"]["desc"] == "Expecting capabilities negotiation with 'qmp_capabilities'"
    # QEMU 10.0's words: its visitor names a list element 'null' once the type is right
    c.send({"execute": "qmp_capabilities", "arguments": {"enable": ["oob", "warp"]}})
    assert c.recv()["error"] == {
        "class": "GenericError",
        "desc": "Parameter 'null' does not accept value 'warp'",
    }
    c.send({"execute": "qmp_capabilities", "arguments": {"enable": [7]}})
    assert c.recv()["error"] == {
        "class": "GenericError",
        "desc": "Invalid parameter type for 'enable[0]', expected: string",
    }
    c.send(b'{"execute":"qmp_capabilities","id":{"any":["json",1]}}')
    assert c.recv_line() == b'{"return": {}, "id": {"any": ["json", 1]}}\r\n'
    c.send(b'{"execute":"echo","arguments":{"text":"hi"},"id":[7]}')
    assert c.recv_line() == b'{"return": "hi", "id": [7]}\r\n'


@pytest.mark.parametrize(
    ("sent", "desc"),
    [
        (b"[1, 2]", "QMP input must be a JSON object"),
        (b'"execute"', "QMP input must be a JSON object"),
        (b"42 ", "QMP input must be a JSON object"),
        # JSON null: it was queued as the dispatcher's stop, which ended every later reply
        (b"null ", "QMP input must be a JSON object"),
        (b'{"execute": "echo", "extra": 1}', "QMP input member 'extra' is unexpected"),
        (b'{"exec-oob": "nothing"}', "QMP input member 'exec-oob' is unexpected"),
        (b'{"execute": 5}', "QMP input member 'execute' must be a string"),
        (b'{"execute": "echo", "arguments": []}', "QMP input member 'arguments' must be an object"),
        (b'{"id": 3}', "QMP input lacks member 'execute'"),
        (b'{"execute": "echo", "arguments": {"text": }}', "JSON parse error, expecting value"),
        (b'{"execute": "x",, }', "JSON parse error"),
        (b"}", "JSON parse error, unexpected '}'"),
        # a number beyond a double: Python read it as inf, the reply echoing it as "id" could
        # not be encoded, and the session's dispatcher died: no reply ever again
        (b'{"execute": "echo", "id": 1e999}', "JSON parse error, number '1e999' out of range"),
        (b'{"execute": "echo", "arguments": {"text": -1E400}}', "JSON parse error, number '-1E4"),
    ],
)
def test_bad_input_gets_error_and_connection_survives(
    make_server: Callable[..., QMPServer], raw, sent: bytes, desc: str
) -> None:
    server = make_server(registry())
    c = raw(server.address)
    c.greet_and_negotiate()
    c.send(sent)
    reply = c.recv()
    assert reply["error"]["class"] == "GenericError"
    assert reply["error"]["desc"].startswith(desc), reply
    c.send({"execute": "echo", "arguments": {"text": "still here"}})
    assert c.recv() == {"return": "still here"}


def test_single_quotes_as_typed_at_a_socat(make_server: Callable[..., QMPServer], raw) -> None:
    """QEMU 10.0 takes {'execute': 'qmp_capabilities'}: so does livemig (it replied with a
    JSON parse error)."""
    server = make_server(registry())
    c = raw(server.address)
    c.recv()  # greeting
    c.send(b"{'execute': 'qmp_capabilities'}")
    assert c.recv() == {"return": {}}
    c.send(b"{'execute': 'echo', 'arguments': {'text': 'it\\'s \"quoted\"'}, 'id': 'a'}")
    assert c.recv() == {"return": 'it\'s "quoted"', "id": "a"}


def test_id_echoed_on_dispatch_errors(make_server: Callable[..., QMPServer], raw) -> None:
    server = make_server(registry())
    c = raw(server.address)
    c.greet_and_negotiate()
    c.send({"execute": "echo", "bogus": 1, "id": "a"})
    assert c.recv()["id"] == "a"
    c.send({"execute": "nope", "id": None})
    reply = c.recv()
    assert reply == {
        "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"},
        "id": None,
    }


def test_json_split_across_tiny_writes(make_server: Callable[..., QMPServer], raw) -> None:
    server = make_server(registry())
    c = raw(server.address)
    c.greet_and_negotiate()
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1) if server.address.startswith(
        "tcp"
    ) else None
    msg = b'{"execute": "echo", "arguments": {"text": "pieces {}[]\\""}, "id": 9}'
    for i in range(len(msg)):
        c.send(msg[i : i + 1])
        time.sleep(0.001)
    assert c.recv() == {"return": 'pieces {}[]"', "id": 9}


def test_several_messages_in_one_write_keep_order(
    make_server: Callable[..., QMPServer], raw
) -> None:
    server = make_server(registry())
    c = raw(server.address)
    c.greet_and_negotiate()
    c.send(
        b"".join(
            b'{"execute":"echo","arguments":{"text":"m%d"},"id":%d}' % (i, i) for i in range(50)
        )
    )
    assert [c.recv()["id"] for _ in range(50)] == list(range(50))


def test_oversized_message_closes_connection(make_server: Callable[..., QMPServer], raw) -> None:
    server = make_server(registry(), max_message_size=4096)
    c = raw(server.address)
    c.greet_and_negotiate()
    c.send(b'{"execute": "echo", "arguments": {"text": "' + b"x" * 10000)
    reply = c.recv()
    assert reply["error"]["class"] == "GenericError"
    assert "exceeds the 4096-byte limit" in reply["error"]["desc"]
    c.expect_eof()
    # The server itself is fine.
    d = raw(server.address)
    d.greet_and_negotiate()


def test_default_cap_is_one_mib(make_server: Callable[..., QMPServer], raw) -> None:
    server = make_server(registry())
    c = raw(server.address)
    c.greet_and_negotiate()
    text = "y" * (900 << 10)
    c.send(b'{"execute": "echo", "arguments": {"text": "' + text.encode() + b'"}}')
    assert c.recv() == {"return": text}
    try:
        c.send(b'{"execute": "echo", "arguments": {"text": "' + b"z" * (1100 << 10))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may hang up before everything is written
    assert "exceeds the 1048576-byte limit" in c.recv()["error"]["desc"]


def test_many_clients_and_client_limit(make_server: Callable[..., QMPServer], raw) -> None:
    server = make_server(registry(), max_clients=4)
    clients = [raw(server.address) for _ in range(4)]
    for c in clients:
        c.greet_and_negotiate()
    extra = raw(server.address)
    refused = extra.recv()
    assert "too many QMP clients (limit 4)" in refused["error"]["desc"]
    extra.expect_eof()
    for i, c in enumerate(clients):
        c.send({"execute": "echo", "arguments": {"text": f"c{i}"}})
    assert [c.recv()["return"] for c in clients] == ["c0", "c1", "c2", "c3"]
    clients[0].close()
    deadline = time.monotonic() + 5
    while server.client_count > 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    raw(server.address).greet_and_negotiate()  # a slot is free again


def test_events_only_after_negotiation(make_server: Callable[..., QMPServer], raw) -> None:
    server = make_server(registry())
    early = raw(server.address)
    early.recv()  # greeting only
    ready = raw(server.address)
    ready.greet_and_negotiate()
    server.emit_event("RESUME")
    assert ready.recv()["event"] == "RESUME"
    early.send({"execute": "qmp_capabilities"})
    assert early.recv() == {"return": {}}  # no RESUME queued before it


def test_events_held_go_out_in_order_at_the_end(make_server: Callable[..., QMPServer], raw) -> None:
    """What a migration's downtime does (QEMU's BQL holds the monitor the same way): events
    raised inside ``events_held`` wait for its end, keep their order and the time they were
    raised, while replies go on; nested holds end with the outermost."""
    server = make_server(registry())
    c = raw(server.address)
    c.greet_and_negotiate()
    with server.events_held():
        server.emit_event("STOP")
        with server.events_held():
            server.emit_event("MIGRATION", {"status": "device"})
        raised = time.time()
        time.sleep(0.05)
        server.emit_event("MIGRATION_PASS", {"pass": 3})
        c.send({"execute": "echo", "arguments": {"text": "meanwhile"}})
        assert c.recv() == {"return": "meanwhile"}  # no event came before the reply
        released = time.time()
    got = [c.recv() for _ in range(3)]
    assert [m["event"] for m in got] == ["STOP", "MIGRATION", "MIGRATION_PASS"]
    assert got[1]["data"] == {"status": "device"}
    stamps = [m["timestamp"]["seconds"] + m["timestamp"]["microseconds"] / 1e6 for m in got]
    assert stamps[0] <= stamps[1] <= raised < stamps[2] <= released
    server.emit_event("RESUME")  # not held any more
    assert c.recv()["event"] == "RESUME"


def test_vanishing_clients_do_not_hurt_others(make_server: Callable[..., QMPServer], raw) -> None:
    release = threading.Event()
    reg = registry()
    reg.add("slow", lambda: release.wait(5))
    server = make_server(reg)
    good = raw(server.address)
    good.greet_and_negotiate()
    # Vanishes mid-message.
    a = raw(server.address)
    a.greet_and_negotiate()
    a.send(b'{"execute": "echo", "argum')
    a.close()
    # Vanishes with a command running and more queued.
    b = raw(server.address)
    b.greet_and_negotiate()
    b.send(b'{"execute": "slow"}' + b'{"execute": "nothing"}' * 20)
    time.sleep(0.1)
    b.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    b.close()  # RST
    release.set()
    server.emit_event("STOP")
    assert good.recv()["event"] == "STOP"
    good.send({"execute": "echo", "arguments": {"text": "ok"}})
    assert good.recv_reply() == {"return": "ok"}


def test_client_that_never_reads_is_dropped(make_server: Callable[..., QMPServer], raw) -> None:
    server = make_server(registry())
    lazy = raw(server.address)
    lazy.greet_and_negotiate()
    lazy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    good = raw(server.address)
    good.greet_and_negotiate()
    payload = {"blob": "e" * 65536}
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.extend(good.recv()["event"] for _ in range(200)))
    reader.start()
    start = time.monotonic()
    for i in range(200):  # ~13 MiB, past OUTPUT_LIMIT for the lazy client
        server.emit_event("BIG", payload)
        if i % 10 == 9:
            time.sleep(0.01)  # let the reading client keep up; the lazy one never does
    reader.join(10)
    assert got == ["BIG"] * 200
    assert time.monotonic() - start < 10
    deadline = time.monotonic() + 5
    while server.client_count > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.client_count == 1


def test_unix_socket_mode_and_cleanup(make_server: Callable[..., QMPServer], sockdir) -> None:
    path = sockdir / "mode.sock"
    path.write_bytes(b"")
    os.unlink(path)
    # A stale socket from an earlier run is replaced, as QEMU does.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    server = make_server(registry(), address=f"unix:{path}")
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    server.close()
    assert not path.exists()
    server.close()  # idempotent


def test_socket_file_accepts_as_soon_as_it_exists(sockdir, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that connects the moment the socket file appears (as the benchmarks and
    libvirt wait for it) is queued, not refused, however late the event loop starts serving."""
    path = sockdir / "early.sock"
    server = QMPServer(f"unix:{path}", registry())
    serve = QMPServer._serve

    async def late(self: QMPServer, sock: socket.socket, started) -> None:  # type: ignore[no-untyped-def]
        import asyncio

        await asyncio.sleep(0.3)  # a loaded host between bind() and the loop's first turn
        await serve(self, sock, started)

    monkeypatch.setattr(QMPServer, "_serve", late)
    starter = threading.Thread(target=server.start)
    starter.start()
    try:
        deadline = time.monotonic() + 5
        while not path.exists():
            assert time.monotonic() < deadline
            time.sleep(0.001)
        c = socket.socket(socket.AF_UNIX)
        c.settimeout(5)
        c.connect(str(path))  # refused (ECONNREFUSED) before the fix
        assert c.recv(4096).startswith(b'{"QMP": ')
        c.close()
    finally:
        starter.join(10)
        server.close()


def test_refuses_to_replace_a_regular_file(sockdir) -> None:
    path = sockdir / "file"
    path.write_text("keep me")
    server = QMPServer(f"unix:{path}", registry())
    with pytest.raises(UsageError, match="not a socket"):
        server.start()
    assert path.read_text() == "keep me"


def test_tcp_address_in_use(make_server: Callable[..., QMPServer]) -> None:
    first = make_server(registry(), address="tcp:127.0.0.1:0")
    with pytest.raises(UsageError, match=r"cannot listen for QMP on tcp:127\.0\.0\.1"):
        QMPServer(first.address, registry()).start()


@pytest.mark.parametrize(
    ("uri", "parsed"),
    [
        ("unix:/tmp/a.sock", ("unix", "/tmp/a.sock")),
        ("tcp:127.0.0.1:4444", ("tcp", ("127.0.0.1", 4444))),
        ("tcp:[::1]:0", ("tcp", ("::1", 0))),
        ("tcp::5", ("tcp", ("127.0.0.1", 5))),
    ],
)
def test_parse_address(uri: str, parsed: tuple) -> None:
    assert parse_qmp_address(uri) == parsed


@pytest.mark.parametrize("uri", ["", "unix:", "tcp:host", "tcp:h:port", "tcp:h:99999", "udp:x:1"])
def test_parse_address_errors(uri: str) -> None:
    with pytest.raises(UsageError, match="QMP address"):
        parse_qmp_address(uri)


def test_close_with_connected_clients(make_server: Callable[..., QMPServer], raw) -> None:
    server = make_server(registry())
    c = raw(server.address)
    c.greet_and_negotiate()
    server.emit_event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
    server.close()
    assert c.recv()["event"] == "SHUTDOWN"  # queued output is flushed before closing
    c.expect_eof()
    server.emit_event("STOP")  # after close: dropped, no error
