"""livemig-ring: a paravirtual request/response ring in guest RAM with a doorbell (virtio's idea,
simplified), the device a guest service (``kvserver``) is reached through.

Layout (at ``abi.RING_ADDR``; C side in ``guests/src/ring.h``)::

    +0x00000  header: u64 magic; u32 req_prod; u32 req_cons; u32 resp_prod; u32 resp_cons
    +0x01000  RING_SLOTS request slots of RING_SLOT_SIZE bytes (host writes, guest reads)
    +0x21000  RING_SLOTS response slots (guest writes, host reads)

    slot: u64 conn; u32 len; u32 flags (RING_F_MORE: the chain continues); payload

Indices are free-running u32 counters. The host owns ``req_prod`` and ``resp_cons``: they are
the device's migrated state (mirrored into the header for the guest); the guest owns
``req_cons`` and ``resp_prod``, which live in RAM and migrate with it. A *chain* (one or more
slots of one connection) carries whole RESP commands only and enters the ring all at once or
not at all, so a stop never leaves half a request in the ring.

Theory of operation: host code touches the ring only from the guest's own port I/O, on the
vCPU thread (``RING_WAIT_PORT``, ``RING_SPACE_PORT``, ``RING_DOORBELL_PORT``): there it drains
responses to the response handler and moves queued chains into free request slots. So the ring
and the host indices change only while the guest runs, and a stopped machine's RAM and device
state are one consistent snapshot: requests in the ring at switch-over migrate with RAM and
``req_prod``; responses the guest produced but the source did not deliver migrate with RAM and
``resp_cons`` and are delivered by the destination; nothing is lost or answered twice. Chains
still queued on the host (not in the ring) are not device state: the service front forwards
them (``livemig.service``).

Following the service (``livemig.service``): while a migration runs, the source's service front
sets ``follow`` (a ``Follow``: where the destination's front must connect to take the clients
over, and a one-time token); it travels as the optional subsection ``livemig-ring/follow``, sent
only then, and is ``follow`` again on the destination, whose front dials it once the guest runs
there. A ring state without it (an older stream, a snapshot) loads as before.

After a load (``post_load``) the first WAIT or SPACE returns ``RING_WAIT_TOUCH``: the guest
reads every ring page and answers ``RING_SETUP_TOUCHED``. Under post-copy that makes the pages
present by guest faults (vCPUs fault without the GIL), before host code, which holds the GIL,
reads or writes them (see ``livemig.memtrack.uffd`` on why it must not fault).
"""

from __future__ import annotations

import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from livemig import vmstate as vs
from livemig.errors import MachineError
from livemig.machine.abi import (
    RING_ADDR,
    RING_DOORBELL_PORT,
    RING_SETUP_PORT,
    RING_SIZE,
    RING_SPACE_PORT,
    RING_WAIT_PORT,
)
from livemig.machine.devices.base import Device

RING_MAGIC = 0x31474E49524D4C  # "LMRING1"
RING_SLOTS = 32
RING_SLOT_SIZE = 4096
RING_ENTRY_HDR = 16
RING_PAYLOAD = RING_SLOT_SIZE - RING_ENTRY_HDR
RING_REQ_OFF = 0x1000
RING_RESP_OFF = RING_REQ_OFF + RING_SLOTS * RING_SLOT_SIZE
RING_F_MORE = 1
RING_WAIT_TOUCH = 0xFFFF_FFFF
RING_SETUP_INIT = 1
RING_SETUP_TOUCHED = 2
#: The largest chain: it must fit the request ring when the ring is empty.
CHAIN_MAX = RING_SLOTS * RING_PAYLOAD

HEADER = struct.Struct("<QIIII")  # magic, req_prod, req_cons, resp_prod, resp_cons
ENTRY = struct.Struct("<QII")  # conn, len, flags
_REQ_PROD_OFF = 8
_RESP_CONS_OFF = 20
WAIT_TIMEOUT_S = 0.1  # a guest waiting for requests gets control back this often
_MASK = 0xFFFF_FFFF

