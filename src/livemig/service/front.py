"""The service front: ``--serve`` bridges TCP (or unix) client connections to the guest's
livemig-ring device, and keeps the clients' address stable across a live migration.

Theory of operation
-------------------
Every client connection gets a 64-bit id: a random 32-bit tag of this front in the high half,
a counter in the low half, so ids chosen by different livemig processes never collide. The
front frames each connection's requests into whole commands (``resp.RequestFramer``) and
queues them on the device as chains tagged with the id; the guest's responses carry the id
back, and the front writes them to that connection.

Migration (the source side). The front keeps serving while pre-copy runs. At switch-over the
machine stops; requests that arrive then queue on the host (the device fills the ring only
from the guest's own port I/O, so ring and device state are one snapshot). When the source's
migration has *completed* (the machine enters ``postmigrate``, the moment QEMU sends
MIGRATION completed) and the destination's serve address is known (QMP ``x-serve-redirect``,
given before or after the migration), the front opens a *tunnel* to the destination's front
and moves every connection there: an OPEN frame per connection id, then the chains that never
entered the source's ring and each connection's incomplete bytes, in order. From then on it
forwards bytes both ways; the listening address keeps accepting and new connections go through
the tunnel too. Client sockets never close; requests that arrived during the blackout are
answered after it.

The destination side. Requests that were in the ring at switch-over came over with RAM and
device state and are answered by the destination's guest, tagged with the source's ids. The
destination front routes a response whose id it does not serve to the tunnel connection that
OPENed that id; responses that come before the tunnel are held (``ORPHAN_TTL_S``). Ordering
holds per connection: in-ring requests are served before anything the tunnel brings, and the
tunnel carries the source's queue before newer bytes.

Tunnel protocol (on the same --serve port): the client first sends ``TUNNEL_MAGIC``, then both
ways frames of ``<B type><Q conn><I length>`` + payload; types OPEN, DATA, CLOSE.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
from typing import Any

from livemig import threads
from livemig.errors import LivemigError, StreamError, UsageError
from livemig.machine import Machine, RunState
from livemig.machine.devices.ring import CHAIN_MAX, RingDevice
from livemig.service.resp import RequestFramer

log = logging.getLogger(__name__)

TUNNEL_MAGIC = b"LMTUNNEL1\n"
FRAME = struct.Struct("<BQI")
OPEN, DATA, CLOSE = 1, 2, 3
ORPHAN_TTL_S = 60.0  # responses for ids no tunnel claimed are dropped after this
CONNECT_TIMEOUT_S = 30.0  # how long the source keeps trying to reach the destination
START_TIMEOUT_S = 10.0


def parse_serve_uri(uri: str) -> tuple[str, Any]:
    """``tcp:HOST:PORT`` -> ("tcp", (host, port)); ``unix:PATH`` -> ("unix", path)."""
    kind, _, rest = uri.partition(":")
    if kind == "unix" and rest:
        return "unix", rest
    if kind == "tcp":
        host, sep, port = rest.rpartition(":")
        if sep and port.isdigit() and int(port) < 65536:
            return "tcp", (host.strip("[]") or "127.0.0.1", int(port))
    raise UsageError(f"serve address {uri!r}: expected tcp:HOST:PORT or unix:PATH")


class _Endpoint(abc.ABC):
    """One client connection as the front sees it: a socket here or a sub-connection of an
    incoming tunnel."""

    def __init__(self, conn_id: int) -> None:
        self.id = conn_id
        self.framer = RequestFramer(CHAIN_MAX)

    @abc.abstractmethod
    def send(self, data: bytes) -> None:
        """Deliver response bytes to the client."""

    @abc.abstractmethod
    def close(self) -> None:
        """End the client's connection."""


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
    def __init__(self, conn_id: int, tunnel: _TunnelProtocol) -> None:
        super().__init__(conn_id)
        self.tunnel = tunnel

    def send(self, data: bytes) -> None:
        self.tunnel.frame(DATA, self.id, data)

    def close(self) -> None:
        self.tunnel.frame(CLOSE, self.id, b"")


class _TunnelProtocol:
    """Frame writer/reader over one transport (either end of a tunnel)."""

    def __init__(self, front: ServiceFront, transport: asyncio.Transport, incoming: bool) -> None:
        self.front = front
        self.transport = transport
        self.incoming = incoming
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
            if len(buf) - p - FRAME.size < n:
                break
            payload = bytes(buf[p + FRAME.size : p + FRAME.size + n])
            p += FRAME.size + n
            self.front._tunnel_frame(self, kind, conn, payload)
        del buf[:p]


