"""Turning a migration URI into channels: ``connect`` on the source, ``listen`` on the destination.

``tcp:`` and ``unix:`` listeners accept any number of connections (main, multifd, post-copy
preempt, recovery); ``fd:``, ``exec:`` and ``file:`` give exactly one one-shot channel.

TLS (``tls-creds``): every socket channel ``connect`` opens or a ``Listener`` accepts is wrapped
in TLS when credentials are given (``tls=``) or, by default, set process-wide with
``tls.set_migration_tls`` (QEMU reads the one MigrationState's ``tls-creds`` the same way), so
main, multifd and post-copy channels all get it. ``exec:`` and ``file:`` refuse TLS rather than
silently sending the guest in clear.

A TLS ``Listener`` accepts in a thread of its own and runs each handshake in a thread too, with
``HANDSHAKE_TIMEOUT``: a client that connects and says nothing is dropped after that, and never
holds up another (one idle connection used to keep a real source waiting for the whole
``x-io-timeout``). ``accept`` returns connections as their handshakes complete; a source makes
its channels one after the other, each after the previous one's handshake, so that is also the
order they were opened in. A peer that fails its handshake fails ``accept`` with the reason; one
that sends a plain migration stream is told apart (its first bytes are the stream's magic).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import select
import socket
import subprocess
import time
from collections.abc import Callable

from livemig import threads
from livemig.errors import UsageError
from livemig.sockpath import clear_socket_path
from livemig.transport import tls as _tls
from livemig.transport.channel import DEFAULT_TIMEOUT, Channel, ChannelError, ChannelTimeout
from livemig.transport.uri import MigrationURI, parse_uri

# ``tls=FROM_PROCESS``: use the process-wide migration TLS settings of that endpoint.
FROM_PROCESS: object = object()
HANDSHAKE_TIMEOUT = 5.0  # seconds an accepted peer has to complete its TLS handshake
PLAIN_MAGICS = {b"QEVM": "a plain migration stream", b"\x11\x22\x33\x44": "a plain multifd channel"}

log = logging.getLogger(__name__)


def _creds(tls: object, endpoint: str) -> _tls.TLSCreds | None:
    if tls is FROM_PROCESS:
        return _tls.migration_tls(endpoint)
    assert tls is None or isinstance(tls, _tls.TLSCreds)
    return tls


def _no_tls_for(u: MigrationURI, creds: _tls.TLSCreds | None) -> None:
    if creds is not None:
        raise UsageError(f"{u}: TLS (tls-creds) needs a socket transport (tcp:, unix:, fd: "
                         f"with a socket); {u.scheme}: would carry the guest in clear")  # fmt: skip


def _uri(uri: str | MigrationURI) -> MigrationURI:
    return uri if isinstance(uri, MigrationURI) else parse_uri(uri)


def connect(
    uri: str | MigrationURI,
    timeout: float | None = DEFAULT_TIMEOUT,
    name: str = "main",
    tls: object = FROM_PROCESS,
    cancelled: Callable[[], bool] | None = None,
) -> Channel:
    """Open the sending side of a migration channel (a TLS client with credentials).

    With ``cancelled``, a ``tcp:``/``unix:`` connect that hangs (a peer dropping SYNs, a full
    accept queue) gives up as soon as ``cancelled()`` is true instead of after ``timeout``.
    """
    u = _uri(uri)
    creds = _creds(tls, "client")
    if u.scheme == "tcp" and cancelled is not None:
        try:
            family, _, _, _, addr = socket.getaddrinfo(
                u.host, u.port_spec, type=socket.SOCK_STREAM
            )[0]
            sock = _cancellable_connect(family, addr, timeout, cancelled, f"{name} {u}")
        except socket.gaierror as exc:
            raise ChannelError(_unresolved(u, exc)) from exc
        except OSError as exc:
            raise ChannelError(_not_connected(u, exc)) from exc
        if creds is not None:
            return _tls.client_wrap(sock, creds, f"{name} {u}", timeout, host=u.host)
        return Channel.from_socket(sock, f"{name} {u}", timeout)
    if u.scheme == "unix" and cancelled is not None:
        try:
            sock = _cancellable_connect(socket.AF_UNIX, u.path, timeout, cancelled, f"{name} {u}")
        except OSError as exc:
            raise ChannelError(_not_connected(u, exc)) from exc
        if creds is not None:
            return _tls.client_wrap(sock, creds, f"{name} {u}", timeout)
        return Channel.from_socket(sock, f"{name} {u}", timeout)
    if u.scheme == "tcp":
        try:
            sock = socket.create_connection((u.host, u.port_spec), timeout=timeout)
        except socket.gaierror as exc:
            raise ChannelError(_unresolved(u, exc)) from exc
        except OSError as exc:
            raise ChannelError(_not_connected(u, exc)) from exc
        if creds is not None:
            return _tls.client_wrap(sock, creds, f"{name} {u}", timeout, host=u.host)
        return Channel.from_socket(sock, f"{name} {u}", timeout)
    if u.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(u.path)
        except OSError as exc:
            sock.close()
            raise ChannelError(_not_connected(u, exc)) from exc
        if creds is not None:
            return _tls.client_wrap(sock, creds, f"{name} {u}", timeout)
        return Channel.from_socket(sock, f"{name} {u}", timeout)
    if u.scheme == "fd":
        return _fd_channel(u, name, timeout, creds, "client")
    _no_tls_for(u, creds)
    if u.scheme == "exec":
        proc = subprocess.Popen(u.command, shell=True, stdin=subprocess.PIPE)
        assert proc.stdin is not None
        return Channel(f"{name} {u}", None, proc.stdin.fileno(), timeout=timeout, proc=proc)
    try:
        # write-only, as QEMU opens it (O_WRONLY | O_CREAT, O_TRUNC without an offset): a
        # return path asked of it then fails to read it as QEMU's does (Channel.read_back)
        flags = os.O_WRONLY | os.O_CREAT | (0 if u.offset else os.O_TRUNC)
        f = os.fdopen(os.open(u.path, flags, 0o666), "wb")
    except OSError as exc:
        raise ChannelError(f"cannot open {u} for writing: {exc.strerror or exc}") from exc
    if u.offset:
        f.truncate(u.offset)
        f.seek(u.offset)
    return Channel(f"{name} {u}", None, f.fileno(), timeout=timeout, file=f)


def _not_connected(u: MigrationURI, exc: OSError) -> str:
    """QEMU 10.0's words for a connect that failed: "Failed to connect to '127.0.0.1:4444':
    Connection refused" (the path of a unix socket)."""
    where = f"{u.host}:{u.port_spec}" if u.scheme == "tcp" else u.path
    return f"Failed to connect to '{where}': {exc.strerror or exc}"