assert RING_RESP_OFF + RING_SLOTS * RING_SLOT_SIZE <= RING_SIZE
assert ENTRY.size == RING_ENTRY_HDR and HEADER.size <= RING_REQ_OFF

#: Called with [(conn, bytes), ...] in ring order, on the vCPU thread: must not block.
ResponseHandler = Callable[[list[tuple[int, bytes]]], None]

FOLLOW_HOST_MAX = 64
FOLLOW_TLS = 1
FOLLOW_VMSD = vs.vmsd(
    "livemig-ring/follow",
    1,
    [vs.buffer("token", 16), vs.buffer("host", FOLLOW_HOST_MAX), vs.u16("port"), vs.u32("flags")],
)


@dataclass(frozen=True)
class Follow:
    """Where a destination's service front takes the clients over from the source's."""

    token: bytes  # 16 random bytes, one migration's
    host: str
    port: int
    tls: bool = False

    def encode(self) -> dict[str, Any]:
        host = self.host.encode()
        if len(self.token) != 16 or len(host) >= FOLLOW_HOST_MAX or not 0 < self.port < 65536:
            raise MachineError(f"livemig-ring: bad follow address {self.host}:{self.port}")
        return {"token": self.token, "host": host.ljust(FOLLOW_HOST_MAX, b"\0"),
                "port": self.port, "flags": FOLLOW_TLS if self.tls else 0}  # fmt: skip

    @classmethod
    def decode(cls, values: dict[str, Any]) -> Follow:
        raw = bytes(values["host"]).split(b"\0", 1)[0]
        try:
            host = raw.decode("ascii")
        except UnicodeDecodeError:
            raise MachineError(f"livemig-ring: follow host {raw!r} is not text") from None
        if not host or not 0 < values["port"] < 65536 or values["flags"] & ~FOLLOW_TLS:
            raise MachineError(f"livemig-ring: bad follow subsection {values!r}")
        return cls(bytes(values["token"]), host, values["port"], bool(values["flags"] & 1))


