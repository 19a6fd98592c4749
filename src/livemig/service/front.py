"""The service front: ``--serve`` bridges TCP (or unix) client connections to the guest's
livemig-ring device, and the clients' address keeps working when the guest migrates, with no
step beyond the migration itself (``livemig migrate`` or a plain QMP ``migrate``).

Theory of operation
-------------------
Every client connection gets a 64-bit id: a random 32-bit tag of this front in the high half,
a counter in the low half, so ids chosen by different livemig processes never collide. The
front frames each connection's requests into whole commands (``resp.RequestFramer``) and
queues them on the device as chains tagged with the id; the guest's responses carry the id
back, and the front writes them to that connection.

Following the guest (docs/service.md has the whole story). The front watches the migration
object of its process (``MigrationManager``), the way QEMU's devices watch migration state
through notifiers:

1. *Setup* (source status ``active``): the front opens a **follow listener** on an ephemeral
   port of the address the migration itself leaves from (the local address the kernel routes
   the ``tcp:`` destination through; 127.0.0.1 for ``unix:``, ``fd:`` and ``exec:``), with TLS
   when the migration has ``tls-creds``, and draws a 16-byte token. Address, port and token go
   to the ring device as ``Follow``, which the device state carries to the destination (an
   optional vmstate subsection, see ``machine/devices/ring.py``). A ``file:`` migration is a
   snapshot: there is nothing to follow.
2. *Blackout*: the machine stops; requests that arrive queue on the host (the device fills the
   ring only from the guest's own port I/O, so ring and device state are one snapshot).
   Requests already in the ring travel with RAM and are answered by the destination's guest.
3. *Destination*: every ``livemig run --incoming`` has a front (listening for clients only with
   its own ``--serve``). When its guest leaves ``inmigrate`` (pre-copy done, or post-copy's RUN)
   with a ``Follow`` in the ring's state, it **dials the source's follow listener**, sends
   ``TUNNEL_MAGIC`` and the token: that connection is the *tunnel*.
4. *Switch*: once the source's migration has completed (or entered ``postcopy-active``, when
   the guest already runs on the destination) and a tunnel with the right token is there, the
   source moves every connection into it: an OPEN frame per connection id, then the chains that
   never entered the source's ring and each connection's incomplete bytes, in order. From then
   on it forwards bytes both ways; its listening address keeps accepting and new connections
   go through the tunnel too. Client sockets never close; requests that arrived during the
   blackout are answered after it.

Why the destination dials: only the source-to-destination direction is certain to exist (a
plain QMP ``migrate`` has no return path, so the destination cannot tell the source where it
listens), and the source's address is reachable from the destination by construction (the
migration connection came from it). A migration that chains (A to B to C) chains the tunnels:
B forwards A's connections as its own.

When following is impossible, clients hear it within seconds instead of hanging: no tunnel
within ``FOLLOW_TIMEOUT_S`` after the source's migration completed (the destination has no
front, cannot reach the follow address, or failed after the source had sent everything), a
snapshot, or a tunnel that closes later (the destination went away). Then every client gets one
``-ERR`` line and its connection is closed, and new connections get the same until the guest
runs here again (QMP ``cont`` after a failed or saved migration). A migration that fails or is
cancelled leaves the guest here: the front goes on serving, queued requests included.

The destination side. Requests that were in the ring at switch-over came over with RAM and
device state and are answered by the destination's guest, tagged with the source's ids. The
destination front routes a response whose id it does not serve to the tunnel that OPENed that
id; responses that come before the tunnel are held (``ORPHAN_TTL_S``). Ordering holds per
connection: in-ring requests are served before anything the tunnel brings, and the tunnel
carries the source's queue before newer bytes.

Tunnel protocol (on the follow listener, nowhere else): the destination first sends
``TUNNEL_MAGIC`` and the 16-byte token, then both ways frames of ``<B type><Q conn><I length>``
+ payload; types OPEN, DATA, CLOSE (source to destination: OPEN, DATA of requests, CLOSE;
destination to source: DATA of responses, CLOSE).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hmac
import logging
import os
import socket
import ssl
import struct
import time
from typing import Any

from livemig import threads
from livemig.errors import LivemigError, StreamError, UsageError
from livemig.machine import Machine, RunState
from livemig.machine.devices.ring import CHAIN_MAX, Follow, RingDevice
from livemig.service.backend import LinkBackend
from livemig.service.link import LINK_MAGIC
from livemig.service.resp import RequestFramer
from livemig.sockpath import clear_socket_path

log = logging.getLogger(__name__)

TUNNEL_MAGIC = b"LMTUNNEL2\n"
TOKEN_SIZE = 16
FRAME = struct.Struct("<BQI")
OPEN, DATA, CLOSE = 1, 2, 3
ORPHAN_TTL_S = 60.0  # responses for ids no tunnel claimed are dropped after this
START_TIMEOUT_S = 10.0
# After the source's migration completed, how long its clients wait for the destination's front
# to dial in before they are told that the service is gone (a destination that has loaded the
# guest dials within milliseconds).
FOLLOW_TIMEOUT_S = 10.0
DIAL_TIMEOUT_S = 10.0  # how long a destination keeps trying to reach the follow listener
HANDSHAKE_TIMEOUT_S = 5.0  # for a connection on the follow listener to present its token
PREPARE_TIMEOUT_S = 5.0


def parse_serve_uri(uri: str, what: str = "serve address") -> tuple[str, Any]:
    """``tcp:HOST:PORT`` -> ("tcp", (host, port)); ``unix:PATH`` -> ("unix", path); ``what``
    names the address in the error."""
    kind, _, rest = uri.partition(":")
    if kind == "unix" and rest:
        return "unix", rest
    if kind == "tcp":
        host, sep, port = rest.rpartition(":")
        if sep and port.isdigit() and int(port) < 65536:
            return "tcp", (host.strip("[]") or "127.0.0.1", int(port))
    raise UsageError(f"{what} {uri!r}: expected tcp:HOST:PORT or unix:PATH")


def follow_host(migration_uri: str) -> str | None:
    """The address a follow listener binds to for a migration to ``migration_uri``: for
    ``tcp:``, the local address the kernel routes that destination through (a UDP ``connect``
    sends nothing); 127.0.0.1 for the local schemes; None for ``file:`` (a snapshot)."""
    from livemig.transport import parse_uri

    uri = parse_uri(migration_uri)
    if uri.scheme == "file":
        return None
    if uri.scheme != "tcp":
        return "127.0.0.1"
    host = "127.0.0.1" if uri.host in ("0.0.0.0", "") else uri.host
    family, _, _, _, addr = socket.getaddrinfo(host, uri.port or 9, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        return str(s.getsockname()[0])


class _Endpoint(abc.ABC):
    """One client connection as the front sees it: a socket here or a sub-connection of an
    incoming tunnel."""

    def __init__(self, conn_id: int) -> None:
        self.id = conn_id
        self.framer = RequestFramer(CHAIN_MAX)
        self.produced = 0  # reply bytes the guest produced for this client
        self.released = 0  # ... of which may go out (output commit: service/backend.py)
        self._held = bytearray()

    @abc.abstractmethod
    def send(self, data: bytes) -> None:
        """Deliver response bytes to the client."""

    @abc.abstractmethod
    def close(self) -> None:
        """End the client's connection."""

    def respond(self, data: bytes, release: bool) -> None:
        """Reply bytes of the guest: out at once, or held until ``release``."""
        self.produced += len(data)
        if release and not self._held:
            self.released = self.produced
            self.send(data)
            return
        self._held += data
        if release:
            self.release(self.produced)

    def release(self, upto: int) -> None:
        n = min(upto, self.produced) - self.released
        if n > 0:
            data = bytes(self._held[:n])
            del self._held[:n]
            self.released += n
            self.send(data)

    def fail(self, line: bytes) -> None:
        """An error line of this process (not the guest's), then the end of the connection."""
        self.send(line)
        self.close()


