"""TLS channels: mutual authentication, refusal before data, tamper and truncation detection."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from livemig.errors import UsageError
from livemig.transport import ChannelError, Listener, connect
from livemig.transport.tls import TLSChannel, load_creds

TIMEOUT = 10.0


def _serve(listener: Listener, out: dict, read: int = 0) -> threading.Thread:
    def run() -> None:
        try:
            ch = listener.accept(timeout=TIMEOUT)
            out["channel"] = ch
            if read:
                out["data"] = ch.recv_exact(read)
        except Exception as exc:  # reported to the test thread
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_mutual_tls_roundtrip_tcp(creds: dict[str, Path]) -> None:
    server = load_creds(creds["good"], "server")
    client = load_creds(creds["good"], "client")
    payload = os.urandom(3 << 20)
    with Listener("tcp:127.0.0.1:0", timeout=TIMEOUT, tls=server) as lst:
        out: dict = {}
        t = _serve(lst, out, read=len(payload) + 5)
        ch = connect(lst.address, timeout=TIMEOUT, tls=client)
        assert isinstance(ch, TLSChannel)
        # header-sized buffers and big page-sized ones, as the encoder emits them
        ch.sendv([b"\x00\x01", memoryview(payload)[:4096], b"abc", memoryview(payload)[4096:]])
        t.join(TIMEOUT)
        assert "error" not in out, out.get("error")
        assert out["data"] == b"\x00\x01" + payload[:4096] + b"abc" + payload[4096:]
        # the other direction (the return path) on the same connection
        out["channel"].send(b"SHUT")
        assert ch.recv_exact(4) == b"SHUT"
        ch.close_write()
        buf = memoryview(bytearray(16))
        assert out["channel"].recv_into(buf) == 0  # clean, authenticated end of stream
        ch.close()
        out["channel"].close()


def test_unix_socket_tls_and_mode(creds: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "mig.sock"
    with Listener(f"unix:{path}", tls=load_creds(creds["good"], "server")) as lst:
        assert (os.stat(path).st_mode & 0o777) == 0o600
        out: dict = {}
        t = _serve(lst, out, read=5)
        ch = connect(f"unix:{path}", timeout=TIMEOUT, tls=load_creds(creds["good"], "client"))
        ch.send(b"hello")
        t.join(TIMEOUT)
        assert out.get("data") == b"hello"
        ch.close()
        out["channel"].close()


@pytest.mark.parametrize(
    ("server_dir", "client_dir", "who"),
    [("good", "rogue", "client"), ("rogue", "good", "server"), ("good", "wrongname", "name")],
)
def test_invalid_peer_refused_before_data(
    creds: dict[str, Path], server_dir: str, client_dir: str, who: str
) -> None:
    server = load_creds(creds[server_dir], "server")
    client = load_creds(creds[client_dir], "client")
    if who == "name":
        # the server presents a certificate for another host: the client refuses it
        server = load_creds(creds["wrongname"], "server")
        client = load_creds(creds["good"], "client")
    with Listener("tcp:127.0.0.1:0", timeout=TIMEOUT, tls=server) as lst:
        out: dict = {}
        t = _serve(lst, out, read=1)
        with pytest.raises(ChannelError, match="TLS"):
            ch = connect(lst.address, timeout=TIMEOUT, tls=client)
            # TLS 1.3: the server's verdict on our certificate arrives after our handshake
            ch.send(b"x" * 100)
            ch.recv_exact(1)
        t.join(TIMEOUT)
        assert "data" not in out
        assert isinstance(out.get("error"), ChannelError)
        assert "TLS" in str(out["error"])


def test_plain_client_refused_by_tls_listener(creds: dict[str, Path]) -> None:
    with Listener(
        "tcp:127.0.0.1:0", timeout=TIMEOUT, tls=load_creds(creds["good"], "server")
    ) as lst:
        out: dict = {}
        t = _serve(lst, out, read=1)
        ch = connect(lst.address, timeout=TIMEOUT, tls=None)
        try:
            ch.send(b"QEVM\x00\x00\x00\x03" + bytes(64))
        except ChannelError:
            pass
        t.join(TIMEOUT)
        ch.close()
        assert "data" not in out and isinstance(out.get("error"), ChannelError)


def test_tls_client_to_plain_listener_fails(creds: dict[str, Path]) -> None:
    with Listener("tcp:127.0.0.1:0", timeout=TIMEOUT, tls=None) as lst:
        out: dict = {}

        def plain_server() -> None:
            # a plain destination reads the ClientHello as a bad stream magic and hangs up
            ch = lst.accept(timeout=TIMEOUT)
            out["data"] = ch.recv_into(memoryview(bytearray(4)))
            ch.close()

        t = threading.Thread(target=plain_server, daemon=True)
        t.start()
        with pytest.raises(ChannelError, match="TLS"):
            connect(lst.address, timeout=TIMEOUT, tls=load_creds(creds["good"], "client"))
        t.join(TIMEOUT)


def test_tls_refused_on_exec_and_file(creds: dict[str, Path], tmp_path: Path) -> None:
    client = load_creds(creds["good"], "client")
    with pytest.raises(UsageError, match="in clear"):
        connect(f"file:{tmp_path / 'x'}", tls=client)
    with pytest.raises(UsageError, match="in clear"):
        connect("exec:cat >/dev/null", tls=client)
    assert not (tmp_path / "x").exists()


def test_missing_credentials_named(tmp_path: Path, creds: dict[str, Path]) -> None:
    with pytest.raises(UsageError, match="is not a directory"):
        load_creds(tmp_path / "nope", "client")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "ca-cert.pem").write_bytes((creds["good"] / "ca-cert.pem").read_bytes())
    with pytest.raises(UsageError, match=r"client-cert\.pem is missing"):
        load_creds(partial, "client")


def test_page_gather_goes_through_tls(creds: dict[str, Path]) -> None:
    """Pre-copy hands the channel address rows (PageGather); TLS must encrypt the same bytes."""
    import numpy as np

    from livemig.wire.encoder import Encoder

    ram = memoryview(bytearray(os.urandom(32 * 4096)))
    offsets = np.arange(0, 32, 3, dtype=np.uint64) * 4096
    bufs = Encoder().encode_pages_gather("pc.ram", offsets, ram)
    want = b"".join(bytes(b) for b in Encoder().encode_pages("pc.ram", offsets, ram))
    with Listener("tcp:127.0.0.1:0", timeout=TIMEOUT,
                  tls=load_creds(creds["good"], "server")) as lst:  # fmt: skip
        out: dict = {}
        t = _serve(lst, out, read=len(want))
        ch = connect(lst.address, timeout=TIMEOUT, tls=load_creds(creds["good"], "client"))
        assert ch.sendv(bufs) == len(want)
        t.join(TIMEOUT)
        assert "error" not in out, out.get("error")
        assert out["data"] == want
        ch.close()
        out["channel"].close()