class RingDevice(Device):
    """The request/response ring; ``ring`` is a writable view of the ring area of guest RAM."""

    idstr: ClassVar[str] = "livemig-ring"
    ports: ClassVar[tuple[range, ...]] = (
        range(RING_DOORBELL_PORT, RING_DOORBELL_PORT + 4),
        range(RING_WAIT_PORT, RING_WAIT_PORT + 4),
        range(RING_SPACE_PORT, RING_SPACE_PORT + 4),
        range(RING_SETUP_PORT, RING_SETUP_PORT + 4),
    )
    vmsd = vs.vmsd(
        "livemig-ring",
        1,
        [
            vs.u32("enabled"),
            vs.u32("req_prod"),
            vs.u32("resp_cons"),
            # The guest's indices as they were at the save: what was in flight (informational,
            # they travel in RAM; a destination can check RAM against them).
            vs.u32("req_cons"),
            vs.u32("resp_prod"),
        ],
        subsections=[FOLLOW_VMSD],
    )

    def __init__(self, ring: memoryview) -> None:
        if len(ring) != RING_SIZE:
            raise MachineError(f"livemig-ring: ring area is {len(ring)} bytes, want {RING_SIZE}")
        self._ring: memoryview | None = ring
        self.enabled = 0
        self.req_prod = 0
        self.resp_cons = 0
        self.req_cons = 0
        self.resp_prod = 0
        self.needs_touch = False
        self._cond = threading.Condition()
        self._pending: deque[tuple[int, bytes]] = deque()  # chains not yet in the ring
        self._running = False
        self._handler: ResponseHandler | None = None
        self._orphans: list[tuple[int, bytes]] = []  # responses drained with no handler set
        self.requests = 0  # chains put into the ring
        self.responses = 0  # response slots drained
        self.follow: Follow | None = None  # see "Following the service" above

    # -- host side ---------------------------------------------------------------------------

    def set_response_handler(self, handler: ResponseHandler | None) -> None:
        """Where drained responses go; responses drained before a handler was set are kept."""
        with self._cond:
            self._handler = handler
            held, self._orphans = self._orphans, []
        if handler is not None and held:
            handler(held)

    def submit(self, conn: int, data: bytes) -> None:
        """Queue one chain (whole RESP commands of connection ``conn``) for the guest."""
        if not 0 < len(data) <= CHAIN_MAX:
            raise MachineError(
                f"livemig-ring: a chain of {len(data)} bytes (conn {conn:#x}) does not fit"
                f" the ring (1..{CHAIN_MAX} bytes)"
            )
        with self._cond:
            self._pending.append((conn, data))
            self._cond.notify_all()

    def take_pending(self) -> list[tuple[int, bytes]]:
        """Remove and return the chains that never entered the ring (in submission order)."""
        with self._cond:
            out = list(self._pending)
            self._pending.clear()
            return out

    def pending_counts(self) -> dict[int, int]:
        """Chains still queued on the host (not in the ring), per connection."""
        out: dict[int, int] = {}
        with self._cond:
            for conn, _data in self._pending:
                out[conn] = out.get(conn, 0) + 1
        return out

    def pending_bytes(self) -> int:
        with self._cond:
            return sum(len(d) for _, d in self._pending)

    # -- ring access (vCPU thread, under _cond) -----------------------------------------------

    def _view(self) -> memoryview:
        if self._ring is None:
            raise MachineError("livemig-ring: the device is closed")
        return self._ring

    def _guest_indices(self) -> tuple[int, int]:
        _magic, _rp, req_cons, resp_prod, _rc = HEADER.unpack_from(self._view(), 0)
        return req_cons, resp_prod

    def _fill(self, req_cons: int) -> None:
        view = self._view()
        free = RING_SLOTS - ((self.req_prod - req_cons) & _MASK)
        moved = False
        while self._pending:
            conn, data = self._pending[0]
            nslots = -(-len(data) // RING_PAYLOAD)
            if nslots > free:
                break  # whole chains only: see the module docstring
            self._pending.popleft()
            for i in range(nslots):
                piece = data[i * RING_PAYLOAD : (i + 1) * RING_PAYLOAD]
                off = RING_REQ_OFF + (self.req_prod % RING_SLOTS) * RING_SLOT_SIZE
                flags = RING_F_MORE if i + 1 < nslots else 0
                ENTRY.pack_into(view, off, conn, len(piece), flags)
                view[off + RING_ENTRY_HDR : off + RING_ENTRY_HDR + len(piece)] = piece
                self.req_prod = (self.req_prod + 1) & _MASK
            free -= nslots
            self.requests += 1
            moved = True
        if moved:  # payload first, then the index the guest polls (x86 keeps store order)
            struct.pack_into("<I", view, _REQ_PROD_OFF, self.req_prod)

    def _drain(self, resp_prod: int) -> list[tuple[int, bytes]]:
        view = self._view()
        out: list[tuple[int, bytes]] = []
        n = (resp_prod - self.resp_cons) & _MASK
        if n > RING_SLOTS:
            raise MachineError(
                f"livemig-ring: guest resp_prod {resp_prod} is {n} slots ahead of resp_cons"
                f" {self.resp_cons} (ring has {RING_SLOTS})"
            )
        for _ in range(n):
            off = RING_RESP_OFF + (self.resp_cons % RING_SLOTS) * RING_SLOT_SIZE
            conn, length, _flags = ENTRY.unpack_from(view, off)
            if length > RING_PAYLOAD:
                raise MachineError(
                    f"livemig-ring: response slot {self.resp_cons} claims {length} bytes"
                    f" (at most {RING_PAYLOAD})"
                )
            data = bytes(view[off + RING_ENTRY_HDR : off + RING_ENTRY_HDR + length])
            if out and out[-1][0] == conn:
                out[-1] = (conn, out[-1][1] + data)
            else:
                out.append((conn, data))
            self.resp_cons = (self.resp_cons + 1) & _MASK
        if n:
            struct.pack_into("<I", view, _RESP_CONS_OFF, self.resp_cons)
            self.responses += n
        return out

    def _deliver(self, out: list[tuple[int, bytes]]) -> None:
        if not out:
            return
        handler = self._handler
        if handler is None:
            with self._cond:
                self._orphans.extend(out)
            return
        handler(out)

    # -- guest side --------------------------------------------------------------------------

    def io_read(self, cpu: int, port: int, size: int) -> int:
        if port == RING_WAIT_PORT:
            return self._wait_requests()
        if port == RING_SPACE_PORT:
            with self._cond:
                if not self.enabled:
                    return 0
                if self.needs_touch:
                    return RING_WAIT_TOUCH
                req_cons, resp_prod = self._guest_indices()
                out = self._drain(resp_prod)
                self._fill(req_cons)
                free = RING_SLOTS - ((resp_prod - self.resp_cons) & _MASK)
            self._deliver(out)
            return free
        return super().io_read(cpu, port, size)

    def _wait_requests(self) -> int:
        with self._cond:
            if not self.enabled:
                return 0
            if self.needs_touch:
                return RING_WAIT_TOUCH
            req_cons, resp_prod = self._guest_indices()
            out = self._drain(resp_prod)
            self._fill(req_cons)
            deadline = time.monotonic() + WAIT_TIMEOUT_S
            while self._running and self.req_prod == req_cons:
                if out:  # hand responses over before sleeping
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
                self._fill(req_cons)
            avail = (self.req_prod - req_cons) & _MASK
        self._deliver(out)
        return avail

    def io_write(self, cpu: int, port: int, size: int, value: int) -> None:
        if port == RING_DOORBELL_PORT:
            with self._cond:
                if not self.enabled or self.needs_touch:
                    return
                _req_cons, resp_prod = self._guest_indices()
                out = self._drain(resp_prod)
            self._deliver(out)
        elif port == RING_SETUP_PORT:
            with self._cond:
                if value == RING_SETUP_INIT:
                    magic = HEADER.unpack_from(self._view(), 0)[0]
                    if magic != RING_MAGIC:
                        raise MachineError(
                            f"livemig-ring: guest enabled the ring with magic {magic:#x}"
                            f" at {RING_ADDR:#x} (want {RING_MAGIC:#x})"
                        )
                    self.enabled = 1
                    self.req_prod = self.resp_cons = 0
                    self.needs_touch = False
                    view = self._view()
                    struct.pack_into("<I", view, _REQ_PROD_OFF, 0)
                    struct.pack_into("<I", view, _RESP_CONS_OFF, 0)
                elif value == RING_SETUP_TOUCHED:
                    self.needs_touch = False

    def vm_state_change(self, running: bool) -> None:
        with self._cond:
            self._running = running
            self._cond.notify_all()  # a vCPU waiting for requests returns so it can stop

    # -- state -------------------------------------------------------------------------------

    def pre_save(self) -> None:
        with self._cond:
            if self.enabled and not self.needs_touch:
                self.req_cons, self.resp_prod = self._guest_indices()

    def post_load(self) -> None:
        with self._cond:
            self.needs_touch = bool(self.enabled)

    def save_state(self) -> dict[str, Any]:
        out = super().save_state()
        follow = self.follow
        if follow is not None:
            out[FOLLOW_VMSD.name] = follow.encode()
        return out

    def load_state(self, values: dict[str, Any]) -> None:
        sub = values.get(FOLLOW_VMSD.name)
        follow = Follow.decode(sub) if sub is not None else None
        super().load_state(values)
        self.follow = follow

    def in_flight(self) -> dict[str, int]:
        """Counts for status reports: requests in the ring, queued on the host, delivered."""
        with self._cond:
            if self.enabled and not self.needs_touch:
                req_cons, resp_prod = self._guest_indices()
            else:
                req_cons, resp_prod = self.req_cons, self.resp_prod
            return {
                "ring-requests": (self.req_prod - req_cons) & _MASK,
                "ring-responses": (resp_prod - self.resp_cons) & _MASK,
                "queued-chains": len(self._pending),
                "requests": self.requests,
                "responses": self.responses,
            }

    def close(self) -> None:
        with self._cond:
            self._ring = None
            self._running = False
            self._cond.notify_all()
