"""The destination: accept an incoming migration, load it, and start the guest.

Theory of operation (QEMU: ``process_incoming_migration_co``, ``qemu_loadvm_state``): listen on
the URI; on connection go ``active`` and feed the channel's bytes to the sans-IO decoder;
RAM page batches are copied into their RAMBlocks (bounds checked), FULL sections are kept until
EOF, then the vCPUs and devices are restored all at once and the guest starts if the source's
global state says it was running (unless the destination was started paused, QEMU's ``-S``).
With a return path the destination answers PINGs and ends with SHUT(0), or SHUT(1) on a load
error, which tells the source to keep its guest; a livemig source (it sends a PING of
``X_FEATURES_PING``) first gets the error itself (``XError``), whatever failed the load.

A malformed stream fails the migration with the decoder's message (it names the stream
offset); nothing outside guest RAM is written, and every read has a time-out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from livemig import threads
from livemig.errors import LivemigError, StreamError
from livemig.machine.runstate import RunState
from livemig.migration import mapped_ram, multifd, postcopy_dest, state_verify
from livemig.migration.priority import ThreadPriority, blackout_priority, restore_priority
from livemig.migration.source import MACHINE_TYPE, VERIFY_IDSTR, ram_hashes, verify_vmsd
from livemig.migration.state import MigrationState, MigrationStatus
from livemig.migration.state_verify import STATE_IDSTR, state_vmsd
from livemig.savevm import checksum as CK
from livemig.savevm.devices import decode_globalstate, descriptions, machine_entries
from livemig.savevm.machine_check import MACHINE_IDSTR, MACHINE_VMSD, check_machine
from livemig.savevm.ram import RamLoader
from livemig.savevm.xbzrle_cache import load_xbzrle
from livemig.transport import Channel, ChannelError, ChannelTimeout, Listener
from livemig.wire import events as E
from livemig.wire import returnpath as RP
from livemig.wire.constants import X_DRAIN_PING, X_FEATURES_PING
from livemig.wire.decoder import Decoder

log = logging.getLogger(__name__)

RECV_CHUNK = 1 << 20
# In a pre-copy pass, a read waits up to BULK_WAIT for BULK_READ bytes (Channel.wait_buffered):
# fewer, fuller reads. Never after a section ends or in the final (END) section, so the
# switch-over's tail is read as it arrives.
BULK_READ = RECV_CHUNK // 2
BULK_WAIT = 0.001
VMDESC_WAIT = 2.0  # seconds to wait for the optional vmdesc after EOF


class IncomingMigration:
    """One incoming migration into this process's (``inmigrate``) machine."""

    def __init__(
        self,
        machine: Any,
        uri: str,
        state: MigrationState,
        params: dict[str, Any],
        *,
        autostart: bool | Callable[[], bool] = True,
        emit: Any = None,
        on_done: Any = None,
    ) -> None:
        self.machine = machine
        self.state = state
        self.params = params
        # QMP stop/cont during inmigrate change QEMU's autostart flag: read it at the end.
        self._autostart = autostart if callable(autostart) else (lambda: autostart)
        self.emit = emit or (lambda name, data=None: None)
        self.on_done = on_done or (lambda ok: None)
        self.timeout = params["x-io-timeout"] / 1000
        self.listener = Listener(uri, timeout=self.timeout)
        self.uri = self.listener.address
        self.socket_addresses = self.listener.socket_addresses()  # the listener closes early
        self.channel: Channel | None = None
        self.loader = RamLoader(machine.ram_blocks)
        self.entries = machine_entries(machine)
        self._by_key = {(e.idstr, e.instance_id): e for e in self.entries}
        self._states: list[tuple[Any, dict[str, Any]]] = []
        self._runstate = "running"
        self._return_path = False
        self._peer_reads_x_error = False  # the source sent X_FEATURES_PING
        self._rp_lock = threading.Lock()
        self._rp_encoder = RP.ReturnPathEncoder()
        self._cancel = threading.Event()
        self.capabilities: frozenset[str] = frozenset()  # set by the manager before start()
        self.multifd: Any = None  # multifd.MultifdReceiver with capability multifd
        # The stream's multifd sync points are MULTIFD_FLUSH words (QEMU 8.1+, livemig), whose
        # first comes inside the setup section; without them (QEMU 7.2, or a stream sent
        # by ``livemig replay --multifd`` from a file made without multifd), every RAM
        # section's EOS is one.
        self._flush_words = False
        self.verify: dict[str, Any] | None = None
        # x-checksums: every unit of the stream is checked (``savevm.checksum``) when the
        # source announces them; with the capability on here, a stream without is refused
        self.checks = CK.StreamChecks(machine.ram_blocks, on_checked=self._on_checked)
        self.postcopy: postcopy_dest.PostcopyIncoming | None = None
        self.source_hashes: dict[str, str] | None = None
        self.source_state: dict[str, Any] | None = None  # x-verify-state digests
        self.state_verified: bool | None = None
        self.guest_started = False  # once True, the source must never run its copy again
        self.colo: Any = None  # colo.ColoSecondary once the stream enabled COLO
        self.colo_participants: list = []  # set by the manager (the service front)
        self._ram_sid = 0  # the ram section's id: COLO checkpoints continue that section
        self._colo_offset = 0
        self.timeline: dict[str, float] = {}
        self._blackout_prio: ThreadPriority | None = None  # from the END section on
        self.thread = threads.Thread(target=self._run, name="incoming", daemon=True)
        if state.status == MigrationStatus.NONE:
            state.move(MigrationStatus.SETUP)

    def start(self) -> None:
        self.thread.start()

    def cancel(self) -> None:
        self._cancel.set()
        if self.channel is not None:
            self.channel.shutdown()

    def join(self, timeout: float | None = None) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        ok = False
        try:
            if "multifd" in self.capabilities:
                self.channel = multifd.incoming_accept(self)
            else:
                self.channel = self._accept()
            self.timeline["connected"] = time.monotonic()
            self.state.move(MigrationStatus.ACTIVE)
            self._load()
            ok = True
        except (LivemigError, OSError) as exc:
            if self.guest_started and self.state.status == MigrationStatus.COMPLETED:
                # only the vmdesc was left to read (see _load): the guest runs on what was
                # loaded and verified, and the source has its SHUT(0)
                log.warning("incoming migration: after the guest started, reading the "
                            "stream's vmdesc failed (ignored, as QEMU does): %s", exc)  # fmt: skip
                ok = True
                return
            reason = "cancelled" if self._cancel.is_set() else str(exc)
            reason = multifd.incoming_error(self) or reason  # the channel that broke first
            log.warning("incoming migration failed: %s", reason)
            if self.postcopy is not None:
                self.postcopy.fail()
            self._shut(1, reason)
            self.state.try_move(self.state.status, MigrationStatus.FAILED, error=reason)
        except BaseException as exc:
            log.exception("incoming migration crashed")
            if self.postcopy is not None:
                self.postcopy.fail()  # the guest may be running on pages it does not have
            self._shut(1, f"internal error: {exc!r}")
            self.state.try_move(self.state.status, MigrationStatus.FAILED,
                                error=f"internal error: {exc!r}")  # fmt: skip
        finally:
            self._end_blackout_priority()
            multifd.incoming_close(self)
            if self.channel is not None:
                self.channel.close()
            self.listener.close()
            self.on_done(ok)

    def _accept(self) -> Channel:
        while True:
            if self._cancel.is_set():
                raise ChannelError("incoming migration cancelled before a connection")
            try:
                return self.listener.accept(timeout=0.2)
            except ChannelTimeout:
                continue

    def _shut(self, status: int, reason: str | None = None) -> None:
        if self._return_path and self.channel is not None:
            try:
                if status and reason and self._peer_reads_x_error:
                    self._send_rp(RP.XError(reason, not_started=not self.guest_started))
                self._send_rp(RP.Shut(status))
            except ChannelError:
                pass

    def _send_rp(self, msg: Any) -> None:
        assert self.channel is not None
        with self._rp_lock:
            self.channel.send(self._rp_encoder.send(msg))

    def _load(self) -> None:
        ch = self.channel
        assert ch is not None
        self._vmsds = {**descriptions(self.entries), CK.IDSTR: CK.vmsd(),
                       MACHINE_IDSTR: MACHINE_VMSD,
                       VERIFY_IDSTR: verify_vmsd(self.machine.ram_blocks),
                       STATE_IDSTR: state_vmsd(self.entries)}  # fmt: skip
        dec = Decoder(devices=self._vmsds, block_sizes=self.loader.block_sizes())
        self.checks.required = CK.CAPABILITY in self.capabilities
        eof_at: float | None = None
        done = False
        bulk = False  # the last read ended inside the pages of a pass
        final = False  # the END section (switch-over) has begun
        while not done:
            if eof_at is not None:
                ch.timeout = max(0.01, eof_at + VMDESC_WAIT - time.monotonic())
            try:
                if bulk:
                    ch.wait_buffered(BULK_READ, BULK_WAIT)
                # a fresh bytes object per read: the decoder keeps it without copying it
                data = ch.recv(RECV_CHUNK)
            except ChannelTimeout:
                if eof_at is not None:
                    break  # no vmdesc: fine
                raise
            n = len(data)
            dec.receive_data(data)
            # One event at a time: after a PACKAGED command post-copy takes the decoder over.
            ev = None
            for ev in iter(dec.next_event, E.NEED_DATA):
                if isinstance(ev, E.SectionEnd) and not final:
                    # the source's guest has stopped: the blackout runs until ours starts
                    self._blackout_prio = blackout_priority()
                    final = True
                    self.timeline["end-section"] = time.monotonic()
                if isinstance(ev, E.Eof):
                    eof_at = time.monotonic()
                    self.timeline["eof"] = eof_at
                    self.checks.at_end(dec.offset)
                    self._finish_load()
                    self.timeline["loaded"] = time.monotonic()
                    if self._return_path and self.colo is None and self.postcopy is None:
                        # Everything the guest needs is loaded (and verified): it starts
                        # now, not after the vmdesc, which only describes what came (QEMU's
                        # destination reads it first; it takes ~0.5 ms to build, send and
                        # parse, all of it blackout)
                        self._start_guest()
                        self._end_blackout_priority()
                    if not self._return_path and ch.is_socket is False and n == 0:
                        done = True
                elif isinstance(ev, E.VMDescription):
                    done = True
                    if self.colo is not None:
                        break  # COLO checkpoints follow: wire/colo.py reads them
                else:
                    self._handle(ev, dec)
                    if self.postcopy is not None and self.postcopy.finished:
                        return
            if n == 0:
                if eof_at is None:
                    raise StreamError("stream ended before EOF", dec.offset)
                break
            # (with checksums a pass is a row of small sections, one per unit, and a read ends
            # at any point of one)
            bulk = not final and (isinstance(ev, E.RamPages | E.RamZeroPages) or bool(
                self.checked and ev is not None))  # fmt: skip
        if self.colo is not None:
            self._end_blackout_priority()
            self._colo_offset = dec.offset
            return self.colo.run(dec.unparsed())  # a standby: checkpoints until it takes over
        if not self.guest_started:
            self._start_guest()
        self._end_blackout_priority()

    def _end_blackout_priority(self) -> None:
        restore_priority(self._blackout_prio)
        self._blackout_prio = None

    def _handle(self, ev: Any, dec: Decoder) -> None:
        if self.checks.before(ev, dec.offset, self._vmsds):
            return
        if postcopy_dest.dispatch(self, ev, dec):
            return
        if isinstance(ev, E.RamPages):
            self.loader.load_pages(ev.block, ev.offsets, ev.data)
            self.checks.pages(ev)
        elif isinstance(ev, E.RamZeroPages):
            self.loader.load_zero(ev.block, ev.offsets, ev.fill)
            self.checks.pages(ev)
        elif isinstance(ev, E.SectionFull):
            self._on_full(ev, dec)
        elif isinstance(ev, E.RamSetup):
            self.loader.check_setup(ev.blocks, dec.offset)
            if any(b.mapped_ram is not None for b in ev.blocks):
                mapped_ram.incoming_load(self, ev, dec.offset)
        elif isinstance(ev, E.RamMultifdFlush):
            self._flush_words = True
            multifd.incoming_flush(self, dec.offset)
        elif isinstance(ev, E.RamEos):
            if self.multifd is not None and not self._flush_words:
                self.multifd.flush()
        elif isinstance(ev, E.RamXbzrlePage):
            load_xbzrle(self.loader, ev.block, ev.offset, ev.data, dec.offset)
            self.checks.pages(ev)
        elif isinstance(ev, E.Configuration):
            if ev.machine_type != MACHINE_TYPE:
                raise StreamError(f"machine type {ev.machine_type!r} does not match this "
                                  f"machine ({MACHINE_TYPE!r})", dec.offset)  # fmt: skip
        elif isinstance(ev, E.OpenReturnPath):
            if not self.channel or not self.channel.is_socket:
                raise StreamError("OPEN_RETURN_PATH on a channel without a return path",
                                  dec.offset)  # fmt: skip
            self._return_path = True
            if "switchover-ack" in self.capabilities:
                # QEMU's loadvm: no device here needs more time, so approve at once
                self._send_rp(RP.SwitchoverAck())
        elif isinstance(ev, E.Ping):
            if not self._return_path:
                raise StreamError("PING without a return path", dec.offset)
            self._peer_reads_x_error |= ev.value == X_FEATURES_PING
            if ev.value == X_DRAIN_PING and self.postcopy is not None:
                self.postcopy.drained()
            self._send_rp(RP.Pong(ev.value))
        elif isinstance(ev, E.SectionStart):
            if ev.idstr != "ram":
                raise StreamError(f"unexpected iterative section {ev.idstr!r}", dec.offset)
            self._ram_sid = ev.section_id
        elif isinstance(ev, E.EnableColo):
            if not self._peer_reads_x_error:
                raise StreamError("ENABLE_COLO: a livemig standby answers on the return path "
                                  "and needs a livemig source that reads it", dec.offset)  # fmt: skip
            from livemig.migration.colo import ColoSecondary

            self.colo = ColoSecondary(self, self.colo_participants, self.emit)
        elif isinstance(ev, (E.Header, E.SectionPart, E.SectionEnd, E.SectionFooter)):
            pass
        elif isinstance(ev, E.SwitchoverStart):
            pass  # QEMU 10.0 tells devices the switch-over begins: none here waits for it
        else:
            raise StreamError(f"{type(ev).__name__} is not supported in a pre-copy stream",
                              dec.offset)  # fmt: skip

    @property
    def checked(self) -> bool | None:
        """Whether the stream carries checksums (None: its configuration not read yet)."""
        return self.checks.checked

    def _on_checked(self, checked: bool) -> None:
        if self.multifd is not None:
            self.multifd.checked = checked

    def _on_full(self, ev: Any, dec: Decoder) -> None:
        if ev.idstr == "globalstate":
            self._runstate = decode_globalstate(ev.state)
            return
        if ev.idstr == MACHINE_IDSTR:
            check_machine(self.machine, ev.state, dec.offset)  # at setup: before any RAM
            return
        if ev.idstr == VERIFY_IDSTR:
            self.source_hashes = {k: bytes(v).hex() for k, v in ev.state.items()}
            return
        if ev.idstr == STATE_IDSTR:
            self.source_state = dict(ev.state)
            return
        entry = self._by_key.get((ev.idstr, ev.instance_id))
        if entry is None:
            raise StreamError(f"section {ev.idstr!r} instance {ev.instance_id} has no device "
                              "here", dec.offset)  # fmt: skip
        self._states.append((entry, ev.state))

    def _finish_load(self) -> None:
        for entry, state in self._states:
            try:
                entry.load(state)
            except (KeyError, ValueError, TypeError) as exc:
                raise StreamError(f"section {entry.idstr!r}: state does not load: {exc}") from exc
        self.machine.invalidate_translations()
        self.check_state()
        if self.source_hashes is not None:
            t0 = time.monotonic()
            mine = ram_hashes(self.machine.ram_blocks)
            equal = mine == self.source_hashes
            self.verify = {"equal": equal, "source": self.source_hashes, "destination": mine,
                           "hash-ms": round((time.monotonic() - t0) * 1000, 1)}  # fmt: skip
            if not equal:
                bad = [k for k in mine if mine[k] != self.source_hashes.get(k)]
                raise StreamError(f"verification failed: RAM blocks differ: {', '.join(bad)}")

    def check_state(self) -> None:
        """x-verify: the machine as loaded holds the CPU and device state the source sent."""
        if self.source_state is None:
            return
        differ = state_verify.compare(self.source_state, machine_entries(self.machine))
        self.state_verified = not differ
        if differ:
            raise StreamError(state_verify.mismatch_message(differ))

    def _start_guest(self) -> None:
        m = self.machine
        self.guest_started = True
        if self._runstate == "running" and self._autostart():
            m.set_runstate(RunState.RUNNING)
        else:
            m.set_runstate(RunState.PAUSED)
        self.timeline["resumed"] = time.monotonic()
        self.state.move(MigrationStatus.COMPLETED)
        self._shut(0)
        self.timeline["shut-sent"] = time.monotonic()

    def report(self) -> dict[str, Any]:
        """The destination's timeline (monotonic seconds) and post-copy request latencies."""
        out: dict[str, Any] = {"timeline": dict(self.timeline)}
        if self.postcopy is not None:
            lat = [round(x * 1000, 4) for x in self.postcopy.latencies]
            out["postcopy"] = {"latencies-ms": lat, **self.postcopy.query()["x-postcopy"]}
        return out

    def query(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.state.status.value}
        if self.socket_addresses and self.state.status not in (
            MigrationStatus.COMPLETED,
            MigrationStatus.FAILED,
            MigrationStatus.NONE,
        ):  # QEMU keeps the address while its incoming side lives (not once it failed)
            out["socket-address"] = self.socket_addresses
        # as QEMU 8.1+ does: the reason also while post-copy waits paused for a recovery
        if self.state.status in (MigrationStatus.FAILED, MigrationStatus.POSTCOPY_PAUSED) and \
                self.state.error:  # fmt: skip
            out["error-desc"] = self.state.error
        if self.verify is not None:
            out["x-verify"] = {"equal": self.verify["equal"]}
            if "hash-ms" in self.verify:  # pre-copy: hashed in the blackout (post-copy: not)
                out["x-verify-ms"] = self.verify["hash-ms"]
        if self.state_verified is not None:
            out.setdefault("x-verify", {})["state-equal"] = self.state_verified
        if self.checked:
            units = self.checks.units
            if self.multifd is not None:
                units += sum(c.checks.units for c in self.multifd.channels if c.checks)
            out["x-checksums"] = {"units": units}
        if self.postcopy is not None:
            out.update(self.postcopy.query())
        return out