def _unresolved(u: MigrationURI, exc: socket.gaierror) -> str:
    """QEMU 10.0's words for a host that does not resolve, an empty one (``tcp::PORT``)
    included: "address resolution failed for :4444: Name or service not known"."""
    return f"address resolution failed for {u.host}:{u.port_spec}: {exc.strerror or exc}"


def check_file(uri: str | MigrationURI, writing: bool) -> None:
    """A ``file:`` URI's file can be opened, refused in QEMU 10.0's words otherwise ("Could not
    create '/tmp': Is a directory", "Could not open ...") where QEMU refuses: in ``migrate`` /
    ``migrate-incoming`` themselves, before anything starts. Opened later, in the migration's
    thread, the same mistake was accepted and only seen as a failed migration. Nothing is
    created or opened here (a FIFO would block; the thread opens the file)."""
    u = _uri(uri)
    path = u.path
    code = 0
    if os.path.isdir(path):
        code = errno.EISDIR
    elif os.path.exists(path):
        if not os.access(path, os.W_OK if writing else os.R_OK):
            code = errno.EACCES
    elif not writing:
        code = errno.ENOENT
    else:
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            code = errno.ENOTDIR if os.path.exists(parent) else errno.ENOENT
        elif not os.access(parent, os.W_OK | os.X_OK):
            code = errno.EACCES
    if code:
        verb = "create" if writing else "open"
        raise ChannelError(f"Could not {verb} '{path}': {os.strerror(code)}")


_IN_PROGRESS = frozenset({errno.EINPROGRESS, errno.EALREADY, errno.EINTR})


def _cancellable_connect(
    family: int,
    address: object,
    timeout: float | None,
    cancelled: Callable[[], bool],
    what: str,
) -> socket.socket:
    """A connected stream socket; waits at most 0.1 s at a time so a cancel ends it at once."""
    deadline = None if timeout is None else time.monotonic() + timeout
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        err = sock.connect_ex(address)
        while err not in (0, errno.EISCONN):
            if cancelled():
                raise ChannelError(f"{what}: cancelled while connecting")
            left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if left <= 0:
                raise ChannelTimeout(f"{what}: no connection within {timeout:g} s")
            if err in _IN_PROGRESS:
                # TCP: the handshake is under way; writable means it ended, either way
                _, writable, _ = select.select([], [sock], [], left)
                if writable:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, os.strerror(err))
                    break
            elif err in (errno.EAGAIN, errno.EWOULDBLOCK):
                # unix: the listener's accept queue is full; try again shortly
                time.sleep(min(left, 0.05))
                err = sock.connect_ex(address)
            else:
                raise OSError(err, os.strerror(err))
        sock.settimeout(timeout)
        return sock
    except BaseException:
        sock.close()
        raise


