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