class _SocketEndpoint(_Endpoint):
    def __init__(self, conn_id: int, transport: asyncio.Transport) -> None:
        super().__init__(conn_id)
        self.transport = transport

    def send(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        self.transport.close()


class _TunnelEndpoint(_Endpoint):
    def __init__(self, conn_id: int, tunnel: _Tunnel) -> None:
        super().__init__(conn_id)
        self.tunnel = tunnel

    def send(self, data: bytes) -> None:
        self.tunnel.frame(DATA, self.id, data)

    def close(self) -> None:
        self.tunnel.frame(CLOSE, self.id, b"")


class _Tunnel:
    """Frame writer/reader over one transport. ``serving``: the destination's end (it serves
    the ids the other end OPENs); else the source's (it forwards its clients into it)."""

    def __init__(self, front: ServiceFront, transport: asyncio.Transport, serving: bool) -> None:
        self.front = front
        self.transport = transport
        self.serving = serving
        self.buf = bytearray()
        self.ids: set[int] = set()

    def frame(self, kind: int, conn: int, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(FRAME.pack(kind, conn, len(data)) + data)

    def feed(self, data: bytes) -> None:
        self.buf += data
        p = 0
        buf = self.buf
        while len(buf) - p >= FRAME.size:
            kind, conn, n = FRAME.unpack_from(buf, p)
            if kind not in (OPEN, DATA, CLOSE):
                log.error("serve: tunnel frame of unknown type %d: closing the tunnel", kind)
                self.transport.close()
                return
            if len(buf) - p - FRAME.size < n:
                break
            payload = bytes(buf[p + FRAME.size : p + FRAME.size + n])
            p += FRAME.size + n
            self.front._tunnel_frame(self, kind, conn, payload)
        del buf[:p]

    def close(self) -> None:
        self.transport.close()


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _ClientProtocol(asyncio.Protocol):
    """A RESP client on the serve address."""

    def __init__(self, front: ServiceFront) -> None:
        self.front = front
        self.endpoint: _SocketEndpoint | None = None
        self.transport: asyncio.Transport | None = None
        self.head = b""  # the first bytes, until they tell a client from a front link
        self.link: Any = None  # backend._Link when a ``livemig front`` connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        _nodelay(transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.link is not None:
            self.link.feed(data)
            return
        if self.endpoint is None:
            self.head += data
            magic = LINK_MAGIC
            if len(self.head) < len(magic) and magic.startswith(self.head):
                return  # maybe a front link: wait for the rest of the magic
            assert self.transport is not None
            if self.head.startswith(magic):
                self.link = self.front._link_opened(self.transport)
                rest, self.head = self.head[len(magic) :], b""
                if rest:
                    self.link.feed(rest)
                return
            self.endpoint = _SocketEndpoint(self.front._new_id(), self.transport)
            self.front._client_open(self.endpoint)
            data, self.head = self.head, b""
        self.front._client_data(self.endpoint, data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.link is not None:
            self.front._link_lost(self.link)
        elif self.endpoint is not None:
            self.front._client_closed(self.endpoint)


class _FollowAccept(asyncio.Protocol):
    """A connection on the source's follow listener: a destination presenting its token."""

    def __init__(self, front: ServiceFront, token: bytes) -> None:
        self.front = front
        self.token = token
        self.head = bytearray()
        self.tunnel: _Tunnel | None = None
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        _nodelay(transport)
        self._timer = self.front._loop.call_later(HANDSHAKE_TIMEOUT_S, transport.close)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.feed(data)
            return
        assert self.transport is not None
        self.head += data
        want = len(TUNNEL_MAGIC) + TOKEN_SIZE
        if len(self.head) < want:
            return
        if self._timer is not None:
            self._timer.cancel()
        magic, token = self.head[: len(TUNNEL_MAGIC)], bytes(self.head[len(TUNNEL_MAGIC) : want])
        if magic != TUNNEL_MAGIC or not hmac.compare_digest(token, self.token):
            log.warning("serve: a connection on the follow listener presented no valid token")
            self.transport.close()
            return
        self.tunnel = _Tunnel(self.front, self.transport, serving=False)
        if not self.front._tunnel_arrived(self.tunnel):
            self.transport.close()
            return
        if len(self.head) > want:
            self.tunnel.feed(bytes(self.head[want:]))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.tunnel is not None:
            self.front._tunnel_lost(self.tunnel)


class _FollowDial(asyncio.Protocol):
    """The destination's end of a tunnel it dialled."""

    def __init__(self, front: ServiceFront) -> None:
        self.front = front
        self.tunnel: _Tunnel | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        _nodelay(transport)
        self.tunnel = _Tunnel(self.front, transport, serving=True)

    def data_received(self, data: bytes) -> None:
        assert self.tunnel is not None
        self.tunnel.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tunnel is not None:
            self.front._tunnel_lost(self.tunnel)


class ServiceFront(LinkBackend):
    """The service endpoint of one machine (see the module docstring). ``uri`` is where
    clients connect (None: none here, a destination that only takes clients over); with a
    ``manager`` (``MigrationManager``) the clients follow the guest's migrations."""

    def __init__(self, machine: Machine, uri: str | None, manager: Any = None) -> None:
        self.machine = machine
        self.manager = manager
        self.device: RingDevice = machine.ring
        self.uri = uri
        self._where = parse_serve_uri(uri) if uri else None
        self._tag = int.from_bytes(os.urandom(4), "little") << 32
        self._counter = 0
        self._conns: dict[int, _Endpoint] = {}
        self._orphans: dict[int, tuple[float, list[bytes]]] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threads.Thread(target=self._run_loop, name="serve", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._closed = False
        # source side of following
        self._follow_server: asyncio.AbstractServer | None = None
        self._token: bytes | None = None
        self._held: _Tunnel | None = None  # a destination's tunnel, before the switch
        self._tunnel_out: _Tunnel | None = None
        self._give_up_timer: asyncio.TimerHandle | None = None
        self._gone: str | None = None  # why clients are refused (the guest is not here)
        self.follow_address: str | None = None
        self.migrated = False
        self.forwarding = False
        self.switched_at: float | None = None
        # destination side
        self.followed: str | None = None  # the follow address this front dialled
        self.tunnels_in = 0
        self.error: str | None = None
        self.connections = 0
        self.refused = 0
        self.protocol_errors = 0
        self.address = uri or ""
        self._bound_unix: str | None = None  # the socket file this front made, removed at close
        self._init_links()

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on the serve address (errors here are the caller's: address in use...)."""
        self._thread.start()
        if self._where is not None:
            fut = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
            try:
                fut.result(START_TIMEOUT_S)
            except OSError as exc:
                self.close()
                raise UsageError(f"--serve {self.uri}: cannot listen: {exc}") from exc
        self.device.set_response_handler(self._on_responses)
        self.machine.add_state_listener(self._on_state)
        if self.manager is not None:
            self.manager.source.add_listener(self._on_source_status)
            participants = getattr(self.manager, "colo_participants", None)
            if participants is not None:
                participants.append(self)  # replies wait for checkpoints
        if self.machine.runstate not in (RunState.INMIGRATE, RunState.PRELAUNCH):
            self._on_state(RunState.INMIGRATE, self.machine.runstate)  # loaded before start()

    async def _listen(self) -> None:
        assert self._where is not None
        kind, where = self._where
        if kind == "unix":
            clear_socket_path(where)
            self._server = await self._loop.create_unix_server(lambda: _ClientProtocol(self), where)
            self.address = f"unix:{where}"
            self._bound_unix = where
        else:
            host, port = where
            self._server = await self._loop.create_server(
                lambda: _ClientProtocol(self), host, port, reuse_address=True
            )
            port = self._server.sockets[0].getsockname()[1]
            self.address = f"tcp:{host}:{port}"

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def close(self) -> None:
        """Stop listening, close every connection and the loop thread."""
        self._closed = True
        if not self._thread.is_alive():
            return
        with contextlib.suppress(ValueError):
            self.machine.remove_state_listener(self._on_state)
        self.device.set_response_handler(None)

        async def shutdown() -> None:
            for server in (self._server, self._follow_server):
                if server is not None:
                    server.close()
            for ep in list(self._conns.values()):
                if isinstance(ep, _SocketEndpoint):
                    ep.close()
            for tunnel in (self._tunnel_out, self._held):
                if tunnel is not None:
                    tunnel.close()
            for link in list(self._links):
                link.transport.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if self._bound_unix is not None:  # not a path it failed to bind: not its file
            with contextlib.suppress(OSError):
                os.unlink(self._bound_unix)

    def info(self) -> dict[str, Any]:
        """Status for QMP ``x-query-serve`` and the benchmark."""
        return {
            "address": self.address or None,
            "connections": len(self._conns),
            "accepted": self.connections,
            "refused": self.refused,
            "follow-address": self.follow_address,
            "forwarding": self.forwarding,
            "migrated": self.migrated,
            "followed": self.followed,
            "tunnels-in": self.tunnels_in,
            "held-responses": sum(len(v[1]) for v in self._orphans.values()),
            "protocol-errors": self.protocol_errors,
            "error": self.error,
            **self.link_info(),
            **self.device.in_flight(),
        }

    # -- notifications (any thread) -----------------------------------------------------------

    def _on_state(self, old: RunState, new: RunState) -> None:
        if self._closed:
            return
        if old == RunState.INMIGRATE and new in (RunState.RUNNING, RunState.PAUSED):
            follow, self.device.follow = self.device.follow, None
            if follow is not None:
                self._loop.call_soon_threadsafe(self._start_dial, follow)
        elif new == RunState.RUNNING:
            self._loop.call_soon_threadsafe(self._guest_back)

    def _on_source_status(self, old: Any, new: Any) -> None:
        from livemig.migration.state import MigrationStatus as S

        if self._closed:
            return
        mig = getattr(self.manager, "outgoing", None)
        if mig is not None and "x-colo" in getattr(mig.config, "capabilities", ()):
            return  # replication: the guest stays here (its clients follow by failover)
        if new == S.ACTIVE and old == S.SETUP:
            self._prepare_follow()
        elif new in (S.COMPLETED, S.POSTCOPY_ACTIVE):
            self._loop.call_soon_threadsafe(self._set_migrated)
        elif new in (S.FAILED, S.CANCELLED):
            self.device.follow = None
            self._loop.call_soon_threadsafe(self._abort_follow)

    def _on_responses(self, out: list[tuple[int, bytes]]) -> None:
        self._loop.call_soon_threadsafe(self._deliver, out)

    def _prepare_follow(self) -> None:
        """On the migration thread as the migration becomes active: the follow listener and
        the ring's ``Follow``, before the device state is saved."""
        self.device.follow = None
        mig = getattr(self.manager, "outgoing", None)
        if mig is None:
            return
        try:
            host = follow_host(mig.config.uri)
            if host is None:
                log.info("serve: %s is a snapshot: there is no destination to follow",
                         mig.config.uri)  # fmt: skip
                return
            ctx = None
            creds = mig.config.params.get("tls-creds") or ""
            if creds:
                from livemig.transport.tls import load_creds

                ctx = load_creds(creds, "server").context
            token = os.urandom(TOKEN_SIZE)
            port = asyncio.run_coroutine_threadsafe(
                self._listen_follow(host, ctx, token), self._loop
            ).result(PREPARE_TIMEOUT_S)
        except (LivemigError, OSError, TimeoutError) as exc:
            self.error = f"cannot open a follow listener for the migration: {exc}"
            log.error("serve: %s; clients will be told the service is gone", self.error)
            return
        self.device.follow = Follow(token, host, port, ctx is not None)

    # -- the loop thread: source ---------------------------------------------------------------

    def _new_id(self) -> int:
        self._counter += 1
        return self._tag | (self._counter & 0xFFFF_FFFF)

    async def _listen_follow(self, host: str, ctx: ssl.SSLContext | None, token: bytes) -> int:
        self._abort_follow()
        self._token = token
        self._gone = None
        self.migrated = False
        server = await self._loop.create_server(lambda: _FollowAccept(self, token), host, 0,
                                                ssl=ctx)  # fmt: skip
        self._follow_server = server
        port = int(server.sockets[0].getsockname()[1])
        self.follow_address = f"{host}:{port}"
        log.info("serve: follow listener on %s%s", self.follow_address, " (TLS)" if ctx else "")
        return port

    def _close_follow_server(self) -> None:
        if self._follow_server is not None:
            self._follow_server.close()
            self._follow_server = None

    def _abort_follow(self) -> None:
        """The migration failed or was cancelled (or a new one starts): the guest is here."""
        self._close_follow_server()
        if self._held is not None:
            self._held.close()
            self._held = None
        if self._give_up_timer is not None:
            self._give_up_timer.cancel()
            self._give_up_timer = None
        self._token = None
        if not self.forwarding:
            self.migrated = False

    def _tunnel_arrived(self, tunnel: _Tunnel) -> bool:
        if self.forwarding or self._held is not None or self._token is None:
            return False
        self._held = tunnel
        log.info("serve: the destination's front connected")
        self._maybe_switch()
        return True

    def _set_migrated(self) -> None:
        if self.migrated or self.forwarding:
            return
        self.migrated = True
        if self._token is None:
            self._give_up("the guest migrated and its destination cannot be followed (a "
                          "snapshot, or no follow listener: see the source's log)")  # fmt: skip
            return
        self._maybe_switch()
        if not self.forwarding:
            self._give_up_timer = self._loop.call_later(
                FOLLOW_TIMEOUT_S, self._give_up,
                f"the guest migrated but its destination's front did not connect within "
                f"{FOLLOW_TIMEOUT_S:g} s",
            )  # fmt: skip

    def _maybe_switch(self) -> None:
        if self.migrated and self._held is not None and not self.forwarding:
            self._switch(self._held)

    def _switch(self, tunnel: _Tunnel) -> None:
        # Nothing here awaits: client data cannot interleave with the move.
        for ep in self._conns.values():
            tunnel.frame(OPEN, ep.id, b"")
        for conn, chain in self.device.take_pending():
            tunnel.frame(DATA, conn, chain)
        for ep in self._conns.values():
            rest = ep.framer.leftover()
            if rest:
                tunnel.frame(DATA, ep.id, rest)
        self._held = None
        self._tunnel_out = tunnel
        self.forwarding = True
        self.switched_at = time.monotonic()
        if self._give_up_timer is not None:
            self._give_up_timer.cancel()
            self._give_up_timer = None
        self._close_follow_server()
        log.info("serve: %d connections moved to the destination", len(self._conns))

    def _give_up(self, reason: str) -> None:
        """Following is impossible: tell every client and close, refuse new ones."""
        self._give_up_timer = None
        if self.forwarding and self._tunnel_out is not None:
            return
        self._close_follow_server()
        self._gone = reason
        self.error = reason
        log.error("serve: %s; closing %d client connections", reason, len(self._conns))
        self.device.take_pending()  # nobody will answer them here
        line = f"-ERR livemig: {reason}\r\n".encode()
        for ep in list(self._conns.values()):
            ep.fail(line)

    def _guest_back(self) -> None:
        """The guest runs here again (``cont`` after a snapshot or a failed migration)."""
        if self._gone is not None and not self.forwarding:
            log.info("serve: the guest runs here again: serving clients")
            self._gone = None
            self.migrated = False

    # -- the loop thread: destination ---------------------------------------------------------

    def _start_dial(self, follow: Follow) -> None:
        self._loop.create_task(self._dial(follow))

    def _client_tls(self) -> ssl.SSLContext | None:
        creds = self.manager.params["tls-creds"] if self.manager is not None else ""
        if not creds:
            return None
        from livemig.transport.tls import load_creds

        return load_creds(creds, "client").context

    async def _dial(self, follow: Follow) -> None:
        where = f"{follow.host}:{follow.port}"
        try:
            ctx = self._client_tls() if follow.tls else None
            if follow.tls and ctx is None:
                raise UsageError("the source's follow listener uses TLS and this process has "
                                 "no tls-creds")  # fmt: skip
        except LivemigError as exc:
            self.error = f"cannot take the clients over from {where}: {exc}"
            log.error("serve: %s", self.error)
            return
        deadline = time.monotonic() + DIAL_TIMEOUT_S
        while True:
            try:
                transport, _proto = await self._loop.create_connection(
                    lambda: _FollowDial(self), follow.host, follow.port, ssl=ctx,
                    server_hostname=follow.host if ctx is not None else None,
                )  # fmt: skip
                break
            except (OSError, ssl.SSLError) as exc:
                if time.monotonic() > deadline:
                    self.error = f"cannot reach the source's follow listener at {where}: {exc}"
                    log.error("serve: %s", self.error)
                    return
                await asyncio.sleep(0.05)
        transport.write(TUNNEL_MAGIC + follow.token)
        self.followed = where
        self.tunnels_in += 1
        log.info("serve: taking the clients over from %s", where)

    # -- the loop thread: clients and tunnels -------------------------------------------------

    def _client_open(self, ep: Any) -> None:
        refusal = self._gone
        if self.standby:
            refusal = ("this process is a COLO standby: connect through the guest's front "
                       "(livemig front) or to the primary")  # fmt: skip
        if refusal is not None and isinstance(ep, _SocketEndpoint):
            self.refused += 1
            ep.fail(f"-ERR livemig: {refusal}\r\n".encode())
            return
        self._conns[ep.id] = ep
        self.connections += 1
        if self._tunnel_out is not None:
            self._tunnel_out.frame(OPEN, ep.id, b"")

    def _client_data(self, ep: Any, data: bytes) -> None:
        if ep.id not in self._conns:
            return  # refused
        if self._tunnel_out is not None:
            self._tunnel_out.frame(DATA, ep.id, data)
            return
        try:
            chains = ep.framer.feed(data)
        except StreamError as exc:
            self.protocol_errors += 1
            ep.fail(f"-ERR Protocol error: {exc}\r\n".encode())
            return
        for chain in chains:
            self.device.submit(ep.id, chain)

    def _client_closed(self, ep: Any) -> None:
        if self._conns.pop(ep.id, None) is None:
            return
        if self._tunnel_out is not None:
            self._tunnel_out.frame(CLOSE, ep.id, b"")

    def _deliver(self, out: list[tuple[int, bytes]]) -> None:
        for conn, data in out:
            ep = self._conns.get(conn)
            if ep is not None:
                self._respond(ep, data)
            else:
                self._hold(conn, data)

    def _hold(self, conn: int, data: bytes) -> None:
        """A response for an id nobody here serves yet: a tunnel may still claim it."""
        now = time.monotonic()
        for cid in [c for c, (t, _) in self._orphans.items() if now - t > ORPHAN_TTL_S]:
            del self._orphans[cid]
        if conn & ~0xFFFF_FFFF == self._tag:
            return  # one of ours that has closed: nobody to answer
        self._orphans.setdefault(conn, (now, []))[1].append(data)

    def _tunnel_frame(self, tunnel: _Tunnel, kind: int, conn: int, data: bytes) -> None:
        if tunnel.serving:
            if kind == OPEN:
                ep = _TunnelEndpoint(conn, tunnel)
                tunnel.ids.add(conn)
                self._client_open(ep)
                for held in self._orphans.pop(conn, (0.0, []))[1]:
                    self._respond(ep, held)
            elif kind == DATA:
                target = self._conns.get(conn)
                if target is not None:
                    self._client_data(target, data)
            elif kind == CLOSE:
                tunnel.ids.discard(conn)
                gone = self._conns.get(conn)
                if gone is not None:
                    self._client_closed(gone)
            return
        # Frames from the destination to the source: responses and closes of our clients.
        ep = self._conns.get(conn)
        if ep is None:
            return
        if kind == DATA:
            ep.send(data)
        elif kind == CLOSE:
            ep.close()

    def _tunnel_lost(self, tunnel: _Tunnel) -> None:
        if tunnel.serving:
            for conn in list(tunnel.ids):
                ep = self._conns.get(conn)
                if ep is not None:
                    self._client_closed(ep)
            if not self._closed:
                log.warning("serve: the tunnel from %s closed", self.followed)
            return
        if tunnel is self._held:
            self._held = None
            return
        if tunnel is self._tunnel_out:
            self._tunnel_out = None
            self.forwarding = False
            self._give_up("the connection to the guest's destination closed")


def register_service_commands(registry: Any, front: ServiceFront) -> None:
    """QMP ``x-query-serve``."""
    registry.add("x-query-serve", front.info)


def start_service(
    machine: Machine, uri: str | None, registry: Any | None = None, manager: Any = None
) -> ServiceFront:
    """Start a front for ``machine`` (clients on ``uri`` if given; following the guest's
    migrations with ``manager``); with a QMP ``registry``, add its commands."""
    front = ServiceFront(machine, uri, manager)
    front.start()
    if registry is not None:
        register_service_commands(registry, front)
    return front


__all__ = [
    "ServiceFront",
    "follow_host",
    "parse_serve_uri",
    "register_service_commands",
    "start_service",
]
