"""The guest's end of front links (``service/link.py``) and the service's part of COLO.

``ServiceFront`` mixes this in. It adds, on the ``--serve`` address itself (a connection that
opens with ``LINK_MAGIC`` is a front link, anything else a client):

* **front links**: every connection of a ``livemig front`` is a ``LinkEndpoint``, with the
  offsets of its two byte streams. Request bytes are framed into whole commands as a client's
  are; the offset where each chain ends is remembered until the guest takes the chain into its
  ring (the ring device says which chains are still queued), which is what *committed* means.
  Replies are kept from the front's last ``ACK`` on, so a front that reconnects (to this
  process or to its standby) gets them again from wherever it had them.
* **output commit** (Remus) while the guest is replicated: replies the guest produces in the
  epoch before checkpoint N are held, for every client, until the standby acknowledged N.
  Everything is counted in bytes: a checkpoint records, per connection, how many reply bytes
  the guest had produced (``_marks``); its acknowledgement releases up to there.
* the ``ColoParticipant`` of ``migration/colo.py``: the section ``x-colo-service`` of each
  checkpoint holds the state of the front connections (``encode_service_state``); a standby
  keeps the last one it applied and, when it takes over, restores those connections detached,
  waiting for the front to reconnect and resend what it has not had acknowledged.

Direct clients of a replicated guest (not through a front) get output commit too, but their
connections end with the primary's process: only a front's clients survive a failover.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from livemig import vmstate as vs
from livemig.errors import LivemigError, StreamError
from livemig.machine import RunState
from livemig.machine.devices.ring import CHAIN_MAX
from livemig.service import link as L
from livemig.service.resp import RequestFramer

log = logging.getLogger(__name__)

SERVICE_IDSTR = "x-colo-service"
SERVICE_STATE_MAX = 256 << 20
SERVICE_VMSD = vs.vmsd(
    SERVICE_IDSTR, 1, [vs.u32("size"), vs.vbuffer("state", "size", SERVICE_STATE_MAX)]
)
L_TUNNEL_DATA = 2  # front.DATA, the follow tunnel's frame type
DETACHED_TTL_S = 60.0  # a front connection whose link is gone waits this long for a reconnect
LINK_IDLE_TIMEOUT_S = 10.0  # a link silent this long is closed (a front heartbeats 4x a second)
CALL_TIMEOUT_S = 10.0


class LinkEndpoint:
    """One client of a front, as this process sees it (see the module docstring). Shares the
    endpoint interface of ``front._Endpoint`` (``id``, ``framer``, ``respond``, ``send``,
    ``close``, ``fail``)."""

    def __init__(self, conn_id: int, link: _Link | None, committed: int = 0) -> None:
        self.id = conn_id
        self.link = link
        self.framer = RequestFramer(CHAIN_MAX)
        self.framer.offset = committed
        self.req_off = committed  # request bytes received (the framer's input)
        self.committed = committed  # request bytes the guest has taken in
        self.ends: deque[int] = deque()  # where each chain not known taken in ends
        self.produced = 0  # reply bytes the guest produced
        self.released = 0  # ... of which may go out
        self.log = bytearray()  # released replies from log_start on, until the front has them
        self.log_start = 0
        self._held = bytearray()  # produced, not released
        self.detached_at: float | None = None if link is not None else time.monotonic()

    # -- replies -------------------------------------------------------------------------

    def respond(self, data: bytes, release: bool) -> None:
        self.produced += len(data)
        self._held += data
        if release:
            self.release(self.produced)

    def release(self, upto: int) -> None:
        n = min(upto, self.produced) - self.released
        if n <= 0:
            return
        data = bytes(self._held[:n])
        del self._held[:n]
        self.released += n
        self.send(data)

    def send(self, data: bytes) -> None:
        """Released reply bytes: kept until the front acknowledges them, sent if linked."""
        off = self.log_start + len(self.log)
        self.log += data
        if self.link is not None:
            self.link.write(L.DATA, self.id, off, data)

    def confirmed(self, upto: int) -> None:
        """The front has the replies up to ``upto``."""
        n = min(upto, self.log_start + len(self.log)) - self.log_start
        if n > 0:
            del self.log[:n]
            self.log_start += n

    def resend_from(self, have: int) -> None:
        """A front (re)opened this connection holding ``have`` reply bytes."""
        if have < self.log_start or have > self.released:
            raise StreamError(f"front connection {self.id:#x}: it has {have} reply bytes, this "
                              f"process kept {self.log_start}..{self.released}")  # fmt: skip
        self.confirmed(have)
        if self.log and self.link is not None:
            self.link.write(L.DATA, self.id, self.log_start, bytes(self.log))

    def state(self) -> L.ConnState:
        return L.ConnState(self.id, self.committed, self.produced, self.log_start,
                           bytes(self.log) + bytes(self._held))  # fmt: skip

    @classmethod
    def restore(cls, cs: L.ConnState) -> LinkEndpoint:
        ep = cls(cs.conn, None, cs.committed)
        ep.produced = ep.released = cs.produced
        ep.log_start = cs.log_start
        ep.log = bytearray(cs.log)
        return ep

    # -- requests ------------------------------------------------------------------------

    def note_chains(self, chains: list[bytes]) -> None:
        """Remember where the chains just framed end (the framer's offset is the last end)."""
        end = self.framer.offset
        ends = []
        for chain in reversed(chains):
            ends.append(end)
            end -= len(chain)
        self.ends.extend(reversed(ends))

    def taken_in(self, still_queued: int) -> int:
        """Committed offset given how many of its chains the ring device still queues."""
        while len(self.ends) > still_queued:
            self.committed = self.ends.popleft()
        return self.committed

    # -- the connection ------------------------------------------------------------------

    def close(self) -> None:
        if self.link is not None:
            self.link.write(L.CLOSE, self.id)

    def fail(self, line: bytes) -> None:
        if self.link is not None:
            self.link.write(L.CLOSE, self.id, 0, line)


class _Link(asyncio.Protocol):
    """One front link (after its magic): frames in, the backend's handlers out."""

    def __init__(self, backend: LinkBackend, transport: asyncio.Transport) -> None:
        self.backend = backend
        self.transport = transport
        self.decoder = L.LinkDecoder()
        self.ids: set[int] = set()
        self.last_in = self.last_out = time.monotonic()
        self.up = False

    def write(self, kind: int, conn: int = 0, off: int = 0, payload: bytes = b"") -> None:
        if not self.transport.is_closing():
            self.transport.write(L.frame(kind, conn, off, payload))
            self.last_out = time.monotonic()

    def feed(self, data: bytes) -> None:
        self.last_in = time.monotonic()
        self.decoder.receive_data(data)
        try:
            frames = self.decoder.frames()
        except StreamError as exc:
            log.error("serve: front link: %s; closing it", exc)
            self.transport.close()
            return
        for f in frames:
            self.backend._link_frame(self, f)


class LinkBackend:
    """Front links, output commit and COLO participation for ``ServiceFront``."""

    # provided by ServiceFront
    _loop: asyncio.AbstractEventLoop
    _conns: dict[int, Any]
    device: Any
    machine: Any
    manager: Any
    address: str
    _where: Any
    _gone: str | None
    forwarding: bool
    protocol_errors: int

    def _init_links(self) -> None:
        self._links: set[_Link] = set()
        self._committing = False  # replicated: replies wait for their checkpoint
        self._epoch = 1  # the checkpoint that will hold what the guest does now
        self._marks: dict[int, dict[int, tuple[int, int | None]]] = {}
        self._successor = ""
        self.standby = False  # a COLO standby: the guest does not run here (yet)
        self._restored: list[L.ConnState] = []
        self.links_accepted = 0
        self.replicated = False
        self._ack_pending: set[int] = set()

    def _run_on_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the loop thread and return its result (at once when already there)."""
        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is self._loop:
                return fn(*args)
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def call() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)

        self._loop.call_soon_threadsafe(call)
        return fut.result(CALL_TIMEOUT_S)

    # -- links ---------------------------------------------------------------------------

    def _link_refusal(self) -> str | None:
        if self.standby:
            return "this process is a COLO standby: the guest runs here only after a failover"
        if self.machine.runstate == RunState.INMIGRATE:
            return "the guest has not arrived here yet (incoming migration)"
        if self.forwarding or self._gone is not None:
            return f"the guest is not here any more ({self._gone or 'it migrated'})"
        return None

    def _link_opened(self, transport: asyncio.Transport) -> _Link:
        link = _Link(self, transport)
        why = self._link_refusal()
        if why is not None:
            link.write(L.STATUS, 0, 0, why.encode())
            transport.close()
            return link
        link.up = True
        self._links.add(link)
        self.links_accepted += 1
        link.write(L.STATUS, 0, 1, b"serving")
        link.write(L.SUCCESSOR, 0, 0, self._successor.encode())
        if len(self._links) == 1:
            self._loop.call_later(L.HEARTBEAT_S, self._link_heartbeats)
        return link

    def _link_heartbeats(self) -> None:
        now = time.monotonic()
        for link in list(self._links):
            if now - link.last_in > LINK_IDLE_TIMEOUT_S:
                log.warning("serve: front link silent for %.0f s: closing it", now - link.last_in)
                link.transport.close()
            elif now - link.last_out >= L.HEARTBEAT_S:
                link.write(L.HEARTBEAT)
        for conn in [c for c, ep in self._conns.items() if isinstance(ep, LinkEndpoint)
                     and ep.detached_at is not None
                     and now - ep.detached_at > DETACHED_TTL_S]:  # fmt: skip
            log.info("serve: front connection %#x: no front came back for it", conn)
            self._conns.pop(conn, None)
        if self._links or any(isinstance(ep, LinkEndpoint) for ep in self._conns.values()):
            self._loop.call_later(L.HEARTBEAT_S, self._link_heartbeats)

    def _link_lost(self, link: _Link) -> None:
        self._links.discard(link)
        if not link.up:
            return
        now = time.monotonic()
        for conn in link.ids:
            ep = self._conns.get(conn)
            if isinstance(ep, LinkEndpoint) and ep.link is link:
                ep.link = None
                ep.detached_at = now
        log.info("serve: a front link closed; %d of its connections wait for it to come back",
                 len(link.ids))  # fmt: skip

    def _link_frame(self, link: _Link, f: L.Frame) -> None:
        if not link.up:
            return
        kind = f.kind
        if kind == L.HEARTBEAT:
            return
        if kind == L.SYNCED:
            # a reconnected front has reopened all it has: the rest of its connections (ids
            # with its tag in the high half) it closed meanwhile; another front's wait
            gone = [c for c, ep in self._conns.items()
                    if isinstance(ep, LinkEndpoint) and ep.link is None
                    and c >> 32 == f.off]  # fmt: skip
            for conn in gone:
                self._conns.pop(conn, None)
            return
        ep = self._conns.get(f.conn)
        if kind == L.OPEN:
            self._link_open(link, f, ep)
            return
        if not isinstance(ep, LinkEndpoint) or ep.link is not link:
            return  # closed here meanwhile; its CLOSE is on the way
        try:
            if kind == L.DATA:
                self._link_data(ep, f.off, f.payload)
            elif kind == L.ACK:
                ep.confirmed(f.off)
            elif kind == L.CLOSE:
                link.ids.discard(ep.id)
                self._client_closed(ep)  # type: ignore[attr-defined]
        except StreamError as exc:
            self.protocol_errors += 1
            log.error("serve: front connection %#x: %s", ep.id, exc)
            ep.fail(f"-ERR livemig: {exc}\r\n".encode())
            self._conns.pop(ep.id, None)

    def _link_open(self, link: _Link, f: L.Frame, ep: Any) -> None:
        if isinstance(ep, LinkEndpoint):
            if ep.link is not None and ep.link is not link:
                ep.link.ids.discard(ep.id)
            ep.link = link
            ep.detached_at = None
            link.ids.add(ep.id)
            try:
                ep.resend_from(f.off)
            except StreamError as exc:
                ep.fail(f"-ERR livemig: {exc}\r\n".encode())
                self._conns.pop(ep.id, None)
            return
        if ep is not None or f.off:
            why = (f"connection {f.conn:#x} had {f.off} reply bytes that this process never "
                   "produced (its state is not the one the front talked to)") if ep is None \
                else f"connection {f.conn:#x} is already in use here"  # fmt: skip
            link.write(L.CLOSE, f.conn, 0, f"-ERR livemig: {why}\r\n".encode())
            return
        new = LinkEndpoint(f.conn, link)
        link.ids.add(new.id)
        self._client_open(new)  # type: ignore[attr-defined]

    def _link_data(self, ep: LinkEndpoint, off: int, data: bytes) -> None:
        if off > ep.req_off:
            raise StreamError(f"request bytes from {off} on, but {ep.req_off} is the next one "
                              "expected here (bytes are missing)")  # fmt: skip
        skip = ep.req_off - off
        if skip >= len(data):
            return  # a resend of what it has already
        data = data[skip:]
        ep.req_off += len(data)
        tunnel = getattr(self, "_tunnel_out", None)
        if tunnel is not None:
            # the guest migrated (plainly): its destination has these bytes now, and there is
            # no standby to fail over to
            tunnel.frame(L_TUNNEL_DATA, ep.id, data)
            ep.committed = ep.req_off
            if ep.link is not None:
                ep.link.write(L.ACK, ep.id, ep.committed)
            return
        chains = ep.framer.feed(data)
        ep.note_chains(chains)
        for chain in chains:
            self.device.submit(ep.id, chain)

    # -- replies (output commit) ---------------------------------------------------------

    def _respond(self, ep: Any, data: bytes) -> None:
        ep.respond(data, release=not self._committing)
        if not self._committing and isinstance(ep, LinkEndpoint):
            if not self._ack_pending:
                self._loop.call_soon(self._send_acks)
            self._ack_pending.add(ep.id)

    def _send_acks(self) -> None:
        """Unreplicated: acknowledge the requests the guest has taken in (those it answered)."""
        queued = self.device.pending_counts()
        for conn in self._ack_pending:
            ep = self._conns.get(conn)
            if isinstance(ep, LinkEndpoint) and ep.link is not None:
                ep.link.write(L.ACK, conn, ep.taken_in(queued.get(conn, 0)))
        self._ack_pending.clear()

    # -- COLO participant (migration/colo.py) ----------------------------------------------

    def colo_section(self) -> tuple[str, vs.VMStateDescription]:
        return SERVICE_IDSTR, SERVICE_VMSD

    def colo_primary_begin(self, standby: str) -> None:
        self._run_on_loop(self._begin, standby)

    def _begin(self, standby: str) -> None:
        self._committing = True
        self.replicated = True
        self._marks.clear()
        self._successor = standby
        for link in self._links:
            link.write(L.SUCCESSOR, 0, 0, standby.encode())
        log.info("serve: replicated: replies wait for their checkpoint%s",
                 f"; fronts fail over to {standby}" if standby else "")  # fmt: skip

    def colo_capture(self) -> dict[str, Any]:
        raw = self._run_on_loop(self._capture)
        return {"size": len(raw), "state": raw}

    def _capture(self) -> bytes:
        """With the guest stopped: what each connection has in and out (a new epoch begins)."""
        queued = self.device.pending_counts()
        marks: dict[int, tuple[int, int | None]] = {}
        conns: list[L.ConnState] = []
        for ep in self._conns.values():
            committed = None
            if isinstance(ep, LinkEndpoint):
                committed = ep.taken_in(queued.get(ep.id, 0))
                conns.append(ep.state())
            marks[ep.id] = (ep.produced, committed)
        self._marks[self._epoch] = marks
        self._epoch += 1
        return L.encode_service_state(conns)

    def colo_acked(self, number: int) -> None:
        self._loop.call_soon_threadsafe(self._acked, number)

    def _acked(self, number: int) -> None:
        for n in sorted(k for k in self._marks if k <= number):
            for conn, (produced, committed) in self._marks.pop(n).items():
                ep = self._conns.get(conn)
                if ep is None:
                    continue
                ep.release(produced)
                if isinstance(ep, LinkEndpoint) and committed is not None and ep.link:
                    ep.link.write(L.ACK, conn, committed)

    def colo_primary_end(self, reason: str) -> None:
        self._run_on_loop(self._end_replication, reason)

    def _end_replication(self, reason: str) -> None:
        # the fronts hear first that there is no standby any more, then the held replies
        self._successor = ""
        for link in self._links:
            link.write(L.SUCCESSOR, 0, 0, b"")
        self._committing = False
        self.replicated = False
        self._marks.clear()
        queued = self.device.pending_counts()
        for ep in self._conns.values():
            ep.release(ep.produced)
            if isinstance(ep, LinkEndpoint) and ep.link is not None:
                ep.link.write(L.ACK, ep.id, ep.taken_in(queued.get(ep.id, 0)))

    def colo_standby_address(self) -> str:
        self.standby = True
        return self.address if self._where is not None else ""

    def colo_standby_load(self, state: dict[str, Any]) -> None:
        self._restored = L.decode_service_state(bytes(state["state"]))

    def colo_takeover(self) -> None:
        self._run_on_loop(self._takeover)

    def _takeover(self) -> None:
        for cs in self._restored:
            self._conns[cs.conn] = LinkEndpoint.restore(cs)
        n = len(self._restored)
        self._restored = []
        self.standby = False
        if n:
            log.info("serve: took over %d front connections; they wait for their front", n)
            self._loop.call_later(L.HEARTBEAT_S, self._link_heartbeats)

    def link_info(self) -> dict[str, Any]:
        linked = [ep for ep in self._conns.values() if isinstance(ep, LinkEndpoint)]
        return {
            "front-links": len(self._links),
            "front-connections": len(linked),
            "front-connections-detached": sum(ep.link is None for ep in linked),
            "replicated": self.replicated,
            "standby": self.standby,
            "successor": self._successor or None,
        }


def link_error(exc: LivemigError) -> bytes:
    return f"-ERR livemig: {exc}\r\n".encode()
