"""Continuous replication to a standby: Remus's checkpoints under QEMU's COLO names.

Capability ``x-colo`` turns a migration into replication. The first migration runs as any
pre-copy migration, except that its stream carries ENABLE_COLO and that at its end the source
keeps its guest: the destination loads everything, does *not* run the guest, and answers
CHECKPOINT_READY. From then on the source is the **primary** (migration status ``colo``) and
the destination the **standby**.

The primary (``ColoPrimary``, on the migration thread), every ``x-checkpoint-delay`` ms:

1. stops the guest (run state ``colo``), syncs the dirty log, *copies* the pages written since
   the last checkpoint into a buffer, saves CPU and device state and the service front's state
   (``ColoParticipant``: which client bytes the guest has taken in, which replies it has
   produced), and runs the guest again. Only this is the guest's pause (Remus's speculative
   execution: the guest goes on while its last checkpoint travels);
2. sends the checkpoint (``wire/colo.py``: QEMU's messages; the RAM part and the device part
   are sections of the normal stream format) and waits for the standby's VMSTATE_LOADED;
3. on that acknowledgement tells the participants, which release what the guest said in the
   checkpointed epoch (**output commit**: a client never sees a reply produced by state the
   standby does not have).

The standby (``ColoSecondary``, on the incoming thread) buffers each checkpoint until its last
byte (``CheckpointReader``), then applies it at once (pages, CPU and devices, the participants'
state) and acknowledges. A checkpoint cut short changes nothing.

**Failover.** The standby takes over (migration ``completed``, guest ``running``, event
``COLO_EXIT``) from its last complete checkpoint when the primary's connection closes (a
killed process: the kernel closes its sockets), when nothing came from it for
``x-colo-heartbeat-timeout`` ms (a dead host, a cut link: the primary sends ``X_HEARTBEAT``
when it has nothing else to send), or at once on ``x-colo-lost-heartbeat``. It does *not* take
over when the primary said ``X_EXIT`` (replication ended on purpose) or sent a malformed
checkpoint (the primary is alive; the standby stands down and says why). The primary stops
replicating and goes on alone, saying so (``COLO_EXIT`` reason ``error``, the log,
``query-colo-status``), when the standby's side closes, is silent past the heartbeat time-out,
reports an error, or leaves a checkpoint unacknowledged for ``x-colo-checkpoint-timeout`` ms
(it cannot keep up): the guest's pause stays one capture long whatever the link does, and held
replies wait at most that long. Before any reply of the unreplicated guest goes out, the
participants are told (``colo_primary_end``), so a client front never fails over to a standby
that lacks what its clients were told (``docs/replication.md``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from livemig import threads
from livemig.errors import LivemigError, MigrationError, StreamError
from livemig.machine.abi import PAGE_SIZE
from livemig.machine.runstate import RunState
from livemig.migration.state import MigrationStatus
from livemig.savevm import checksum as CK
from livemig.savevm.devices import (
    GLOBALSTATE_VMSD,
    decode_globalstate,
    descriptions,
    encode_globalstate,
    machine_entries,
)
from livemig.transport import ChannelError, ChannelTimeout
from livemig.vmstate import VMStateDescription
from livemig.wire import colo as W
from livemig.wire import events as E
from livemig.wire import returnpath as RP
from livemig.wire.decoder import Decoder

log = logging.getLogger(__name__)

CM = W.ColoMessage
SEND_CHUNK = 256 << 10  # a checkpoint goes out in pieces: time-outs are checked between them
GROUP_PAGES = 64  # pages per group of records (a checkpoint may be abandoned between groups)
RECV_TICK = 0.05  # the standby's read wakes this often to look at the clock and requests
STATS_KEPT = 4096  # checkpoints whose pause, size and acknowledgement time are kept


class ColoParticipant(Protocol):
    """Host-side state that must travel with the guest's checkpoints (the service front)."""

    def colo_section(self) -> tuple[str, VMStateDescription]:
        """The FULL section (idstr, layout) that carries this participant's state."""

    def colo_primary_begin(self, standby: str) -> None:
        """Replication is established; ``standby`` is where the standby will serve clients
        after it takes over (its service address, or "")."""

    def colo_capture(self) -> dict[str, Any]:
        """The state at this checkpoint (called with the guest stopped); a new epoch begins."""

    def colo_acked(self, number: int) -> None:
        """The standby holds checkpoint ``number``: release what its epoch held back."""

    def colo_primary_end(self, reason: str) -> None:
        """Replication is over; the guest goes on unreplicated here (release everything)."""

    def colo_standby_address(self) -> str:
        """Where this process serves clients once it has taken over ("" when nowhere)."""

    def colo_standby_load(self, state: dict[str, Any]) -> None:
        """The state of a checkpoint the standby applied."""

    def colo_takeover(self) -> None:
        """The standby takes over: serve from the last applied state."""


