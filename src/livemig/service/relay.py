"""``livemig front``: the address clients use, kept by a process of its own, so that it
outlives the process that runs the guest (Remus moved the guest's IP address to the backup;
a livemig guest's clients connect to a process, so the process they connect to must not be
the one that dies).

Theory of operation. The front listens where the clients connect and holds their
connections. It carries each connection's bytes to the process that runs the guest (its
*backend*, a ``livemig run --serve`` address) over one front link (``service/link.py``),
keeping every request byte until the backend says it is committed and writing every reply
byte to its client once, by offset. The backend names its *successor*: the standby's service
address while the guest is replicated (COLO), nothing otherwise.

When the link fails (the backend's process died: the connection closes at once; its host is
gone or the link is cut: no heartbeat for ``heartbeat_timeout``), the front keeps its clients'
connections open and dials the backend again and its successor, until one of them says it
serves the guest: the old backend after a passing fault, the standby once it has taken over.
It then reopens every connection there with the reply offset it has and resends the request
bytes not yet committed; the standby drops what its checkpoint already took in and resends the
replies the front lacks. A client sees a pause, not an error. The front never goes back to a
backend it has left, and fails over only to the successor the backend named last: a backend
that lost its standby says so (empty successor) *before* it releases any reply that the
standby lacks, so the front never moves its clients to a guest that misses something they
were told.

When nobody takes the guest over within ``failover_timeout`` (no successor, or it never
serves), every client gets one ``-ERR livemig: ...`` line saying why and its connection is
closed; new clients get the same until a backend serves again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from livemig import threads
from livemig.errors import StreamError, UsageError
from livemig.service import link as L
from livemig.service.front import parse_serve_uri
from livemig.sockpath import clear_socket_path

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 1.0
RETRY_S = 0.02  # between two dials while failing over
MAX_UNACKED = 256 << 20  # request bytes held for all clients before reading from them pauses
START_TIMEOUT_S = 10.0


class _Client(asyncio.Protocol):
    """One client connection of the front."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.id = 0
        self.transport: asyncio.Transport | None = None
        self.log = bytearray()  # request bytes from req_base on, not committed yet
        self.req_base = 0
        self.resp_got = 0  # reply bytes written to the client
        self.acked = 0  # reply offset acknowledged to the backend
        self.closed = False

    @property
    def req_end(self) -> int:
        return self.req_base + len(self.log)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.relay._client_open(self)

    def data_received(self, data: bytes) -> None:
        self.relay._client_data(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.relay._client_closed(self)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def fail(self, line: bytes) -> None:
        self.write(line)
        if self.transport is not None:
            self.transport.close()


class _Backend(asyncio.Protocol):
    """A dialled front link."""

    def __init__(self, relay: Relay, address: str) -> None:
        self.relay = relay
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.decoder = L.LinkDecoder()
        self.status: asyncio.Future[tuple[bool, str]] = relay._loop.create_future()
        self.up = False
        self.early: list[L.Frame] = []  # frames behind STATUS, before the link is up
        self.last_in = self.last_out = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(L.LINK_MAGIC)

    def write(self, kind: int, conn: int = 0, off: int = 0, payload: bytes = b"") -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(L.frame(kind, conn, off, payload))
            self.last_out = time.monotonic()

    def data_received(self, data: bytes) -> None:
        self.last_in = time.monotonic()
        self.decoder.receive_data(data)
        try:
            frames = self.decoder.frames()
        except StreamError as exc:
            log.error("front: backend %s: %s", self.address, exc)
            self.close()
            return
        for f in frames:
            if f.kind == L.STATUS:
                if not self.status.done():
                    self.status.set_result((f.off == 1, f.payload.decode(errors="replace")))
            elif self.up:
                self.relay._backend_frame(self, f)
            elif self.status.done():
                self.early.append(f)  # SUCCESSOR comes right behind STATUS

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.status.done():
            self.status.set_result((False, f"closed ({exc or 'no status'})"))
        if self.up:
            self.up = False
            self.relay._backend_lost(self, str(exc) if exc else "its connection closed")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Relay:
    """The front (see the module docstring): clients on ``listen``, the guest at ``backend``."""

    def __init__(
        self,
        listen: str,
        backend: str,
        *,
        heartbeat_timeout: float = 1.0,
        failover_timeout: float = 30.0,
    ) -> None:
        self._where = parse_serve_uri(listen)
        parse_serve_uri(backend, "backend address")
        self.listen_uri = listen
        self.backend = backend
        self.successor: str | None = None
        self.heartbeat_timeout = heartbeat_timeout
        self.failover_timeout = failover_timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threads.Thread(target=self._run, name="front", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._clients: dict[int, _Client] = {}
        self._tag = int.from_bytes(os.urandom(4), "little") << 32
        self._counter = 0
        self.link: _Backend | None = None
        self._dialling: asyncio.Task[None] | None = None
        self._acks: set[int] = set()
        self._paused = False
        self.address = ""
        self._bound_unix: str | None = None  # the socket file this relay made, removed at close
        self.gone: str | None = None
        self.failovers = 0
        self.reconnects = 0
        self.last_outage_ms: float | None = None
        self.history: list[dict[str, Any]] = []
        self._closed = False

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        try:
            fut.result(START_TIMEOUT_S)
        except OSError as exc:
            self.close()
            raise UsageError(f"front {self.listen_uri}: cannot listen: {exc}") from exc
        self._loop.call_soon_threadsafe(self._start_dial, "starting")
        self._loop.call_soon_threadsafe(self._tick)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    async def _listen(self) -> None:
        kind, where = self._where
        if kind == "unix":
            clear_socket_path(where)
            self._server = await self._loop.create_unix_server(lambda: _Client(self), where)
            self.address = f"unix:{where}"
            self._bound_unix = where
        else:
            host, port = where
            self._server = await self._loop.create_server(lambda: _Client(self), host, port,
                                                          reuse_address=True)  # fmt: skip
            self.address = f"tcp:{host}:{self._server.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        self._closed = True
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for c in list(self._clients.values()):
                if c.transport is not None:
                    c.transport.close()
            if self.link is not None:
                self.link.close()
            if self._dialling is not None:
                self._dialling.cancel()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if self._bound_unix is not None:  # not a path it failed to bind: not its file
            with contextlib.suppress(OSError):
                os.unlink(self._bound_unix)

    def info(self) -> dict[str, Any]:
        """For QMP ``x-query-front``."""
        return {
            "address": self.address,
            "backend": self.backend,
            "successor": self.successor,
            "link": self.link is not None and self.link.up,
            "clients": len(self._clients),
            "unacknowledged-bytes": sum(len(c.log) for c in self._clients.values()),
            "failovers": self.failovers,
            "reconnects": self.reconnects,
            "last-outage-ms": self.last_outage_ms,
            "gone": self.gone,
            "history": self.history[-20:],
        }

    # -- clients -----------------------------------------------------------------------------

    def _client_open(self, c: _Client) -> None:
        if self.gone is not None:
            c.fail(f"-ERR livemig: {self.gone}\r\n".encode())
            return
        self._counter += 1
        c.id = self._tag | (self._counter & 0xFFFF_FFFF)
        self._clients[c.id] = c
        if self.link is not None and self.link.up:
            self.link.write(L.OPEN, c.id, 0)
        if self._paused and c.transport is not None:
            c.transport.pause_reading()

    def _client_data(self, c: _Client, data: bytes) -> None:
        if c.id not in self._clients:
            return
        off = c.req_end
        c.log += data
        if self.link is not None and self.link.up:
            self.link.write(L.DATA, c.id, off, data)
        if not self._paused and self._unacked() > MAX_UNACKED:
            self._paused = True
            for other in self._clients.values():
                if other.transport is not None:
                    other.transport.pause_reading()

    def _unacked(self) -> int:
        return sum(len(c.log) for c in self._clients.values())

    def _client_closed(self, c: _Client) -> None:
        if self._clients.pop(c.id, None) is None:
            return
        if self.link is not None and self.link.up:
            self.link.write(L.CLOSE, c.id)

    # -- the backend link ------------------------------------------------------------------

    def _backend_frame(self, b: _Backend, f: L.Frame) -> None:
        if b is not self.link:
            return
        kind = f.kind
        if kind == L.SUCCESSOR:
            new = f.payload.decode(errors="replace") or None
            if new != self.successor:
                log.info("front: %s", f"the standby is {new}" if new else
                         "no standby: the guest is not replicated")  # fmt: skip
            self.successor = new
            return
        if kind == L.HEARTBEAT:
            return
        c = self._clients.get(f.conn)
        if c is None:
            return
        if kind == L.DATA:
            end = f.off + len(f.payload)
            if f.off > c.resp_got:
                c.fail(f"-ERR livemig: replies from byte {f.off} on arrived, {c.resp_got} "
                       "was next (the backend lost some)\r\n".encode())  # fmt: skip
                return
            if end > c.resp_got:
                c.write(f.payload[c.resp_got - f.off :])
                c.resp_got = end
                if not self._acks:
                    self._loop.call_soon(self._send_acks)
                self._acks.add(c.id)
        elif kind == L.ACK:
            n = min(f.off, c.req_end) - c.req_base
            if n > 0:
                del c.log[:n]
                c.req_base += n
                if self._paused and self._unacked() < MAX_UNACKED // 2:
                    self._paused = False
                    for other in self._clients.values():
                        if other.transport is not None:
                            other.transport.resume_reading()
        elif kind == L.CLOSE:
            c.fail(f.payload)

    def _send_acks(self) -> None:
        link = self.link
        for conn in self._acks:
            c = self._clients.get(conn)
            if c is not None and link is not None and link.up and c.resp_got > c.acked:
                link.write(L.ACK, conn, c.resp_got)
                c.acked = c.resp_got
        self._acks.clear()

    def _backend_lost(self, b: _Backend, why: str) -> None:
        if b is not self.link or self._closed:
            return
        self.link = None
        self._lost_at = time.monotonic()
        log.warning("front: lost the backend %s (%s)%s", b.address, why,
                    f"; failing over to {self.successor}" if self.successor else "")  # fmt: skip
        self.history.append({"event": "lost", "backend": b.address, "why": why,
                             "successor": self.successor, "at": time.time()})  # fmt: skip
        self._start_dial(why)

    def _start_dial(self, why: str) -> None:
        if self._dialling is None or self._dialling.done():
            self._dialling = self._loop.create_task(self._dial(why))

    async def _dial(self, why: str) -> None:
        deadline = time.monotonic() + self.failover_timeout
        reasons: dict[str, str] = {}
        while not self._closed:
            cands = [self.backend] + ([self.successor] if self.successor else [])
            for addr in cands:
                ok, reason = await self._try(addr)
                if ok:
                    return
                reasons[addr] = reason
            if self.gone is None and time.monotonic() > deadline:
                told = "; ".join(f"{a}: {r}" for a, r in reasons.items())
                self._give_up(f"the guest's process is gone ({why}) and nobody took it over "
                              f"within {self.failover_timeout:g} s ({told})")  # fmt: skip
            await asyncio.sleep(RETRY_S if self.gone is None else 0.5)

    async def _try(self, addr: str) -> tuple[bool, str]:
        kind, where = parse_serve_uri(addr)
        b = _Backend(self, addr)
        try:
            if kind == "unix":
                coro = self._loop.create_unix_connection(lambda: b, where)
            else:
                coro = self._loop.create_connection(lambda: b, where[0], where[1])
            await asyncio.wait_for(coro, CONNECT_TIMEOUT_S)
            ok, text = await asyncio.wait_for(asyncio.shield(b.status), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            b.close()
            return False, str(exc) or type(exc).__name__
        if not ok:
            b.close()
            return False, text
        self._link_up(b)
        return True, text

    def _link_up(self, b: _Backend) -> None:
        b.up = True
        moved = b.address != self.backend
        if moved:
            self.failovers += 1
            log.warning("front: FAILED OVER to %s (was %s)", b.address, self.backend)
            self.backend = b.address
            self.successor = None  # until the new backend names its own
        elif getattr(self, "_lost_at", None) is not None:
            self.reconnects += 1
        lost = getattr(self, "_lost_at", None)
        if lost is not None:
            self.last_outage_ms = round((time.monotonic() - lost) * 1000, 1)
        self._lost_at = None
        self.link = b
        self.history.append({"event": "failover" if moved else "up", "backend": b.address,
                             "outage-ms": self.last_outage_ms, "at": time.time()})  # fmt: skip
        if self.gone is not None:
            log.info("front: %s serves the guest again", b.address)
            self.gone = None
        for c in self._clients.values():
            b.write(L.OPEN, c.id, c.resp_got)
            c.acked = c.resp_got
            if c.log:
                b.write(L.DATA, c.id, c.req_base, bytes(c.log))
        b.write(L.SYNCED, 0, self._tag >> 32)  # every connection of this front is reopened
        early, b.early = b.early, []
        for f in early:
            self._backend_frame(b, f)

    def _give_up(self, reason: str) -> None:
        self.gone = reason
        log.error("front: %s: closing %d clients", reason, len(self._clients))
        self.history.append({"event": "gone", "why": reason, "at": time.time()})
        line = f"-ERR livemig: {reason}\r\n".encode()
        for c in list(self._clients.values()):
            c.fail(line)
        self._clients.clear()

    def _tick(self) -> None:
        """Heartbeats on the link, and a silent link given up."""
        if self._closed:
            return
        b = self.link
        now = time.monotonic()
        if b is not None and b.up:
            if now - b.last_in > self.heartbeat_timeout:
                log.warning("front: no heartbeat from %s for %.0f ms", b.address,
                            (now - b.last_in) * 1000)  # fmt: skip
                b.up = False
                b.close()
                self._backend_lost(b, f"no heartbeat for {(now - b.last_in) * 1000:.0f} ms")
            elif now - b.last_out >= L.HEARTBEAT_S:
                b.write(L.HEARTBEAT)
        self._loop.call_later(min(L.HEARTBEAT_S, self.heartbeat_timeout / 4), self._tick)


def start_relay(listen: str, backend: str, **kw: Any) -> Relay:
    relay = Relay(listen, backend, **kw)
    relay.start()
    return relay


__all__ = ["Relay", "start_relay"]