def _fd_channel(
    u: MigrationURI,
    name: str,
    timeout: float | None,
    creds: _tls.TLSCreds | None = None,
    endpoint: str = "client",
) -> Channel:
    try:
        os.fstat(u.fd)
    except OSError as exc:
        raise UsageError(f"{u}: file descriptor {u.fd} is not open in this process") from exc
    try:
        sock = socket.socket(fileno=u.fd)
    except OSError:
        sock = None
    if sock is not None:
        if creds is not None:
            wrap = _tls.client_wrap if endpoint == "client" else _tls.server_wrap
            return wrap(sock, creds, f"{name} {u}", timeout)
        return Channel.from_socket(sock, f"{name} {u}", timeout)
    _no_tls_for(u, creds)
    return Channel(f"{name} {u}", u.fd, u.fd, timeout=timeout)


class Listener:
    """The destination side: accepts the channels of one incoming migration."""

    def __init__(
        self,
        uri: str | MigrationURI,
        timeout: float | None = DEFAULT_TIMEOUT,
        tls: object = FROM_PROCESS,
    ) -> None:
        self.uri = _uri(uri)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._used = False
        self._tls_done: queue.Queue[Channel | BaseException] | None = None
        u = self.uri
        self.tls = _creds(tls, "server")
        if u.scheme in ("exec", "file"):
            _no_tls_for(u, self.tls)
        if u.scheme == "tcp":
            try:
                sock = _tcp_listen(u.host, u.port_spec)
            except socket.gaierror as exc:
                raise ChannelError(_unresolved(u, exc)) from exc
            except OSError as exc:
                raise ChannelError(f"cannot listen on {u}: {exc.strerror or exc}") from exc
            sock.listen(16)
            self._sock = sock
        elif u.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                clear_socket_path(u.path)
                sock.bind(u.path)
                os.chmod(u.path, 0o600)
            except OSError as exc:
                sock.close()
                raise ChannelError(f"cannot listen on {u}: {exc.strerror or exc}") from exc
            sock.listen(16)
            self._sock = sock
        elif u.scheme == "file":
            check_file(u, writing=False)

    @property
    def address(self) -> str:
        """The URI actually listened on (a tcp port 0 resolved to the real port; an empty
        host, every address, stays empty)."""
        if self._sock is not None and self.uri.scheme == "tcp":
            host, port = self._sock.getsockname()[:2]
            return str(MigrationURI("tcp", host=self.uri.host and host, port=port))
        return str(self.uri)

    def socket_addresses(self) -> list[dict[str, object]]:
        """What it listens on as QEMU's ``SocketAddress`` objects (query-migrate's
        ``socket-address``): every address is two, ``::`` then ``0.0.0.0``, as QEMU lists them
        (on one port here); none for ``exec:`` and ``file:``."""
        u = self.uri
        if u.scheme == "tcp" and self._sock is not None:
            host, port = self._sock.getsockname()[:2]
            every = not u.host and self._sock.family == socket.AF_INET6
            hosts = ["::", "0.0.0.0"] if every else [host]
            return [{"port": str(port), "ipv6" if ":" in h else "ipv4": True, "host": h,
                     "type": "inet"} for h in hosts]  # fmt: skip
        if u.scheme == "unix":
            return [{"path": u.path, "type": "unix"}]
        if u.scheme == "fd":
            return [{"str": str(u.fd), "type": "fd"}]
        return []

    def accept(self, timeout: float | None = None, name: str = "main") -> Channel:
        """The next incoming channel; ``ChannelTimeout`` if none arrives in time."""
        u = self.uri
        if self._sock is not None and self.tls is not None:
            return self._accept_tls(timeout, name)
        if self._sock is not None:
            self._sock.settimeout(timeout)
            try:
                conn, _ = self._sock.accept()
            except TimeoutError as exc:
                raise ChannelTimeout(f"no connection on {u} within {timeout:g} s") from exc
            except OSError as exc:
                raise ChannelError(f"accept on {u} failed: {exc.strerror or exc}") from exc
            conn.settimeout(None)
            return Channel.from_socket(conn, f"{name} {u}", self.timeout)
        if self._used:
            raise ChannelError(f"{u} carries only one channel")
        self._used = True
        if u.scheme == "fd":
            return _fd_channel(u, name, self.timeout, self.tls, "server")
        if u.scheme == "exec":
            proc = subprocess.Popen(u.command, shell=True, stdout=subprocess.PIPE)
            assert proc.stdout is not None
            return Channel(
                f"{name} {u}", proc.stdout.fileno(), None, timeout=self.timeout, proc=proc
            )
        try:
            f = open(u.path, "rb")  # noqa: SIM115 - owned by the channel
        except OSError as exc:
            raise ChannelError(f"cannot open {u}: {exc.strerror or exc}") from exc
        f.seek(u.offset)
        return Channel(f"{name} {u}", f.fileno(), None, timeout=self.timeout, file=f)

    # -- TLS: handshakes in threads ------------------------------------------------------------

    def _accept_tls(self, timeout: float | None, name: str) -> Channel:
        u = self.uri
        if self._tls_done is None:
            self._tls_done = queue.Queue()
            threads.Thread(target=self._tls_acceptor, name="tls accept", daemon=True).start()
        try:
            got = self._tls_done.get(timeout=timeout)
        except queue.Empty:
            raise ChannelTimeout(f"no connection on {u} within {timeout:g} s") from None
        if isinstance(got, BaseException):
            raise got
        got.name = f"{name} {u}"
        return got

    def _tls_acceptor(self) -> None:
        sock = self._sock
        while sock is not None and self._sock is sock:
            try:
                conn, _ = sock.accept()
            except OSError:
                return  # closed
            conn.settimeout(None)
            threads.Thread(target=self._tls_handshake, args=(conn,), name="tls handshake",
                           daemon=True).start()  # fmt: skip

    def _tls_handshake(self, conn: socket.socket) -> None:
        assert self.tls is not None and self._tls_done is not None
        u = self.uri
        limit = HANDSHAKE_TIMEOUT if self.timeout is None else min(HANDSHAKE_TIMEOUT,
                                                                    self.timeout)  # fmt: skip
        try:
            plain = _plain_stream(conn, limit)
            if plain is not None:
                conn.close()
                raise ChannelError(
                    f"incoming {u}: the peer sent {plain} (no TLS): this side "
                    "requires TLS (tls-creds); the source needs tls-creds too"
                )
            ch = _tls.server_wrap(conn, self.tls, f"incoming {u}", self.timeout,
                                  handshake_timeout=limit)  # fmt: skip
        except ChannelTimeout as exc:
            # a client that never completed a handshake is no migration: dropped, not fatal
            log.warning("%s: dropped", exc)
            return
        except ChannelError as exc:
            self._tls_done.put(exc)
            return
        self._tls_done.put(ch)

    def pending(self) -> bool:
        """Whether a connection waits to be accepted (it is not accepted)."""
        if self._tls_done is not None and not self._tls_done.empty():
            return True
        if self._sock is None:
            return False
        p = select.poll()
        p.register(self._sock.fileno(), select.POLLIN)
        return bool(p.poll(0))

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the TLS acceptor
            self._sock.close()
            self._sock = None
            if self.uri.scheme == "unix":
                with contextlib.suppress(OSError):
                    os.unlink(self.uri.path)
        while self._tls_done is not None and not self._tls_done.empty():
            got = self._tls_done.get_nowait()
            if isinstance(got, Channel):
                got.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tcp_listen(host: str, port: int | str) -> socket.socket:
    """A bound TCP socket. An empty host is every address, IPv4 and IPv6, as QEMU listens
    for ``tcp::PORT`` (one dual-stack socket here, where QEMU opens one per family); on a host
    without IPv6, every IPv4 address. A service name for ``port`` (``ssh``) is looked up as
    QEMU's getaddrinfo does; one it does not know raises ``socket.gaierror``."""
    if isinstance(port, str):
        port = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0][4][1]
    families = [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")] if not host else \
        [(socket.AF_INET6 if ":" in host else socket.AF_INET, host)]  # fmt: skip
    for i, (family, addr) in enumerate(families):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            if i + 1 < len(families):
                continue  # no IPv6 in this kernel
            raise
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and not host:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((addr, port))
        except OSError as exc:
            sock.close()
            if i + 1 < len(families) and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                continue  # IPv6 disabled on this host
            raise
        return sock
    raise AssertionError("unreachable")


def _plain_stream(conn: socket.socket, timeout: float) -> str | None:
    """What a peer that starts with a plain migration magic sends, instead of a TLS hello (a
    peek: the bytes stay for the handshake); None for anything else."""
    p = select.poll()
    p.register(conn.fileno(), select.POLLIN)
    if not p.poll(int(timeout * 1000)):
        raise ChannelTimeout(f"TLS handshake: the peer sent nothing within {timeout:g} s")
    try:
        head = conn.recv(4, socket.MSG_PEEK)
    except OSError:
        return None
    return PLAIN_MAGICS.get(head)


def connect_retry(
    uri: str | MigrationURI,
    deadline: float,
    name: str = "main",
    timeout: float | None = DEFAULT_TIMEOUT,
) -> Channel:
    """Connect, retrying while the listener is not up yet, until ``deadline`` (monotonic)."""
    while True:
        try:
            return connect(uri, timeout, name)
        except ChannelError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)