@dataclass
class ColoStats:
    """What replication has done, for ``query-colo-status`` and the benchmark."""

    checkpoints: int = 0
    acked: int = 0
    bytes: int = 0
    pages: int = 0
    late: int = 0  # checkpoints that took longer than the interval to be acknowledged
    pauses: deque[float] = field(default_factory=lambda: deque(maxlen=STATS_KEPT))
    sizes: deque[int] = field(default_factory=lambda: deque(maxlen=STATS_KEPT))
    acks: deque[float] = field(default_factory=lambda: deque(maxlen=STATS_KEPT))
    max_pause: float = 0.0
    # (number, pause s, bytes, acknowledged after s) of the last checkpoints
    recent: deque[tuple[int, float, int, float]] = field(
        default_factory=lambda: deque(maxlen=STATS_KEPT)
    )

    parts: deque[tuple[float, ...]] = field(default_factory=lambda: deque(maxlen=STATS_KEPT))

    def records(self) -> list[dict[str, Any]]:
        """One per acknowledged checkpoint; ``pause-parts-ms``: stop, dirty-log sync, copy,
        device state, service state, resume."""
        parts = {n: p for n, p in zip(range(self.checkpoints - len(self.parts) + 1,
                                            self.checkpoints + 1), self.parts, strict=True)}  # fmt: skip
        return [{"checkpoint": n, "pause-ms": round(p * 1000, 3), "bytes": b,
                 "ack-ms": round(a * 1000, 3), "pause-parts-ms": list(parts.get(n, ()))}
                for n, p, b, a in self.recent]  # fmt: skip

    def query(self) -> dict[str, Any]:
        out: dict[str, Any] = {"checkpoints": self.checkpoints, "acknowledged": self.acked,
                               "bytes": self.bytes, "pages": self.pages, "late": self.late}  # fmt: skip
        if self.pauses:
            p = np.array(self.pauses) * 1000
            out["pause-ms"] = {"p50": round(float(np.percentile(p, 50)), 3),
                               "p99": round(float(np.percentile(p, 99)), 3),
                               "max": round(self.max_pause * 1000, 3)}  # fmt: skip
        if self.sizes:
            out["bytes-per-checkpoint"] = {"p50": int(np.percentile(self.sizes, 50)),
                                           "max": int(max(self.sizes))}  # fmt: skip
        if self.acks:
            a = np.array(self.acks) * 1000
            out["ack-ms"] = {"p50": round(float(np.percentile(a, 50)), 3),
                             "p99": round(float(np.percentile(a, 99)), 3)}  # fmt: skip
        return out


@dataclass
class _Captured:
    number: int
    taken_at: float
    pages: list[tuple[str, np.ndarray, np.ndarray]]  # (block, page indexes, (n, 4096) copy)
    states: list[tuple[str, int, VMStateDescription, dict[str, Any]]]


class ColoEnded(LivemigError):
    """Replication ended (the reason is the message)."""


class _Requested(ColoEnded):
    """Replication ended because it was asked to (``x-colo-lost-heartbeat``, cancel)."""


def _exit_event(emit: Any, mode: str, reason: str) -> None:
    emit("COLO_EXIT", {"mode": mode, "reason": reason})


