"""TLS for migration channels and QMP: x509 credentials, mutual authentication, ``TLSChannel``.

Theory of operation (QEMU: ``tls-creds-x509`` objects, ``migration/tls.c``): a credentials
directory holds ``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``, ``client-cert.pem`` and
``client-key.pem`` exactly as QEMU's ``-object tls-creds-x509,dir=...`` expects. The side that
listens (the destination, a QMP server) is the TLS server, the side that connects (the source)
the TLS client; each must present a certificate signed by the CA, and each checks the other's
(``verify-peer=on``, QEMU's default): a peer without a valid certificate is refused during the
handshake, before the first byte of the migration stream is sent or read. The client checks
the server's name against ``tls-hostname`` or, when that is empty, the host of a ``tcp:`` URI.

``TLSChannel`` is a ``Channel`` with the same interface (time-outs, ``shutdown()`` from any
thread, ``sendv``/``recv_into``) over a non-blocking ``ssl.SSLSocket``. OpenSSL forbids two
threads inside one SSL object at once, but the source reads its return path while it writes
pages: every SSL call is made under a lock and never blocks (waits happen in ``poll`` outside
the lock). TLS authenticates every record, so a byte changed in transit fails the next read with
an ``SSLError`` (``bad record mac``); a stream cut without ``close_notify`` is reported as
truncated, never as a clean end.

The process-wide settings (``set_migration_tls``) mirror QEMU, where the migration code reads
the one ``MigrationState``'s ``tls-creds``: ``connect`` and ``Listener`` wrap every socket they
open (main, multifd, post-copy preempt, recovery) with the current settings unless given
``tls=`` explicitly.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from livemig import iovec
from livemig.errors import UsageError
from livemig.transport.channel import (
    DEFAULT_TIMEOUT,
    Buffer,
    Channel,
    ChannelClosed,
    ChannelError,
    ChannelTimeout,
)

CRED_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem",
              "client-cert.pem", "client-key.pem")  # fmt: skip
# Small buffers (headers) are gathered so a batch of page records is not one TLS record per
# 8-byte header; pages themselves go to SSL_write as the memoryview slices they are.
COALESCE = 16384


@dataclass(frozen=True)
class TLSCreds:
    """Loaded x509 credentials for one endpoint (``"client"`` or ``"server"``)."""

    directory: str
    endpoint: str
    context: ssl.SSLContext
    hostname: str = ""  # client: the name the server's certificate must carry ("" = URI host)

    def describe(self) -> str:
        return f"tls-creds-x509 dir={self.directory} endpoint={self.endpoint}"


def load_creds(directory: str | os.PathLike[str], endpoint: str, hostname: str = "") -> TLSCreds:
    """Load a QEMU-style credentials directory for ``endpoint`` (mutual authentication).

    Raises ``UsageError`` naming the missing or unreadable file.
    """
    if endpoint not in ("client", "server"):
        raise UsageError(f"TLS endpoint must be 'client' or 'server', not {endpoint!r}")
    d = Path(directory)
    if not d.is_dir():
        raise UsageError(f"tls-creds: {d} is not a directory")
    ca = d / "ca-cert.pem"
    cert, key = d / f"{endpoint}-cert.pem", d / f"{endpoint}-key.pem"
    for f in (ca, cert, key):
        if not f.is_file():
            raise UsageError(f"tls-creds: {f} is missing (a tls-creds-x509 dir needs "
                             f"{', '.join(CRED_FILES)})")  # fmt: skip
    proto = ssl.PROTOCOL_TLS_SERVER if endpoint == "server" else ssl.PROTOCOL_TLS_CLIENT
    ctx = ssl.SSLContext(proto)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
        ctx.load_verify_locations(cafile=str(ca))
    except (ssl.SSLError, OSError) as exc:
        raise UsageError(f"tls-creds: cannot load {d}: {exc}") from exc
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual: the server asks for the client's certificate
    if endpoint == "client":
        ctx.check_hostname = False  # checked in client_wrap with the URI host or tls-hostname
    return TLSCreds(str(d), endpoint, ctx, hostname)


# -- process-wide settings (QEMU: migrate_tls_creds() of the one MigrationState) ---------------

_settings: dict[str, TLSCreds | None] = {"client": None, "server": None}
_settings_lock = threading.Lock()


def set_migration_tls(endpoint: str, creds: TLSCreds | None) -> None:
    """Set (or clear, with None) the credentials every new migration channel of ``endpoint``
    uses: the manager calls this at ``migrate`` (client) and ``migrate-incoming`` (server)."""
    with _settings_lock:
        _settings[endpoint] = creds


def migration_tls(endpoint: str) -> TLSCreds | None:
    with _settings_lock:
        return _settings[endpoint]


def creds_from_params(params: dict[str, object], endpoint: str) -> TLSCreds | None:
    """``tls-creds`` / ``tls-hostname`` migration parameters to credentials (None: no TLS)."""
    d = params.get("tls-creds") or ""
    if not d:
        return None
    return load_creds(str(d), endpoint, str(params.get("tls-hostname") or ""))


# -- the channel -----------------------------------------------------------------------------------


class TLSChannel(Channel):
    """A ``Channel`` over TLS: same time-outs, ``shutdown()`` and buffer interface."""

    def __init__(
        self, name: str, ssock: ssl.SSLSocket, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        # The base class gets no ``sock``: code that peeks at a plain socket (multifd's
        # MSG_PEEK) must not touch the TLS socket underneath; ``is_socket`` stays true.
        super().__init__(name, ssock.fileno(), ssock.fileno(), timeout=timeout)
        self._ssock: ssl.SSLSocket | None = ssock
        self._sslfd = ssock.fileno()
        self._ssl_lock = threading.Lock()
        self.peer_certificate = ssock.getpeercert()

    @property
    def is_socket(self) -> bool:
        return True

    def _call(self, op: str, buf: memoryview) -> tuple[int, int]:
        """One non-blocking SSL ``op`` (recv_into/send): (bytes, 0) or (0, poll events)."""
        with self._ssl_lock:
            if self._closed.is_set() or self._ssock is None:
                raise ChannelClosed(f"{self.name}: channel shut down")
            try:
                return int(getattr(self._ssock, op)(buf)), 0
            except ssl.SSLWantReadError:
                return 0, select.POLLIN
            except ssl.SSLWantWriteError:
                return 0, select.POLLOUT

    def _ssl_error(self, what: str, exc: Exception) -> ChannelError:
        if self._closed.is_set():
            return ChannelClosed(f"{self.name}: channel shut down")
        if what == "writing" and isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError |
                                            BrokenPipeError | ConnectionResetError):  # fmt: skip
            # A peer that refused our certificate (TLS 1.3: after our half of the handshake)
            # sent an alert before closing; a write only sees the close, a read sees why.
            refused = self._pending_alert()
            if refused is not None:
                return ChannelError(f"{self.name}: {refused}")
        if isinstance(exc, ssl.SSLEOFError):
            return ChannelError(f"{self.name}: TLS stream truncated (peer closed the connection "
                                f"without close_notify) while {what}")  # fmt: skip
        if isinstance(exc, ssl.SSLError):
            refused = _refusal(exc)
            if refused is not None:
                return ChannelError(f"{self.name}: {refused}")
            return ChannelError(f"{self.name}: TLS error while {what}: {exc.reason or exc} "
                                f"(the stream was corrupted or tampered with)")  # fmt: skip
        if isinstance(exc, OSError):
            return self._error(what, exc)
        return ChannelError(f"{self.name}: {what} failed: {exc}")

    def _pending_alert(self) -> str | None:
        """The refusal an alert waiting in the receive buffer says, if one does."""
        with self._ssl_lock:
            if self._ssock is None:
                return None
            try:
                self._ssock.recv(1)
            except ssl.SSLError as exc:
                return _refusal(exc)
            except OSError:
                return None
        return None

    def recv_into(self, buf: memoryview, *, hold_gil: bool = False) -> int:
        # hold_gil is ignored: every byte goes through the TLS layer, which releases the lock
        if not len(buf):
            return 0
        while True:
            try:
                n, want = self._call("recv_into", buf)
            except ChannelError:
                raise
            except (ssl.SSLError, OSError) as exc:
                raise self._ssl_error("reading", exc) from exc
            if want:
                self._wait(self._sslfd, want, "reading")
                continue
            self.bytes_received += n
            return n

    def recv_into_many(self, bufs: Sequence[memoryview]) -> int:
        # TLS decrypts record by record: the first buffer, then the caller asks again
        return self.recv_into(bufs[0])

    def recv(self, n: int) -> bytes:
        # the base class reads the raw socket; here every byte goes through the TLS layer
        buf = bytearray(n)
        got = self.recv_into(memoryview(buf))
        return bytes(memoryview(buf)[:got])

    def sendv(self, buffers: Sequence[Buffer], *, hold_gil: bool = False) -> int:
        total = 0
        pending = bytearray()
        # every byte goes through the TLS layer: address lists become buffer objects again
        flat = [x for b in buffers
                for x in (b.buffers() if isinstance(b, iovec.Gather) else (b,))]  # fmt: skip
        for b in flat:
            v = memoryview(b).cast("B")
            if not len(v):
                continue
            if len(v) < COALESCE:
                pending += v
                if len(pending) >= COALESCE:
                    total += self._send_all(memoryview(pending))
                    pending = bytearray()
                continue
            if pending:
                total += self._send_all(memoryview(pending))
                pending = bytearray()
            total += self._send_all(v)
        if pending:
            total += self._send_all(memoryview(pending))
        self.bytes_sent += total
        return total

    def _send_all(self, view: memoryview) -> int:
        sent = 0
        while sent < len(view):
            # after SSLWantWrite OpenSSL wants the same bytes again: retry the same slice
            chunk = view[sent : sent + (1 << 20)]
            try:
                n, want = self._call("send", chunk)
            except ChannelError:
                raise
            except (ssl.SSLError, OSError) as exc:
                raise self._ssl_error("writing", exc) from exc
            if want:
                self._wait(self._sslfd, want, "writing")
                continue
            sent += n
        return sent

    def shutdown(self) -> None:
        if not self._mark_closed():
            return
        # socket.shutdown on the SSLSocket itself would drop its SSL object while another
        # thread may be about to read: shut the TCP connection underneath instead.
        if self._ssock is not None:
            try:
                socket.socket.shutdown(self._ssock, socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self, wait_process: float = 10.0) -> None:
        self.shutdown()
        with self._ssl_lock:
            if self._ssock is not None:
                try:
                    self._ssock.close()
                except OSError:
                    pass
                self._ssock = None
        super().close(wait_process)

    def close_write(self) -> None:
        """Send TLS close_notify, then half-close: the peer sees a clean, authenticated end."""
        if self._ssock is None:
            return
        with self._ssl_lock:
            try:
                self._ssock._sslobj.shutdown()  # type: ignore[union-attr]
            except (ssl.SSLError, OSError, AttributeError):
                pass  # close_notify is out; the peer's answer is not awaited
        try:
            socket.socket.shutdown(self._ssock, socket.SHUT_WR)
        except OSError:
            pass


def _handshake(ssock: ssl.SSLSocket, name: str, timeout: float | None) -> None:
    deadline = None if timeout is None else _now() + timeout
    while True:
        try:
            ssock.do_handshake()
            return
        except ssl.SSLWantReadError:
            events = select.POLLIN
        except ssl.SSLWantWriteError:
            events = select.POLLOUT
        except ssl.SSLCertVerificationError as exc:
            raise ChannelError(f"{name}: TLS handshake refused: the peer's certificate is not "
                               f"valid: {exc.verify_message or exc.reason}") from exc  # fmt: skip
        except ssl.SSLError as exc:
            refused = _refusal(exc)
            if refused is not None:
                raise ChannelError(f"{name}: {refused}") from exc
            if exc.reason == "WRONG_VERSION_NUMBER":
                raise ChannelError(f"{name}: TLS handshake failed: the peer does not speak TLS "
                                   "(no tls-creds there?)") from exc  # fmt: skip
            raise ChannelError(f"{name}: TLS handshake failed: {exc.reason or exc}") from exc
        except OSError as exc:
            raise ChannelError(f"{name}: TLS handshake failed: {exc.strerror or exc} "
                               f"(the peer refused our certificate or closed)") from exc  # fmt: skip
        left = None if deadline is None else deadline - _now()
        if left is not None and left <= 0:
            raise ChannelTimeout(f"{name}: TLS handshake did not finish within {timeout:g} s")
        p = select.poll()
        p.register(ssock.fileno(), events)
        p.poll(None if left is None else max(1, int(left * 1000)))


# The alerts a TLS peer sends when it will not accept our certificate (OpenSSL's reasons).
_CERT_ALERTS = ("BAD_CERTIFICATE", "CERTIFICATE_REQUIRED", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN",
                "CERTIFICATE_EXPIRED", "CERTIFICATE_REVOKED", "UNSUPPORTED_CERTIFICATE",
                "ACCESS_DENIED", "DECRYPT_ERROR")  # fmt: skip


def _refusal(exc: ssl.SSLError) -> str | None:
    """The message for an alert by which the peer refused us (TLS 1.3 sends it after our side
    of the handshake already completed: it shows on the first read or write)."""
    reason = str(exc.reason or "")
    if "ALERT" not in reason:
        return None
    if any(a in reason for a in _CERT_ALERTS):
        return (
            f"the peer refused this side's TLS certificate (alert {reason}): it was not "
            "issued by a CA the peer trusts, or does not fit its settings"
        )
    return f"the peer ended the TLS session with alert {reason}"


def _now() -> float:
    import time

    return time.monotonic()


def client_wrap(
    sock: socket.socket,
    creds: TLSCreds,
    name: str,
    timeout: float | None = DEFAULT_TIMEOUT,
    host: str = "",
) -> TLSChannel:
    """TLS client side over a connected socket: handshake, verify the server, a channel.

    On any failure the socket is closed and ``ChannelError`` raised: nothing was sent.
    """
    if creds.endpoint != "client":
        sock.close()
        raise UsageError(f"{creds.describe()}: a connecting side needs endpoint=client")
    expect = creds.hostname or host
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        ssock = creds.context.wrap_socket(
            sock, server_side=False, do_handshake_on_connect=False,
            suppress_ragged_eofs=False, server_hostname=expect or None,
        )  # fmt: skip
    except (ssl.SSLError, OSError, ValueError) as exc:
        sock.close()
        raise ChannelError(f"{name}: cannot start TLS: {exc}") from exc
    try:
        _handshake(ssock, name, timeout)
        if expect:
            _check_name(ssock, expect, name)
    except BaseException:
        ssock.close()
        raise
    return TLSChannel(name, ssock, timeout)


def server_wrap(
    sock: socket.socket,
    creds: TLSCreds,
    name: str,
    timeout: float | None = DEFAULT_TIMEOUT,
    handshake_timeout: float | None = None,
) -> TLSChannel:
    """TLS server side over an accepted socket: handshake (within ``handshake_timeout``, else
    ``timeout``), require a valid client certificate."""
    if creds.endpoint != "server":
        sock.close()
        raise UsageError(f"{creds.describe()}: a listening side needs endpoint=server")
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        ssock = creds.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False,
                                          suppress_ragged_eofs=False)  # fmt: skip
    except (ssl.SSLError, OSError, ValueError) as exc:
        sock.close()
        raise ChannelError(f"{name}: cannot start TLS: {exc}") from exc
    try:
        _handshake(ssock, name, timeout if handshake_timeout is None else handshake_timeout)
        if not ssock.getpeercert():
            raise ChannelError(f"{name}: TLS peer presented no certificate")
    except BaseException:
        ssock.close()
        raise
    return TLSChannel(name, ssock, timeout)


def _check_name(ssock: ssl.SSLSocket, expect: str, name: str) -> None:
    """The server certificate must name ``expect`` (a DNS name or an IP address SAN)."""
    import ipaddress

    cert = ssock.getpeercert() or {}
    sans = [(k, v) for k, v in cert.get("subjectAltName", ())]
    try:
        ip = ipaddress.ip_address(expect)
    except ValueError:
        ip = None
    for kind, value in sans:
        if ip is not None and kind == "IP Address":
            try:
                if ipaddress.ip_address(value.strip()) == ip:
                    return
            except ValueError:
                continue
        elif ip is None and kind == "DNS" and _dns_match(value, expect):
            return
    raise ChannelError(f"{name}: TLS server certificate does not match host {expect!r} "
                       f"(its names: {', '.join(v for _, v in sans) or 'none'})")  # fmt: skip


def _dns_match(pattern: str, host: str) -> bool:
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        return "." in host and host.split(".", 1)[1] == pattern[2:]
    return pattern == host


# -- credentials for tests and demos ---------------------------------------------------------


def generate_creds(
    directory: str | os.PathLike[str],
    *,
    names: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
    ca_dir: str | os.PathLike[str] | None = None,
    days: int = 30,
) -> Path:
    """Write a tls-creds-x509 directory with ``openssl``: a CA (or reuse ``ca_dir``'s CA key
    and certificate), and server and client certificates for ``names`` signed by it.

    With ``ca_dir`` pointing at another directory's CA, the result is valid for peers trusting
    that CA; without it, a fresh CA that nobody else trusts (the "wrong certificate" case).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        try:
            subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)
        except FileNotFoundError as exc:
            raise UsageError(
                "generate_creds needs the openssl command (apt package openssl)"
            ) from exc
        except subprocess.CalledProcessError as exc:
            raise UsageError(
                f"openssl {args[0]} failed: {exc.stderr.decode(errors='replace')}"
            ) from exc

    if ca_dir is None:
        run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(d / "ca-key.pem"), "-out", str(d / "ca-cert.pem"),
            "-days", str(days), "-subj", "/CN=livemig test CA")  # fmt: skip
        ca_key, ca_cert = d / "ca-key.pem", d / "ca-cert.pem"
    else:
        ca_key, ca_cert = Path(ca_dir) / "ca-key.pem", Path(ca_dir) / "ca-cert.pem"
        (d / "ca-cert.pem").write_bytes(ca_cert.read_bytes())
    san = ",".join((f"IP:{n}" if _is_ip(n) else f"DNS:{n}") for n in names)
    ext = d / "ext.cnf"
    for role in ("server", "client"):
        usage = "serverAuth" if role == "server" else "clientAuth"
        ext.write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\n"
                       "basicConstraints=CA:FALSE\n")  # fmt: skip
        key, csr, cert = d / f"{role}-key.pem", d / f"{role}.csr", d / f"{role}-cert.pem"
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-subj", f"/CN=livemig {role}")  # fmt: skip
        run("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(cert), "-days", str(days),
            "-extfile", str(ext))  # fmt: skip
        csr.unlink()
        os.chmod(key, 0o600)
    ext.unlink()
    return d


def _is_ip(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