class _ClientProtocol(asyncio.Protocol):
    """A connection on the serve address: a RESP client, or (after TUNNEL_MAGIC) a tunnel."""

    def __init__(self, front: ServiceFront) -> None:
        self.front = front
        self.sniff = bytearray()
        self.endpoint: _SocketEndpoint | None = None
        self.tunnel: _TunnelProtocol | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.endpoint is not None:
            self.front._client_data(self.endpoint, data)
            return
        if self.tunnel is not None:
            self.tunnel.feed(data)
            return
        self.sniff += data
        n = min(len(self.sniff), len(TUNNEL_MAGIC))
        if self.sniff[:n] == TUNNEL_MAGIC[:n]:
            if n < len(TUNNEL_MAGIC):
                return  # could still be a tunnel
            assert self.transport is not None
            self.tunnel = _TunnelProtocol(self.front, self.transport, incoming=True)
            self.front.tunnels_in += 1
            rest = bytes(self.sniff[len(TUNNEL_MAGIC) :])
            if rest:
                self.tunnel.feed(rest)
            return
        assert self.transport is not None
        self.endpoint = _SocketEndpoint(self.front._new_id(), self.transport)
        self.front._client_open(self.endpoint)
        self.front._client_data(self.endpoint, bytes(self.sniff))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.endpoint is not None:
            self.front._client_closed(self.endpoint)
        if self.tunnel is not None:
            self.front._tunnel_lost(self.tunnel)


class _TunnelOutProtocol(asyncio.Protocol):
    def __init__(self, front: ServiceFront) -> None:
        self.front = front
        self.tunnel: _TunnelProtocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.tunnel = _TunnelProtocol(self.front, transport, incoming=False)

    def data_received(self, data: bytes) -> None:
        assert self.tunnel is not None
        self.tunnel.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tunnel is not None:
            self.front._tunnel_lost(self.tunnel)