class ColoPrimary:
    """The primary's side of replication, run by ``OutgoingMigration`` once its first
    migration has sent everything (see the module docstring)."""

    def __init__(self, mig: Any, participants: list[ColoParticipant], emit: Any) -> None:
        self.mig = mig
        self.participants = participants
        self.emit = emit
        self.stats = ColoStats()
        self.standby = ""  # the standby's service address (CHECKPOINT_READY's text)
        self.active = False
        self.ended = False
        self.reason = "none"  # QEMU's COLOExitReason once ended: request or error
        self.error: str | None = None
        self._cv = threading.Condition()
        self._ready = False
        self._loaded = 0  # the last checkpoint the standby acknowledged
        self._last_heard = time.monotonic()
        self._rp_closed: str | None = None
        self._exit_request: str | None = None
        self._sections = {p.colo_section()[0]: p for p in participants}
        self._abandon: bytes | None = None  # ends the live state of a checkpoint being sent
        self.sending = 0  # the checkpoint being sent, if one is

    # -- from other threads ----------------------------------------------------------------

    def on_rp(self, msg: RP.XColo) -> None:
        """A standby message, on the return-path thread."""
        now = time.monotonic()
        with self._cv:
            self._last_heard = now
            if msg.msg == CM.CHECKPOINT_READY:
                self._ready = True
                self.standby = msg.text
            elif msg.msg == CM.VMSTATE_LOADED:
                self._loaded = max(self._loaded, msg.value)
            self._cv.notify_all()

    def heard(self) -> None:
        """Any return-path message: the standby is alive."""
        with self._cv:
            self._last_heard = time.monotonic()

    def rp_closed(self, why: str) -> None:
        with self._cv:
            self._rp_closed = why
            self._cv.notify_all()

    def request_exit(self, why: str) -> None:
        """``x-colo-lost-heartbeat`` or ``migrate_cancel`` on the primary: stop replicating."""
        with self._cv:
            self._exit_request = why
            self._cv.notify_all()

    # -- the migration thread -------------------------------------------------------------

    def run(self, t_stop: float) -> None:
        """The first migration has sent everything (guest stopped): wait for the standby,
        then checkpoint until replication ends. Errors before the standby is ready fail the
        migration (the caller restarts the guest); later ones end replication only."""
        mig = self.mig
        params = mig.config.params
        try:
            self._start()
        except BaseException:
            # the guest goes on here (the caller restarts it): a standby that loaded it all
            # must not take over when this connection closes, and nothing is held for it
            self._say_exit()
            for p in self.participants:
                try:
                    p.colo_primary_end("replication did not start")
                except Exception:
                    log.exception("COLO: participant %r did not end cleanly", p)
            raise
        m = mig.machine
        # the first migration's blackout ends here: the guest runs on, replicated
        m.set_runstate(RunState.RUNNING if mig._was_running else RunState.PAUSED)
        mig._stopped_guest = False
        t_run = time.monotonic()
        mig.stats.set_downtime(t_stop, t_run)
        mig.stats.total_time = t_run - mig.stats.start
        log.info("COLO: replicating to the standby every %d ms%s", params["x-checkpoint-delay"],
                 f" (it serves at {self.standby} after a failover)" if self.standby else "")  # fmt: skip
        mig.channel.timeout = params["x-colo-heartbeat-timeout"] / 1000
        try:
            self._loop()
        except _Requested as exc:
            self._end("request", str(exc))
        except ColoEnded as exc:
            self._end("error", str(exc))
        except (LivemigError, OSError) as exc:
            self._end("error", f"the standby was lost: {exc}")
        except BaseException as exc:
            log.exception("COLO primary crashed")
            self._end("error", f"internal error: {exc!r}")
            raise

    def _start(self) -> None:
        """Wait for CHECKPOINT_READY, then tell the participants (the guest is stopped)."""
        mig = self.mig
        timeout = mig.config.params["x-io-timeout"] / 1000
        with self._cv:
            if not self._cv.wait_for(lambda: self._ready or self._rp_closed or
                                     mig._rp_reason or mig._cancel.is_set(), timeout):  # fmt: skip
                raise MigrationError(f"the standby did not report ready within {timeout:g} s")
        if not self._ready:
            mig._check_cancel()
            raise MigrationError((mig._rp_reason and mig._refused()) or self._rp_closed or
                                 "the standby did not report ready")  # fmt: skip
        if hasattr(mig.tracker, "cool"):
            mig.tracker.cool()  # hot chunks would resend 2 MiB a chunk at every checkpoint
        for p in self.participants:
            p.colo_primary_begin(self.standby)
        mig.state.move(MigrationStatus.COLO)
        self.active = True

    def _say_exit(self) -> None:
        """X_EXIT, if the standby can still hear it: it must not take over. A checkpoint being
        sent is abandoned first between two records: its live state ends there, and X_EXIT
        takes the place of its device state (the standby drops it and stands down)."""
        ch = self.mig.channel
        if ch is None:
            return
        try:
            ch.timeout = min(ch.timeout or 1.0, 1.0)
            ch.send((self._abandon or b"") + W.message(CM.X_EXIT))
        except ChannelError:
            pass

    def _loop(self) -> None:
        mig = self.mig
        params = mig.config.params
        last_sent = last_taken = time.monotonic()
        while True:
            delay = params["x-checkpoint-delay"] / 1000
            due = last_taken + delay
            hb = params["x-colo-heartbeat-timeout"] / 1000
            with self._cv:
                while True:
                    self._check(hb)
                    now = time.monotonic()
                    if now >= due:
                        break
                    if now - last_sent >= hb / 4:
                        break
                    self._cv.wait(min(due, last_sent + hb / 4) - now)
            if time.monotonic() < due:
                mig.channel.send(W.message(CM.X_HEARTBEAT))
                last_sent = time.monotonic()
                continue
            if mig.machine.runstate in (RunState.SHUTDOWN, RunState.INTERNAL_ERROR):
                raise ColoEnded(f"the guest ended ({mig.machine.runstate.value}): nothing "
                                "left to replicate")  # fmt: skip
            cp = self._capture()
            last_taken = cp.taken_at
            self._send(cp)
            last_sent = time.monotonic()
            self._await_ack(cp, delay)

    def _check(self, hb: float, requests: bool = True) -> None:
        """Raise ``ColoEnded`` if replication must end now (called under ``_cv``)."""
        mig = self.mig
        if requests and self._exit_request is not None:
            raise _Requested(self._exit_request)
        if mig._rp_reason is not None:
            raise ColoEnded(f"the standby reported an error: {mig._rp_reason}")
        if self._rp_closed is not None:
            raise ColoEnded(f"the standby's connection closed: {self._rp_closed}")
        silent = time.monotonic() - self._last_heard
        if silent > hb:
            raise ColoEnded(f"no heartbeat from the standby for {silent * 1000:.0f} ms "
                            f"(x-colo-heartbeat-timeout {hb * 1000:.0f} ms)")  # fmt: skip

    # -- one checkpoint -------------------------------------------------------------------

    def _capture(self) -> _Captured:
        mig = self.mig
        m = mig.machine
        t0 = time.monotonic()
        number = self.stats.checkpoints + 1
        with m.stopped_in(RunState.COLO) as found:
            t_stopped = time.monotonic()
            bitmaps = mig.tracker.sync()
            t_synced = time.monotonic()
            pages = []
            for block in m.ram_blocks:
                idx = np.flatnonzero(bitmaps[block.idstr])
                if len(idx):
                    pages.append((block.idstr, idx, block.array.reshape(-1, PAGE_SIZE)[idx]))
            t_copied = time.monotonic()
            states = [(e.idstr, e.instance_id, e.vmsd, e.save()) for e in machine_entries(m)]
            running = found in (RunState.RUNNING, RunState.COLO)
            states.append(("globalstate", 0, GLOBALSTATE_VMSD,
                           encode_globalstate("running" if running else "paused")))  # fmt: skip
            t_saved = time.monotonic()
            for idstr, p in self._sections.items():
                states.append((idstr, 0, p.colo_section()[1], p.colo_capture()))
            t_service = time.monotonic()
        pause = time.monotonic() - t0
        # where a pause goes (ms): stopping the vCPUs, the dirty log, the copy, CPU and device
        # state, the service's state, running the vCPUs again
        self.stats.parts.append(tuple(round(x * 1000, 3) for x in (
            t_stopped - t0, t_synced - t_stopped, t_copied - t_synced, t_saved - t_copied,
            t_service - t_saved, t0 + pause - t_service)))  # fmt: skip
        st = self.stats
        st.checkpoints = number
        st.pauses.append(pause)
        st.max_pause = max(st.max_pause, pause)
        return _Captured(number, t0, pages, states)

    def _send(self, cp: _Captured) -> None:
        """The checkpoint as groups of whole records: it may be abandoned between two."""
        mig = self.mig
        enc = mig.encoder
        enc.reset_block()  # the standby decodes each checkpoint afresh: name the block again
        groups: list[list] = [[W.checkpoint_head(), *enc.send(E.SectionEnd(mig._ram_sid))]]
        # x-checksums: the checkpoint is checked like any unit of the stream (its RAM records
        # and device sections, savevm/checksum.py), from the copies it is sent from
        unit = CK.Unit() if mig.checks is not None else None
        npages = 0
        for idstr, idx, data in cp.pages:
            nonzero = data.reshape(len(idx), -1).view(np.uint64).any(axis=1)
            offsets = idx.astype(np.uint64) << np.uint64(12)
            zero = offsets[~nonzero]
            if len(zero):
                groups.append(enc.encode_zero_pages(idstr, zero))
                if unit is not None:
                    unit.add(idstr, CK.KIND_ZERO, idx[~nonzero])
            normal = np.flatnonzero(nonzero)
            for i in range(0, len(normal), GROUP_PAGES):
                sel = normal[i : i + GROUP_PAGES]
                groups.append(enc.encode_pages(idstr, offsets[sel], data[sel]))
                if unit is not None:
                    unit.add(idstr, CK.KIND_DATA, idx[sel], data[sel])
            npages += len(idx)
        tail = [*enc.send(E.RamEos()), *enc.send(E.SectionFooter(mig._ram_sid)),
                *enc.send(E.Eof())]  # fmt: skip
        self._abandon = b"".join(bytes(b) for b in tail)  # ends the live state early
        sid = mig._ram_sid + 1
        dev = bytearray()
        hook = enc.on_full
        enc.on_full = unit.add_device if unit is not None else None
        try:
            for idstr, inst, vmsd, values in cp.states:
                enc.devices[idstr] = vmsd
                for b in enc.send(E.SectionFull(sid, idstr, inst, vmsd.version_id, values)):
                    dev += b
                sid += 1
        finally:
            enc.on_full = hook
        dev += enc.to_bytes(E.Eof())
        # the live state's end and the device state go as one piece: never abandoned midway
        last = [*tail, W.device_state_head(len(dev)), bytes(dev)]
        if unit is not None:
            digest = unit.digest({}, CK.block_indexes(mig.machine.ram_blocks))
            last.append(W.checksum_tail(unit.records, digest))
        groups.append(last)
        sent = self._send_paced(groups, cp)
        self._abandon = None
        st = self.stats
        st.bytes += sent
        st.pages += npages
        st.sizes.append(sent)

    def _send_paced(self, groups: list[list], cp: _Captured) -> int:
        """Send group by group in pieces of about SEND_CHUNK, checking between pieces that the
        standby is still there and in time (an exit request waits for the checkpoint's end:
        the standby must get it whole, or know that it was abandoned)."""
        mig = self.mig
        params = mig.config.params
        limit = params["x-colo-checkpoint-timeout"] / 1000
        hb = params["x-colo-heartbeat-timeout"] / 1000
        sent = 0
        piece: list = []
        size = 0
        self.sending = cp.number
        for i, group in enumerate(groups):
            piece += group
            size += sum(len(b) if isinstance(b, bytes) else memoryview(b).nbytes for b in group)
            if size < SEND_CHUNK and i + 1 < len(groups):
                continue
            # as QEMU's checkpoints, not held to max-bandwidth: the guest's replies wait
            n = mig.channel.sendv(piece)
            mig.stats.transferred += n
            sent += n
            piece, size = [], 0
            with self._cv:
                self._check(hb, requests=False)
            if time.monotonic() - cp.taken_at > limit:
                raise ColoEnded(self._too_slow(cp, limit))
        self.sending = 0
        return sent

    def _too_slow(self, cp: _Captured, limit: float) -> str:
        return (f"checkpoint {cp.number} was not acknowledged within {limit * 1000:.0f} ms "
                "(x-colo-checkpoint-timeout): the standby or its link cannot keep up with this "
                "guest")  # fmt: skip

    def _await_ack(self, cp: _Captured, delay: float) -> None:
        params = self.mig.config.params
        limit = params["x-colo-checkpoint-timeout"] / 1000
        hb = params["x-colo-heartbeat-timeout"] / 1000
        with self._cv:
            while self._loaded < cp.number:
                self._check(hb)
                left = cp.taken_at + limit - time.monotonic()
                if left <= 0:
                    raise ColoEnded(self._too_slow(cp, limit))
                self._cv.wait(min(left, hb / 4))
        took = time.monotonic() - cp.taken_at
        st = self.stats
        st.acked = cp.number
        st.acks.append(took)
        st.recent.append((cp.number, st.pauses[-1], st.sizes[-1], took))
        if took > max(delay, 0.001) and delay > 0:
            st.late += 1
            if st.late in (1, 10, 100) or st.late % 1000 == 0:
                log.warning("COLO: checkpoint %d took %.1f ms to be acknowledged, longer than "
                            "the %.0f ms interval (%d late so far): the standby or its link is "
                            "slower than the guest dirties memory", cp.number, took * 1000,
                            delay * 1000, st.late)  # fmt: skip
        for p in self.participants:
            p.colo_acked(cp.number)

    # -- the end ---------------------------------------------------------------------------

    def _end(self, reason: str, why: str) -> None:
        self.active = False
        self.ended = True
        self.reason = reason
        self.error = why if reason == "error" else None
        mig = self.mig
        # the front first: nothing the unreplicated guest says may reach a client before the
        # front knows that the standby no longer has it
        for p in self.participants:
            try:
                p.colo_primary_end(why)
            except Exception:  # never let a participant keep the guest replicated in name
                log.exception("COLO: participant %r did not end cleanly", p)
        # whatever the reason, a standby that still hears us must not take over: the guest
        # goes on here (one that does not hear it takes over, but no front fails over to it
        # any more: see colo_primary_end)
        self._say_exit()
        st = mig.state
        if st.status == MigrationStatus.CANCELLING:
            st.move(MigrationStatus.CANCELLED)
        else:
            st.try_move(MigrationStatus.COLO, MigrationStatus.COMPLETED)
        level = logging.INFO if reason == "request" else logging.WARNING
        log.log(level, "COLO: replication ended after %d checkpoints (%s): the guest goes on "
                "here UNREPLICATED", self.stats.acked, why)  # fmt: skip
        _exit_event(self.emit, "primary", reason)

    def query(self) -> dict[str, Any]:
        out: dict[str, Any] = {"x-replicated": self.active, "x-standby": self.standby or None,
                               "x-sending": self.sending if self.active else 0}  # fmt: skip
        out.update({f"x-{k}": v for k, v in self.stats.query().items()})
        if self.error:
            out["x-error"] = self.error
        return out


