"""Migration URIs: every scheme QEMU accepts, and clear refusals."""

import socket

import pytest

from livemig.errors import UsageError
from livemig.transport import ChannelError, Listener, connect, parse_uri


@pytest.mark.parametrize(
    ("text", "fields"),
    [
        ("tcp:127.0.0.1:4444", {"scheme": "tcp", "host": "127.0.0.1", "port": 4444}),
        ("tcp:0:4444", {"host": "0.0.0.0", "port": 4444}),
        ("tcp:[::1]:5", {"host": "::1", "port": 5}),
        ("tcp::4444", {"host": "", "port": 4444}),
        ("unix:/tmp/x.sock", {"scheme": "unix", "path": "/tmp/x.sock"}),
        ("fd:7", {"scheme": "fd", "fd": 7}),
        ("exec:gzip -c > /tmp/f", {"scheme": "exec", "command": "gzip -c > /tmp/f"}),
        ("file:/tmp/snap", {"scheme": "file", "path": "/tmp/snap", "offset": 0}),
        ("file:/tmp/snap,offset=4096", {"offset": 4096}),
    ],
)
def test_parse(text: str, fields: dict) -> None:
    uri = parse_uri(text)
    for key, value in fields.items():
        assert getattr(uri, key) == value
    assert parse_uri(str(uri)) == uri


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "invalid migration URI"),
        ("http://x", "unknown scheme 'http'"),
        ("tcp:host", "tcp:HOST:PORT"),
        ("tcp:host:99999", "out of range"),
        ("unix:", "unix:PATH"),
        ("fd:abc", "fd:N"),
        ("exec:  ", "exec:COMMAND"),
        ("file:/x,size=3", "offset=N"),
    ],
)
def test_refused(text: str, words: str) -> None:
    with pytest.raises(UsageError, match=words) as info:
        parse_uri(text)
    assert repr(text) in str(info.value)


def test_return_path_capability() -> None:
    assert parse_uri("tcp:1.2.3.4:5").has_return_path
    assert not parse_uri("exec:cat").has_return_path
    assert not parse_uri("file:/x").has_return_path


# -- tcp::PORT, an empty host, as QEMU 10.0 takes it ----------------------------------------


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_empty_host_listens_on_every_address() -> None:
    """QEMU 10.0's ``migrate-incoming tcp::PORT`` listens on :: and 0.0.0.0 and lists both in
    query-migrate's socket-address; livemig bound 0.0.0.0 only (no IPv6 peer could come)."""
    with Listener("tcp::0") as lst:
        port = int(lst.address.rsplit(":", 1)[1])
        assert lst.address == f"tcp::{port}"
        addrs = lst.socket_addresses()
        hosts = [a["host"] for a in addrs]
        assert all(a["port"] == str(port) and a["type"] == "inet" for a in addrs)
        peers = ["127.0.0.1"]
        if _has_ipv6():
            assert hosts == ["::", "0.0.0.0"]
            assert addrs[0]["ipv6"] is True and addrs[1]["ipv4"] is True
            peers.append("::1")
        else:
            assert hosts == ["0.0.0.0"]
        for peer in peers:
            src = connect(f"tcp:{'[::1]' if peer == '::1' else peer}:{port}", timeout=5)
            dst = lst.accept(timeout=5)
            src.send(b"x")
            assert dst.recv_exact(1) == b"x"
            src.close()
            dst.close()


@pytest.mark.parametrize("cancellable", [False, True])
def test_empty_host_does_not_connect(cancellable: bool) -> None:
    """QEMU 10.0 cannot resolve ``tcp::PORT`` to connect to: "address resolution failed for
    :PORT: Name or service not known". livemig took it as 0.0.0.0 and connected to whatever
    listened on this host's port (here: a listener on every address, which it reached)."""
    with Listener("tcp::0") as lst:
        port = int(lst.address.rsplit(":", 1)[1])
        kw = {"cancelled": lambda: False} if cancellable else {}
        with pytest.raises(ChannelError) as info:
            connect(f"tcp::{port}", timeout=2, **kw)
        assert str(info.value) == (
            f"address resolution failed for :{port}: Name or service not known"
        )
        assert not lst.pending()


def test_listener_addresses_of_a_named_host_are_numeric() -> None:
    with Listener("tcp:localhost:0") as lst:
        (addr,) = lst.socket_addresses()
        assert addr["host"] in ("127.0.0.1", "::1")


# -- a port given as a service name, as QEMU 10.0 takes it ----------------------------------


def _free_service() -> tuple[str, int]:
    """A tcp service of /etc/services whose port nothing on this host listens on."""
    for name in ("postgresql", "mysql", "x11", "http-alt", "webcache", "ircd", "gopher"):
        try:
            port = socket.getservbyname(name, "tcp")
        except OSError:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return name, port
    pytest.skip("no free port of a known service name on this host")


def test_service_name_is_kept_as_written() -> None:
    uri = parse_uri("tcp:127.0.0.1:ssh")
    assert (uri.host, uri.service, uri.port_spec) == ("127.0.0.1", "ssh", "ssh")
    assert str(uri) == "tcp:127.0.0.1:ssh"
    assert parse_uri(str(uri)) == uri
    assert parse_uri("tcp:127.0.0.1:22").port_spec == 22


@pytest.mark.parametrize("cancellable", [False, True])
def test_service_name_port_listens_and_connects(cancellable: bool) -> None:
    """QEMU 10.0 hands the port to getaddrinfo, so ``tcp:127.0.0.1:ssh`` means port 22, on
    ``migrate`` and ``migrate-incoming`` alike (socket-address lists it as "22"); livemig
    refused it: "error parsing address '127.0.0.1:ssh'"."""
    name, port = _free_service()
    with Listener(f"tcp:127.0.0.1:{name}") as lst:
        assert lst.socket_addresses() == [
            {"port": str(port), "ipv4": True, "host": "127.0.0.1", "type": "inet"}
        ]
        kw = {"cancelled": lambda: False} if cancellable else {}
        src = connect(f"tcp:127.0.0.1:{name}", timeout=5, **kw)
        dst = lst.accept(timeout=5)
        src.send(b"x")
        assert dst.recv_exact(1) == b"x"
        src.close()
        dst.close()


@pytest.mark.parametrize("port", ["nosuchservice", "-1", "0x16"])
def test_unknown_service_name_fails_as_qemus_does(port: str) -> None:
    """QEMU 10.0's words for a port getaddrinfo does not know, when listening (the
    migrate-incoming reply) and when connecting (the failed migration's error-desc)."""
    words = (
        f"address resolution failed for 127.0.0.1:{port}: Servname not supported for ai_socktype"
    )
    with pytest.raises(ChannelError) as info:
        Listener(f"tcp:127.0.0.1:{port}")
    assert str(info.value) == words
    with pytest.raises(ChannelError) as info:
        connect(f"tcp:127.0.0.1:{port}", timeout=2)
    assert str(info.value) == words


def test_listen_on_a_host_that_does_not_resolve() -> None:
    """QEMU 10.0: "address resolution failed for nosuch.invalid:1: Name or service not known"
    in migrate-incoming's reply (livemig said "cannot listen on tcp:nosuch.invalid:1: ...")."""
    with pytest.raises(ChannelError) as info:
        Listener("tcp:nosuch.invalid:1")
    assert str(info.value).startswith("address resolution failed for nosuch.invalid:1: ")