class ServiceFront:
    """The ``--serve`` endpoint of one machine (see the module docstring)."""

    def __init__(self, machine: Machine, uri: str) -> None:
        self.machine = machine
        self.device: RingDevice = machine.ring
        self.uri = uri
        self._kind, self._where = parse_serve_uri(uri)
        self._tag = int.from_bytes(os.urandom(4), "little") << 32
        self._counter = 0
        self._conns: dict[int, _Endpoint] = {}
        self._orphans: dict[int, tuple[float, list[bytes]]] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threads.Thread(target=self._run_loop, name="serve", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._tunnel_out: _TunnelProtocol | None = None
        self.redirect_uri: str | None = None
        self.migrated = False
        self.forwarding = False
        self.switched_at: float | None = None
        self.error: str | None = None
        self.connections = 0
        self.tunnels_in = 0
        self.protocol_errors = 0
        self.address = uri

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on the serve address (errors here are the caller's: address in use...)."""
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        try:
            fut.result(START_TIMEOUT_S)
        except OSError as exc:
            self.close()
            raise UsageError(f"--serve {self.uri}: cannot listen: {exc}") from exc
        self.device.set_response_handler(self._on_responses)
        self.machine.add_state_listener(self._on_state)

    async def _listen(self) -> None:
        if self._kind == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._where)
            self._server = await self._loop.create_unix_server(
                lambda: _ClientProtocol(self), self._where
            )
            self.address = f"unix:{self._where}"
        else:
            host, port = self._where
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
        if not self._thread.is_alive():
            return
        with contextlib.suppress(ValueError):
            self.machine.remove_state_listener(self._on_state)
        self.device.set_response_handler(None)

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for ep in list(self._conns.values()):
                if isinstance(ep, _SocketEndpoint):
                    ep.close()
            if self._tunnel_out is not None:
                self._tunnel_out.transport.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if self._kind == "unix":
            with contextlib.suppress(OSError):
                os.unlink(self._where)

    # -- control (any thread) -----------------------------------------------------------------

    def redirect(self, uri: str) -> None:
        """The destination's serve address: forward there once the migration has completed."""
        parse_serve_uri(uri)
        self._loop.call_soon_threadsafe(self._set_redirect, uri)

    def info(self) -> dict[str, Any]:
        """Status for QMP ``x-query-serve`` and the benchmark."""
        return {
            "address": self.address,
            "connections": len(self._conns),
            "accepted": self.connections,
            "forwarding": self.forwarding,
            "redirect": self.redirect_uri,
            "migrated": self.migrated,
            "tunnels-in": self.tunnels_in,
            "held-responses": sum(len(v[1]) for v in self._orphans.values()),
            "protocol-errors": self.protocol_errors,
            "error": self.error,
            **self.device.in_flight(),
        }

    def _on_state(self, old: RunState, new: RunState) -> None:
        if new == RunState.POSTMIGRATE:
            self._loop.call_soon_threadsafe(self._set_migrated)

    def _on_responses(self, out: list[tuple[int, bytes]]) -> None:
        self._loop.call_soon_threadsafe(self._deliver, out)

    # -- the loop thread ----------------------------------------------------------------------

    def _new_id(self) -> int:
        self._counter += 1
        return self._tag | (self._counter & 0xFFFF_FFFF)

    def _set_redirect(self, uri: str) -> None:
        self.redirect_uri = uri
        self._maybe_switch()

    def _set_migrated(self) -> None:
        self.migrated = True
        self._maybe_switch()

    def _maybe_switch(self) -> None:
        if self.migrated and self.redirect_uri and not self.forwarding and not self._switching:
            self._switching = True
            self._loop.create_task(self._switch(self.redirect_uri))

    _switching = False

    async def _switch(self, uri: str) -> None:
        kind, where = parse_serve_uri(uri)
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            try:
                if kind == "unix":
                    transport, proto = await self._loop.create_unix_connection(
                        lambda: _TunnelOutProtocol(self), where
                    )
                else:
                    transport, proto = await self._loop.create_connection(
                        lambda: _TunnelOutProtocol(self), *where
                    )
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    self.error = f"cannot reach the destination's front at {uri}: {exc}"
                    log.error("serve: %s", self.error)
                    self._switching = False
                    return
                await asyncio.sleep(0.05)
        tunnel = proto.tunnel
        assert tunnel is not None
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # From here to the end nothing awaits: client data cannot interleave with the move.
        transport.write(TUNNEL_MAGIC)
        for ep in self._conns.values():
            tunnel.frame(OPEN, ep.id, b"")
        for conn, chain in self.device.take_pending():
            tunnel.frame(DATA, conn, chain)
        for ep in self._conns.values():
            rest = ep.framer.leftover()
            if rest:
                tunnel.frame(DATA, ep.id, rest)
        self._tunnel_out = tunnel
        self.forwarding = True
        self._switching = False
        self.switched_at = time.monotonic()
        log.info("serve: %d connections moved to %s", len(self._conns), uri)

    def _client_open(self, ep: _Endpoint) -> None:
        self._conns[ep.id] = ep
        self.connections += 1
        if self._tunnel_out is not None:
            self._tunnel_out.frame(OPEN, ep.id, b"")

    def _client_data(self, ep: _Endpoint, data: bytes) -> None:
        if self._tunnel_out is not None:
            self._tunnel_out.frame(DATA, ep.id, data)
            return
        try:
            chains = ep.framer.feed(data)
        except StreamError as exc:
            self.protocol_errors += 1
            ep.send(f"-ERR Protocol error: {exc}\r\n".encode())
            ep.close()
            return
        for chain in chains:
            self.device.submit(ep.id, chain)

    def _client_closed(self, ep: _Endpoint) -> None:
        self._conns.pop(ep.id, None)
        if self._tunnel_out is not None:
            self._tunnel_out.frame(CLOSE, ep.id, b"")

    def _deliver(self, out: list[tuple[int, bytes]]) -> None:
        for conn, data in out:
            ep = self._conns.get(conn)
            if ep is not None:
                ep.send(data)
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

    def _tunnel_frame(self, tunnel: _TunnelProtocol, kind: int, conn: int, data: bytes) -> None:
        if tunnel.incoming:
            if kind == OPEN:
                ep = _TunnelEndpoint(conn, tunnel)
                tunnel.ids.add(conn)
                self._client_open(ep)
                for held in self._orphans.pop(conn, (0.0, []))[1]:
                    ep.send(held)
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

    def _tunnel_lost(self, tunnel: _TunnelProtocol) -> None:
        if tunnel.incoming:
            for conn in list(tunnel.ids):
                ep = self._conns.get(conn)
                if ep is not None:
                    self._client_closed(ep)
            return
        if tunnel is self._tunnel_out:
            self.error = "the tunnel to the destination closed"
            log.error("serve: %s; closing the client connections", self.error)
            self._tunnel_out = None
            for ep in list(self._conns.values()):
                ep.close()


def register_service_commands(registry: Any, front: ServiceFront) -> None:
    """QMP ``x-serve-redirect`` (uri) and ``x-query-serve``."""
    from livemig.qmp.commands import Arg, QMPError

    def redirect(uri: str) -> dict[str, Any]:
        try:
            front.redirect(uri)
        except LivemigError as exc:
            raise QMPError("GenericError", str(exc)) from exc
        return {}

    registry.add("x-serve-redirect", redirect, args={"uri": Arg(str)})
    registry.add("x-query-serve", front.info)


def start_service(machine: Machine, uri: str, registry: Any | None = None) -> ServiceFront:
    """Start a front on ``uri`` for ``machine``; with a QMP ``registry``, add its commands."""
    front = ServiceFront(machine, uri)
    front.start()
    if registry is not None:
        register_service_commands(registry, front)
    return front


__all__ = [
    "ServiceFront",
    "parse_serve_uri",
    "register_service_commands",
    "start_service",
]