class ColoSecondary:
    """The standby's side, run by ``IncomingMigration`` once the first migration is loaded."""

    def __init__(self, inc: Any, participants: list[ColoParticipant], emit: Any) -> None:
        self.inc = inc
        self.participants = participants
        self.emit = emit
        self.applied = 0
        self.received = 0
        self.bytes = 0
        self.active = False
        self.ended = False
        self.reason = "none"
        self.how: str | None = None  # why it took over or stood down
        self.took_over = False
        self._takeover: str | None = None
        self._lock = threading.Lock()
        self._sections = {p.colo_section()[0]: p for p in participants}
        self._runstate = "running"
        self._last_sent = time.monotonic()
        self._stop = threading.Event()
        self._rd: W.CheckpointReader | None = None
        self._send_failed: str | None = None
        self.partial_discarded = 0  # a checkpoint received in part when it took over
        self.apply_times: deque[float] = deque(maxlen=STATS_KEPT)

    def request_takeover(self, why: str) -> None:
        """``x-colo-lost-heartbeat``: take over at once (after a checkpoint being applied)."""
        with self._lock:
            self._takeover = why

    def sections(self) -> dict[str, VMStateDescription]:
        return {idstr: p.colo_section()[1] for idstr, p in self._sections.items()}

    # -- the incoming thread ---------------------------------------------------------------

    def run(self, rest: bytes) -> None:
        inc = self.inc
        m = inc.machine
        self._runstate = inc._runstate
        inc.state.move(MigrationStatus.COLO)
        m.set_runstate(RunState.COLO)
        address = next((a for p in self.participants if (a := p.colo_standby_address())), "")
        self.active = True
        self._send(RP.XColo(CM.CHECKPOINT_READY, 0, address))
        hb_thread = threads.Thread(target=self._heartbeats, name="colo heartbeat", daemon=True)
        hb_thread.start()
        log.info("COLO: standby ready, waiting for checkpoints%s",
                 f" (serving at {address} after a failover)" if address else "")  # fmt: skip
        try:
            why = self._receive(rest)
        except StreamError as exc:
            self._stand_down(f"malformed checkpoint from the primary: {exc}")
            raise
        except _StandDown as exc:
            self._stand_down(str(exc))
            raise MigrationError(str(exc)) from None
        finally:
            self._stop.set()
        self._take_over(why)

    def _heartbeats(self) -> None:
        hb = self.inc.params["x-colo-heartbeat-timeout"] / 1000
        while not self._stop.wait(hb / 4) and self._send_failed is None:
            if time.monotonic() - self._last_sent >= hb / 4:
                self._send(RP.XColo(CM.X_HEARTBEAT, self.applied))

    def _send(self, msg: Any) -> None:
        """A return-path message; a primary that cannot be written to any more is gone (the
        reading side says so once it has read what was sent before)."""
        try:
            self.inc._send_rp(msg)
        except ChannelError as exc:
            self._send_failed = f"the primary's connection broke: {exc}"
            return
        self._last_sent = time.monotonic()

    def _reader(self, start: int) -> W.CheckpointReader:
        inc = self.inc
        sizes = inc.loader.block_sizes()
        devices = {**descriptions(machine_entries(inc.machine)), **self.sections()}

        def live(offset: int) -> Decoder:
            return Decoder(with_header=False, block_sizes=sizes, sections={inc._ram_sid: "ram"},
                           stop_at_eof=True, start_offset=offset)  # fmt: skip

        def dev(offset: int) -> Decoder:
            return Decoder(with_header=False, devices=devices, stop_at_eof=True,
                           start_offset=offset)  # fmt: skip

        limit = sum(sizes.values()) + (64 << 20)
        return W.CheckpointReader(live, dev, limit, start_offset=start,
                                  checked=bool(inc.checks.checked))  # fmt: skip

    def _receive(self, rest: bytes) -> str:
        """Read checkpoints until the standby must take over; returns why."""
        inc = self.inc
        ch = inc.channel
        hb = inc.params["x-colo-heartbeat-timeout"] / 1000
        reader = self._rd = self._reader(inc._colo_offset)
        ch.timeout = RECV_TICK
        last_heard = time.monotonic()
        data = rest
        while True:
            if data:
                last_heard = time.monotonic()
                reader.receive_data(data)
                for ev in reader.events():
                    if isinstance(ev, W.Exit):
                        broke = (f"; checkpoint {ev.abandoned}, broken off, is dropped"
                                 if ev.abandoned is not None else "")  # fmt: skip
                        raise _StandDown(f"the primary ended replication (X_EXIT): it keeps "
                                         f"the guest{broke}")  # fmt: skip
                    if isinstance(ev, W.Checkpoint):
                        self._checkpoint(ev)
            with self._lock:
                if self._takeover is not None:
                    return self._takeover
            if self._send_failed is not None and not data:
                return self._send_failed
            try:
                data = ch.recv(1 << 20)
            except ChannelTimeout:
                data = b""
                silent = time.monotonic() - last_heard
                if silent > hb:
                    return (f"no heartbeat from the primary for {silent * 1000:.0f} ms "
                            f"(x-colo-heartbeat-timeout {hb * 1000:.0f} ms)")  # fmt: skip
                continue
            except ChannelError as exc:
                return f"the primary's connection broke: {exc}"
            if not data:
                return "the primary's connection closed"

    def _checkpoint(self, cp: W.Checkpoint) -> None:
        inc = self.inc
        self.received = cp.number
        self.bytes += cp.size
        self._send(RP.XColo(CM.VMSTATE_RECEIVED, cp.number))
        t0 = time.monotonic()
        entries = {(e.idstr, e.instance_id): e for e in machine_entries(inc.machine)}
        loads: list[tuple[Any, dict[str, Any]]] = []
        participant_states: list[tuple[ColoParticipant, dict[str, Any]]] = []
        runstate = self._runstate
        if cp.checksum is not None:
            self._verify(cp)
        for ev in cp.devices:  # everything is checked before anything is changed
            if not isinstance(ev, E.SectionFull):
                continue
            if ev.idstr == "globalstate":
                runstate = decode_globalstate(ev.state)
            elif ev.idstr in self._sections:
                participant_states.append((self._sections[ev.idstr], ev.state))
            elif (ev.idstr, ev.instance_id) in entries:
                loads.append((entries[(ev.idstr, ev.instance_id)], ev.state))
            else:
                raise StreamError(f"checkpoint {cp.number}: section {ev.idstr!r} instance "
                                  f"{ev.instance_id} has no device here")  # fmt: skip
        try:
            for ev in cp.live:
                if isinstance(ev, E.RamPages):
                    inc.loader.load_pages(ev.block, ev.offsets, ev.data)
                elif isinstance(ev, E.RamZeroPages):
                    inc.loader.load_zero(ev.block, ev.offsets, ev.fill)
            for entry, state in loads:
                entry.load(state)
            for p, state in participant_states:
                p.colo_standby_load(state)
        except (LivemigError, KeyError, ValueError, TypeError) as exc:
            # half applied: this standby no longer holds any checkpoint whole
            raise _StandDown(
                f"checkpoint {cp.number} could not be applied ({exc}): this "
                "standby's copy is not consistent and must not take over"
            ) from exc
        inc.machine.invalidate_translations()
        self._runstate = runstate
        self.applied = cp.number
        self.apply_times.append(time.monotonic() - t0)
        self._send(RP.XColo(CM.VMSTATE_LOADED, cp.number))

    def _verify(self, cp: W.Checkpoint) -> None:
        """x-checksums: the checkpoint's records and digest, before any of it is applied. A
        corrupted checkpoint is never applied, and the ones after it would build on it: this
        standby stands down (the primary goes on unreplicated and says so)."""
        assert cp.checksum is not None
        vmsds = {**descriptions(machine_entries(self.inc.machine)), **self.sections()}
        unit = CK.Unit()
        for ev in cp.live:
            if isinstance(ev, E.RamPages):
                unit.add(ev.block, CK.KIND_DATA, ev.offsets >> np.uint64(12), ev.data)
            elif isinstance(ev, E.RamZeroPages):
                kind = CK.KIND_FILL if ev.fill else CK.KIND_ZERO
                unit.add(ev.block, kind, ev.offsets >> np.uint64(12))
        for ev in cp.devices:
            if isinstance(ev, E.SectionFull):
                vmsd = vmsds.get(ev.idstr)
                if vmsd is None:
                    raise _StandDown(f"checkpoint {cp.number}: section {ev.idstr!r} has no "
                                     "layout here to check it by")  # fmt: skip
                unit.add_device(ev.idstr, ev.instance_id, ev.version_id, vmsd.encode(ev.state))
        records, digest = cp.checksum
        mine = unit.digest({}, CK.block_indexes(self.inc.machine.ram_blocks))
        if records != unit.records or digest != mine:
            raise _StandDown(
                f"checkpoint {cp.number} does not match its checksum ({unit.span()}: "
                f"{unit.records} records, digest {mine:016x}; the primary sent {records} "
                f"records, digest {digest:016x}): corrupted on the way, not applied; this "
                "standby stands down"
            )

    def _take_over(self, why: str) -> None:
        inc = self.inc
        m = inc.machine
        self.active = False
        self.ended = True
        self.took_over = True
        if self._rd is not None and self._rd.in_checkpoint:
            self.partial_discarded = 1
            why += f"; checkpoint {self.applied + 1}, received in part, is discarded"
        self.how = why
        requested = why.startswith("x-colo-lost-heartbeat")
        self.reason = "request" if requested else "error"
        for p in self.participants:
            p.colo_takeover()
        inc.guest_started = True
        inc.state.move(MigrationStatus.COMPLETED)
        if self._runstate == "running" and inc._autostart():
            m.set_runstate(RunState.RUNNING)
        else:
            m.set_runstate(RunState.PAUSED)
        inc.timeline["resumed"] = time.monotonic()
        log.warning("COLO: the standby TAKES OVER from checkpoint %d (%s)", self.applied, why)
        _exit_event(self.emit, "secondary", self.reason)

    def _stand_down(self, why: str) -> None:
        self.active = False
        self.ended = True
        self.how = why
        self.reason = "error"
        log.error("COLO: the standby stands down without taking over: %s", why)
        _exit_event(self.emit, "secondary", "error")

    def query(self) -> dict[str, Any]:
        out: dict[str, Any] = {"x-checkpoints-applied": self.applied, "x-bytes": self.bytes,
                               "x-took-over": self.took_over,
                               "x-partial-discarded": self.partial_discarded}  # fmt: skip
        if self.apply_times:
            a = np.array(self.apply_times) * 1000
            out["x-apply-ms"] = {"p50": round(float(np.percentile(a, 50)), 3),
                                 "p99": round(float(np.percentile(a, 99)), 3)}  # fmt: skip
        if self.how:
            out["x-how"] = self.how
        return out


class _StandDown(LivemigError):
    """The standby must not take over (the message says why)."""
