"""The source's migration thread: QEMU's pre-copy flow, from setup to completion.

Theory of operation (QEMU: ``migration_thread``, ``migration_iteration_run``,
``migration_completion``):

1. **setup**: connect the channel, start dirty tracking, send the header, the configuration,
   optionally OPEN_RETURN_PATH + PING, and the ``ram`` START section with the block list.
2. **active**: repeat: if the pages still dirty fit in ``bandwidth x downtime-limit`` (the
   threshold), sync the dirty bitmap (a new pass) and check again; if they still fit, complete.
   Otherwise send one PART section of dirty pages (as many as the 100 ms rate budget allows,
   for at most ~50 ms), then wait out the rate window. Auto-converge raises the vCPU throttle
   when the guest keeps dirtying faster than we send.
3. **completion**: stop the vCPUs (runstate finish-migrate, STOP), final sync, the ``ram`` END
   section with everything still dirty, the FULL sections (cpu, devices, globalstate), EOF and
   the vmdesc JSON; with a return path, wait for the destination's SHUT.

Any failure or a cancel before completion leaves the guest running on the source with nothing
lost: if we had stopped it, we restart it (RESUME). Every socket operation has a time-out.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from livemig import threads
from livemig.errors import LivemigError, MigrationError
from livemig.machine.runstate import RunState
from livemig.migration import mapped_ram, multifd
from livemig.migration.convergence import SwitchoverRefiner
from livemig.migration.priority import ThreadPriority, blackout_priority, restore_priority
from livemig.migration.state import MigrationState, MigrationStatus
from livemig.migration.state_verify import STATE_IDSTR, state_digests, state_vmsd
from livemig.migration.stats import MigrationStats, PassRecord
from livemig.savevm import checksum as CK
from livemig.savevm import xbzrle_cache
from livemig.savevm.devices import (
    GLOBALSTATE_VMSD,
    SaveStateEntry,
    encode_globalstate,
    machine_entries,
)
from livemig.savevm.machine_check import MACHINE_IDSTR, MACHINE_VMSD, describe_machine
from livemig.savevm.ram import RamSaver
from livemig.transport import Channel, ChannelError, ChannelTimeout, RateLimiter, connect
from livemig.wire import events as E
from livemig.wire import returnpath as RP
from livemig.wire.constants import X_DRAIN_PING, X_FEATURES_PING
from livemig.wire.encoder import Encoder
from livemig.wire.returnpath import ReturnPathDecoder

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 0.5  # the most the post-copy switch waits for the destination to catch up

MACHINE_TYPE = "livemig-x86_64"
RAM_SECTION_VERSION = 4
MAX_PART_TIME = 0.05  # QEMU yields a RAM iteration after 50 ms
BATCH_PAGES = 256  # pages per gather / writev batch (1 MiB)
# Waiting for the socket to drain below the threshold: at least this long (a system call per
# turn otherwise), at most this long (the guest may have dirtied pages worth a sync meanwhile).
DRAIN_WAIT_MIN = 0.0001
DRAIN_WAIT_MAX = 0.02
VERIFY_IDSTR = "x-verify"


class Cancelled(LivemigError):
    """The user cancelled the migration."""


def ram_hashes(blocks: list) -> dict[str, str]:
    """A 128-bit digest of every RAM block, as hex.

    XXH3 rather than SHA-256: verification runs inside the blackout on both sides, and XXH3
    hashes at memory speed (~20 GB/s here) where hashlib's best manages under 1 GB/s. It guards
    against bugs, not attackers.
    """
    return {b.idstr: _block_digest(b) for b in blocks}


_ZERO_CHUNK = bytes(1 << 20)


def _block_digest(block: Any) -> str:
    """XXH3-128 of the block's bytes, without reading pages the kernel never populated.

    Reading a hole in shared anonymous memory allocates a page (slowly, here): holes are zero,
    so they are fed to the hash from a zero buffer instead. Same digest as hashing the bytes.
    """
    import xxhash

    from livemig.memtrack import present_pages

    present = present_pages(block.host_addr, block.size)
    h = xxhash.xxh3_128()
    edges = np.flatnonzero(np.diff(present.astype(np.int8))) + 1
    bounds = [0, *edges.tolist(), len(present)]
    for lo, hi in itertools.pairwise(bounds):
        start, end = lo * 4096, hi * 4096
        if present[lo]:
            h.update(block.view[start:end])
        else:
            for off in range(start, end, len(_ZERO_CHUNK)):
                h.update(_ZERO_CHUNK[: min(len(_ZERO_CHUNK), end - off)])
    return h.hexdigest()


def verify_vmsd(blocks: list) -> Any:
    from livemig import vmstate

    return vmstate.vmsd(VERIFY_IDSTR, 1, [vmstate.buffer(b.idstr, 16) for b in blocks])


@dataclass
class SourceConfig:
    """What one outgoing migration was asked to do (frozen at ``migrate`` time)."""

    uri: str
    capabilities: frozenset[str]
    params: dict[str, Any]
    verify: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class OutgoingMigration:
    """One pre-copy migration from this process's machine to a destination."""

    def __init__(
        self,
        machine: Any,
        config: SourceConfig,
        state: MigrationState,
        *,
        emit: Any = None,
        tracker_factory: Any = None,
        events_held: Any = None,
    ) -> None:
        self.machine = machine
        self.config = config
        self.state = state
        self.emit = emit or (lambda name, data=None: None)
        self.events_held = events_held or contextlib.nullcontext
        self.stats = MigrationStats()
        self.stats.total_bytes = sum(b.size for b in machine.ram_blocks)
        self.stats.expected_downtime_ms = config.params["downtime-limit"]
        self.rate = RateLimiter(config.params["max-bandwidth"])
        self._cancel = threading.Event()
        self._wake = threading.Event()
        self._continue = threading.Event()  # migrate-continue after pause-before-switchover
        self._tracker_factory = tracker_factory
        self.tracker: Any = None
        self.channel: Channel | None = None
        self.multifd: Any = None  # multifd.MultifdSender with capability multifd
        self.xbzrle: Any = None  # xbzrle_cache.XbzrleCache with capability xbzrle
        self.mapped_ram: Any = None  # mapped_ram.MappedRamSender (also self.multifd)
        self.thread = threads.Thread(target=self._run, name="mig/src/main", daemon=True)
        self._rp_thread: threading.Thread | None = None
        self._rp_shut: int | None = None
        self._rp_event = threading.Event()
        self._rp_error: str | None = None
        self._rp_unread: str | None = None  # a return path on a file: its read's error
        self._rp_reason: str | None = None  # the destination's own error (XError)
        self._rp_not_started = False  # ... and it said the guest never ran there
        self._pongs = 0  # PONGs seen: the destination reads our stream
        self._pong_event = threading.Event()  # set at each PONG (``_drain`` waits for one)
        # RAM block -> pages discarded on the destination before the post-copy switch (_drain)
        self.prediscarded: dict[str, np.ndarray] = {}
        # switchover-ack: the destination's approval of the switch-over (QEMU 8.1+)
        self._switchover_acked = threading.Event()
        self._stopped_guest = False
        self._blackout_prio: ThreadPriority | None = None  # see stop_guest
        self._blackout_prio_taken = False  # begin_blackout_priority ran (it may change nothing)
        # The guest stopped for good and the tracker synced after that: from here a page sent is
        # the page hashed (x-checksums asks the tracker nothing more)
        self._frozen = False
        self._t_stop: float | None = None
        self._was_running = False
        self._old_runstate = RunState.PAUSED  # the run state stop_guest found
        self.verified: bool | None = None
        self.verify_time = 0.0  # s spent hashing RAM for x-verify (the source's part)
        self.tracker_name = ""
        self.timeline: list[dict[str, Any]] = []
        self._conv: Any = None  # convergence.AutoConverge with capability auto-converge
        self.postcopy: Any = None  # PostcopySource with capability postcopy-ram
        self.checks: CK.SourceChecks | None = None  # with capability x-checksums
        self.colo: Any = None  # colo.ColoPrimary with capability x-colo
        self.colo_participants: list = []  # set by the manager (the service front)

    # -- control (any thread) -----------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def cancel(self) -> None:
        if self.colo is not None and self.colo.active:
            # replication ends, the guest goes on here: the standby is told not to take over
            self.colo.request_exit("cancelled by the user (migrate_cancel)")
            return
        self._cancel.set()
        self._wake.set()
        self._continue.set()
        ch = self.channel
        if ch is not None:
            ch.shutdown()
        if self.multifd is not None:
            self.multifd.shutdown()

    def continue_(self) -> None:
        self._continue.set()

    def set_max_bandwidth(self, rate: int) -> None:
        self.rate.rate = rate
        self._wake.set()

    def join(self, timeout: float | None = None) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    @property
    def threads(self) -> list[threading.Thread]:
        return [t for t in (self.thread, self._rp_thread) if t is not None]

    # -- the thread ------------------------------------------------------------------------

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise Cancelled("migration cancelled")

    def _run(self) -> None:
        st = self.state
        try:
            self._setup()
            st.move(MigrationStatus.ACTIVE)
            self._iterate()
            self._complete()
        except Cancelled:
            self._fail(cancelled=True, reason="cancelled by the user")
        except (LivemigError, OSError) as exc:
            if self._cancel.is_set():
                self._fail(cancelled=True, reason="cancelled by the user")
            else:
                reason = self._failure_reason(exc)
                log.warning("migration failed: %s", reason)
                self._fail(cancelled=False, reason=reason)
        except BaseException as exc:  # a bug: still never lose the guest
            log.exception("migration thread crashed")
            self._fail(cancelled=False, reason=f"internal error: {exc!r}")
        finally:
            self.end_blackout_priority()
            self._cleanup()

    def _failure_reason(self, exc: BaseException) -> str:
        """Our error, led by the destination's verdict when it refused the stream: a
        destination that fails to load sends SHUT(1) and closes, and our next write then only
        says "Broken pipe", which hides why."""
        if self._rp_thread is not None and self._rp_shut is None:
            self._rp_event.wait(0.5)  # the SHUT may still be on its way
        if self._rp_reason is not None:
            return self._refused()
        if self._rp_shut not in (None, 0) and "SHUT" not in str(exc):
            return f"destination failed to load the migration (SHUT {self._rp_shut}): {exc}"
        if self._rp_error is not None and "TLS certificate" in self._rp_error:
            return self._rp_error  # the return path read the alert by which the peer refused us
        gone = self._exec_gone()
        if gone is not None:
            return f"{gone} before it took the whole stream ({exc})"
        if self._silent_drop(exc):
            return (f"{exc}: the destination dropped the connection without answering the "
                    "stream's first PING, as one with tls-creds does to a source without TLS "
                    "(set tls-creds here too), or it is not a migration destination")  # fmt: skip
        if (isinstance(exc, ChannelError) and not getattr(self, "return_path", True)
                and self.channel is not None and self.channel.readable):  # fmt: skip
            return (
                f"{exc} (the destination closed the connection: its log says why; with "
                "capability return-path on, its reason is reported here)"
            )
        return str(exc)

    def _exec_gone(self) -> str | None:
        """An ``exec:`` command that ended while the stream was being written: how it ended
        (the write only says "Broken pipe"); None for anything else."""
        ch = self.channel
        if ch is None or self.config.uri.partition(":")[0] != "exec":
            return None
        deadline = time.monotonic() + 0.5
        while (status := ch.process_status()) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if status is None:
            return None
        how = f"killed by signal {-status}" if status < 0 else f"exited with status {status}"
        return f"the exec: command {how}"

    def _silent_drop(self, exc: BaseException) -> bool:
        """A plain source's connection broken before the destination said anything: a TLS
        destination drops a stream it cannot read so, and the source saw only a broken pipe."""
        from livemig.transport.tls import TLSChannel

        reset = isinstance(exc.__cause__, BrokenPipeError | ConnectionResetError) or any(
            w in str(exc) for w in ("Broken pipe", "Connection reset"))  # fmt: skip
        return (reset and bool(getattr(self, "return_path", False)) and self._pongs == 0
                and not isinstance(self.channel, TLSChannel))  # fmt: skip

    def _refused(self) -> str:
        """The destination's verdict: its own words when it sent them (XError)."""
        if self._rp_reason is not None:
            return f"destination refused: {self._rp_reason}"
        return f"destination failed to load the migration (SHUT {self._rp_shut})"

    def _send(self, buffers: list, phase: str = "precopy", normal: int = 0, zero: int = 0) -> int:
        assert self.channel is not None
        n = self.channel.sendv(buffers)
        self.stats.account(n, normal, zero, phase)
        if phase == "precopy":
            self.rate.account(n)
        if self.multifd is not None:
            n += multifd.source_account(self, phase)
        return n

    def _setup(self) -> None:
        cfg = self.config
        caps = cfg.capabilities
        timeout = cfg.params["x-io-timeout"] / 1000
        self.channel = connect(cfg.uri, timeout=timeout, cancelled=self._cancel.is_set)
        self._check_cancel()
        self.return_path = (
            ("return-path" in caps or "postcopy-ram" in caps)
            and self.channel.is_socket
            and self.channel.readable
        )
        if "return-path" in caps and not self.return_path:
            # QEMU 10.0 opens the return path of a file: on the file itself; its thread's
            # first read fails, and that fails the migration once everything is written
            # ("Unable to read from file: Bad file descriptor", in device, not at migrate)
            unread = self.channel.read_back()
            if unread is not None:
                self._rp_unread = f"Unable to read from file: {unread.strerror or unread}"
        from livemig.memtrack import open_tracker, present_pages

        factory = self._tracker_factory or open_tracker
        self.tracker = factory(self.machine.ram_blocks, backend=cfg.params["x-dirty-tracker"],
                               hot=cfg.params["x-dirty-hot-chunks"])  # fmt: skip
        self.tracker_name = self.tracker.name
        # Pages the kernel never populated are zero on both sides: the first pass skips them
        # without reading them (QEMU reads every page of the guest). The scan must come before
        # write-protection starts (which marks every page) and no guest write may fall between
        # the two, so the vCPUs are held for that moment (no run-state change).
        with self.machine.quiesced():
            populated = {b.idstr: present_pages(b.host_addr, b.size)
                         for b in self.machine.ram_blocks}  # fmt: skip
            self.tracker.start()
        self.ram = RamSaver(self.machine.ram_blocks, populated)
        # QEMU's ram_init_bitmaps: the first dirty-bitmap sync (every page dirty) is pass 1,
        # with its MIGRATION_PASS, while the migration is still in setup
        self.stats.note_sync(0)
        self.emit("MIGRATION_PASS", {"pass": self.stats.dirty_sync_count})
        if "auto-converge" in caps:
            from livemig.migration.convergence import AutoConverge

            # QEMU's first throttle period starts at this sync, not at the next one
            self._conv = AutoConverge(cfg.params, start=time.monotonic())
        self.stats.zero_pages += self.ram.skipped_unpopulated
        self.stats.unpopulated_pages = self.ram.skipped_unpopulated
        self.encoder = Encoder()
        enc = self.encoder
        bufs: list = []
        bufs += enc.send(E.Header())
        # mapped-ram changes the block list layout, x-checksums adds sections: announced like
        # QEMU's enforced capabilities
        mapped = "mapped-ram" in caps
        announce = tuple(c for c in ("mapped-ram", CK.CAPABILITY) if c in caps)
        bufs += enc.send(E.Configuration(MACHINE_TYPE, announce or None))
        if CK.CAPABILITY in caps:
            self._setup_checks()
        if self.return_path:
            bufs += enc.send(E.OpenReturnPath())
            bufs += enc.send(E.Ping(1))
            bufs += enc.send(E.Ping(X_FEATURES_PING))  # "send me your reason": wire/constants
            self._start_return_path()
        if "postcopy-ram" in caps:
            from livemig.migration.postcopy_source import PostcopySource

            if not self.return_path:
                raise MigrationError(f"post-copy needs a return path; {cfg.uri} has none")
            self.postcopy = PostcopySource(self)
            bufs += self.postcopy.advise()
        if "x-colo" in caps:  # as QEMU, before the setup sections
            from livemig.migration.colo import ColoPrimary

            if not self.return_path:
                raise MigrationError(f"x-colo needs a return path; {cfg.uri} has none")
            self.colo = ColoPrimary(self, self.colo_participants, self.emit)
            bufs += enc.send(E.EnableColo())
        # the machine's shape first: a destination that cannot take it refuses before any RAM
        enc.devices[MACHINE_IDSTR] = MACHINE_VMSD
        bufs += enc.send(E.SectionFull(1, MACHINE_IDSTR, 0, MACHINE_VMSD.version_id,
                                       describe_machine(self.machine)))  # fmt: skip
        if self.checks is not None:  # a unit of its own: the device state's comes at the end
            bufs += self._checksum(self._device_unit)
            self._device_unit = CK.Unit()
        self._ram_sid = 2
        infos = tuple(E.RamBlockInfo(b.idstr, b.size) for b in self.machine.ram_blocks)
        bufs += enc.send(E.SectionStart(self._ram_sid, "ram", 0, RAM_SECTION_VERSION))
        if mapped:
            self._send(bufs)
            bufs = []
            mapped_ram.source_setup(self)  # block list + headers; the stream skips the regions
        else:
            bufs += enc.send(E.RamSetup(sum(b.size for b in self.machine.ram_blocks), infos))
        if "multifd" in caps and not mapped:
            # QEMU 8.1+: the channels connect and sync inside the setup section, and a
            # MULTIFD_FLUSH says so; a reader then knows that EOS is not a sync point (7.2's)
            self._send(bufs)
            bufs = []
            multifd.source_setup(self)
            multifd.source_flush(self, "precopy", in_section=True)
        bufs += enc.send(E.RamEos())
        bufs += enc.send(E.SectionFooter(self._ram_sid))
        self._send(bufs)
        if self.multifd is None and self.config.params["zero-page-detection"] == "none":
            self.ram.find_zero = False  # QEMU 9.0: every page is sent as a normal one
        xbzrle_cache.source_setup(self)
        self.stats.setup_time = time.monotonic() - self.stats.start
        self.stats.remaining = self.ram.pending_pages() * 4096
        self._pass_start = time.monotonic()
        self._pass_bytes = self.stats.transferred
        self._record_pass(reason="setup: every populated page is dirty")

    def _setup_checks(self) -> None:
        """x-checksums: every unit of RAM records and the device state end with a checksum."""
        tracker = self.tracker
        self.checks = CK.SourceChecks(
            self.machine.ram_blocks, written=tracker.written,
            live=lambda: not self._frozen, requeue=tracker.mark_dirty_pages,
        )  # fmt: skip
        self.encoder.devices[CK.IDSTR] = CK.vmsd()
        self._device_unit = CK.Unit()

        def on_full(idstr: str, instance_id: int, version_id: int, payload: bytes) -> None:
            if idstr != CK.IDSTR:
                self._device_unit.add_device(idstr, instance_id, version_id, payload)

        self.encoder.on_full = on_full

    def _checksum(self, unit: CK.Unit) -> list:
        """The x-checksum section closing ``unit``, which has just been sent."""
        assert self.checks is not None
        state = self.checks.section_state(unit)
        return self.encoder.send(E.SectionFull(CK.SECTION_ID, CK.IDSTR, 0, CK.VERSION, state))

    # -- return path ---------------------------------------------------------------------------

    def _start_return_path(self) -> None:
        self._rp_thread = threads.Thread(target=self._rp_loop, name="mig/src/return", daemon=True)
        self._rp_thread.start()

    def _rp_loop(self) -> None:
        assert self.channel is not None
        dec = ReturnPathDecoder()
        buf = bytearray(4096)
        view = memoryview(buf)
        try:
            while True:
                try:
                    n = self.channel.recv_into(view, hold_gil=True)
                except ChannelTimeout:
                    # The destination speaks only when asked (PONG) and at the end (SHUT): a
                    # long, quiet pre-copy is no failure (QEMU's return-path thread blocks with
                    # no time-out). A stalled peer shows on the sending side and in SHUT's wait.
                    continue
                if n == 0:
                    if self._rp_shut is None:
                        self._rp_error = "destination closed the return path without SHUT"
                    break
                if self.postcopy is not None:
                    req = dec.page_request(view[:n])
                    if req is not None:
                        self.postcopy.on_page_request(*req)
                        continue
                dec.receive_data(bytes(view[:n]))
                for msg in dec.events():
                    self._on_rp(msg)
                if self._rp_shut is not None:
                    break
        except ChannelError as exc:
            if self._rp_shut is None and not self._cancel.is_set():
                self._rp_error = f"return path: {exc}"
        except LivemigError as exc:
            self._rp_error = f"return path: {exc}"
        except BaseException as exc:  # a bug: the migration thread must hear of it
            log.exception("return-path thread crashed")
            self._rp_error = f"return path: internal error: {exc!r}"
        finally:
            self._rp_event.set()
            self._wake.set()
            if self.colo is not None:
                self.colo.rp_closed(self._rp_error or "the return path ended")

    def _on_rp(self, msg: Any) -> None:
        if self.colo is not None:
            self.colo.heard()
            if isinstance(msg, RP.XColo):
                return self.colo.on_rp(msg)
        if isinstance(msg, RP.Shut):
            self._rp_shut = msg.status
        elif isinstance(msg, RP.XError):
            self._rp_reason = msg.reason
            self._rp_not_started = msg.not_started
        elif isinstance(msg, RP.Pong):
            self._pongs += 1
            self._pong_event.set()
            log.debug("PONG %d", msg.value)
            if self.postcopy is not None:
                self.postcopy.on_pong(msg.value)
        elif isinstance(msg, RP.SwitchoverAck):
            self._switchover_acked.set()
            self._wake.set()
        elif self.postcopy is not None:
            self.postcopy.on_rp(msg)

    # -- iteration ---------------------------------------------------------------------------

    def _record_pass(self, reason: str, dirty: int | None = None) -> None:
        now = time.monotonic()
        dur = now - self._pass_start
        sent = self.stats.transferred - self._pass_bytes
        rec = PassRecord(
            number=self.stats.dirty_sync_count, at=now - self.stats.start,
            dirty_pages=self.ram.pending_pages() if dirty is None else dirty,
            bytes_sent=sent, duration=dur, bandwidth=sent / dur if dur > 0 else 0.0,
            reason=reason,
        )  # fmt: skip
        self.stats.passes.append(rec)
        log.info("pass %d: %d dirty pages; %s", rec.number, rec.dirty_pages, reason)
        self._pass_start = now
        self._pass_bytes = self.stats.transferred

    def _sync(self, reason: str) -> None:
        if self.multifd is not None:
            multifd.source_flush(self, "precopy")  # pages of this pass land before the next's
        if self.xbzrle is not None:
            self.xbzrle.on_sync()
        synced = self.tracker.sync()
        new = self.ram.merge(synced)
        written = sum(int(np.count_nonzero(b)) for b in synced.values())
        elapsed = time.monotonic() - self._pass_start
        # bytes the guest writes per second, as the refiner needs it: distinct pages per pass
        self._dirty_bps = written * 4096 / elapsed if elapsed > 0 else 0.0
        self.stats.note_sync(new)
        self.stats.remaining = self.ram.pending_pages() * 4096
        self.emit("MIGRATION_PASS", {"pass": self.stats.dirty_sync_count})
        self._record_pass(reason)
        self._auto_converge(new)
        self._warn_growing_snapshot()

    def _warn_growing_snapshot(self) -> None:
        """A file or pipe keeps every pass: say so once when it passes 3x the guest's RAM."""
        s = self.stats
        if (not getattr(self, "_growth_warned", False) and self.mapped_ram is None
                and self.channel is not None and not self.channel.is_socket
                and s.transferred > 3 * s.total_bytes):  # fmt: skip
            self._growth_warned = True
            log.warning("the snapshot has grown to %d bytes, %.1f times the guest's RAM: the "
                        "guest dirties memory as fast as it is saved. Cancel it, or make it "
                        "converge: stop the guest first, capability mapped-ram (a fixed-size "
                        "file) or auto-converge", s.transferred,
                        s.transferred / max(1, s.total_bytes))  # fmt: skip

    def can_switchover(self) -> bool:
        """QEMU's migration_can_switchover: with switchover-ack, not before the destination
        approved (it does once its return path is open, when no device needs more time)."""
        return ("switchover-ack" not in self.config.capabilities
                or self._switchover_acked.is_set())  # fmt: skip

    def _iterate(self) -> None:
        params = self.config.params
        refiner = SwitchoverRefiner(params["x-switchover-refine"])
        refining = False
        waiting_ack = False
        while True:
            self._check_cancel()
            self._check_rp()
            if self.postcopy is not None and self.postcopy.should_switch() and \
                    self.can_switchover():  # fmt: skip
                return
            # what the socket still holds must cross the link in the blackout too
            queued = self.channel.unsent() if self.channel is not None else 0
            dirty = self.ram.pending_pages() * 4096
            pending = dirty + queued
            threshold = self.stats.threshold
            # a refining pass sends all it started with before the next sync
            check = dirty == 0 if refining else pending <= threshold
            if check:
                self._sync(f"pending {pending} B <= threshold {threshold} B")
                pending = self.stats.remaining + queued
                refining = False
                if pending <= self.stats.threshold and not self.can_switchover():
                    # QEMU goes on iterating until the destination approves
                    if not waiting_ack:
                        log.info("switch-over waits for the destination's switchover-ack")
                        waiting_ack = True
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                if pending <= self.stats.threshold:
                    # another pass only shrinks dirty pages, not what the socket holds
                    if not self.stats.remaining or not refiner.another_pass(
                        pending, self._dirty_bps, self.stats.bandwidth
                    ):
                        log.info("switch-over: %d B left fit in threshold %d B", pending,
                                 self.stats.threshold)  # fmt: skip
                        return
                    refining = True
                    log.info("refining pass: %d B left fit in threshold %d B, but the guest "
                             "dirties %d B/s: one more pass to shrink the blackout", pending,
                             self.stats.threshold, self._dirty_bps)  # fmt: skip
            if dirty == 0 and queued > threshold:
                # Every page is sent but the socket still holds more than the threshold: wait
                # for it to drain (about the excess over the measured bandwidth) rather than
                # send empty sections in a loop, which burnt this thread's core and added a
                # 20-byte PART per turn to the stream.
                self._wait_drain(queued - threshold)
                continue
            if self._conv is not None and self._conv.sync_due(
                time.monotonic(), self.stats.dirty_sync_count
            ):
                self._sync("auto-converge: no sync for 5 s (QEMU 9.2+'s dirty sync timer)")
            self._send_part()
            self.stats.remaining = self.ram.pending_pages() * 4096
            self.rate.wait(self._wake)
            self._wake.clear()
            # after the wait, as QEMU's migration_update_counters comes after its rate-limit
            # sleep: the measuring window then ends where the limiter's does, and holds whole
            # budgets (closed before the wait, it held one budget over 100-200 ms, and the
            # switch-over threshold, bandwidth x downtime-limit, came out low and noisy)
            self._update_window()

    def _update_window(self) -> None:
        params = self.config.params
        self.stats.update_window(params["downtime-limit"], params["avail-switchover-bandwidth"],
                                 self.rate.rate, self.channel.unsent() if self.channel else 0)  # fmt: skip

    def _wait_drain(self, excess: int) -> None:
        bw = self.stats.bandwidth or 100e6
        self._update_window()
        self._wake.wait(min(DRAIN_WAIT_MAX, max(DRAIN_WAIT_MIN, excess / bw / 2)))
        self._wake.clear()

    def _send_part(self) -> None:
        enc = self.encoder
        sid = self._ram_sid
        t0 = time.monotonic()
        # multifd channels take bigger jobs: each costs a queue hand-off and a writev
        batch = multifd.JOB_PAGES if self.multifd is not None else BATCH_PAGES
        opened = False  # a PART of unchecked records is open
        checked = 0
        # x-checksums: the open unit (one PART section, up to MAX_DATA data records over
        # several writevs), and the checksum of the last one, which goes out with the next
        unit: CK.Unit | None = None
        closing: list = []
        while True:
            budget = self.rate.budget_left()
            if budget <= 0 or time.monotonic() - t0 > MAX_PART_TIME:
                break
            if self.multifd is not None:  # a job of mostly zero pages is bigger (job_pages)
                batch = getattr(self.multifd, "job_pages", batch)
            pages = max(1, min(batch, budget // 4096))
            batches = self.ram.take(pages)
            if not batches:
                break
            if self.checks is not None:
                fresh = unit is None
                if unit is None:
                    unit = CK.Unit()
                out, normal, zero = self._encode_batches(batches, unit)
                if not unit:  # every page went to the multifd channels
                    self._send(out, normal=normal, zero=zero)
                    unit = None
                    continue
                head = [*closing, *enc.send(E.SectionPart(sid))] if fresh else []
                closing = []
                # hashed before the send: the kernel then copies the pages out of the cache
                self.checks.prepare(unit)
                unit.feed(self.checks.views)
                if unit.ndata > CK.MAX_DATA - batch:
                    out += [*enc.send(E.RamEos()), *enc.send(E.SectionFooter(sid))]
                self._send([*head, *out], normal=normal, zero=zero)
                if unit.ndata > CK.MAX_DATA - batch:
                    closing, unit = self._checksum(unit), None
                    checked += 1
                continue
            out, normal, zero = self._encode_batches(batches)
            if not opened:
                out = [*enc.send(E.SectionPart(sid)), *out]
                opened = True
            self._send(out, normal=normal, zero=zero)
        if unit is not None:
            self._send([*enc.send(E.RamEos()), *enc.send(E.SectionFooter(sid))])
            closing = self._checksum(unit)
            checked += 1
        if closing:
            self._send(closing)
        if opened or not checked:
            head = [] if opened else enc.send(E.SectionPart(sid))
            self._send([*head, *enc.send(E.RamEos()), *enc.send(E.SectionFooter(sid))])

    def _encode_batches(self, batches: list, unit: CK.Unit | None = None) -> tuple[list, int, int]:
        """Main-channel records of ``batches`` (and, with checksums, what ``unit`` covers)."""
        if self.multifd is not None:
            return multifd.source_queue(self, batches, unit)
        if self.xbzrle is not None:
            return xbzrle_cache.encode_batches(self, batches, unit)
        out: list = []
        normal = zero = 0
        for b in batches:
            if len(b.zero):
                out += self.encoder.encode_zero_pages(b.idstr, b.zero.astype(np.uint64) << 12)
                zero += len(b.zero)
                if unit is not None:
                    unit.add(b.idstr, CK.KIND_ZERO, b.zero)
            if len(b.normal):
                # address rows, not a memoryview per header and page (livemig/iovec.py)
                out += self.encoder.encode_pages_gather(
                    b.idstr, b.normal.astype(np.uint64) << 12, b.block.view
                )
                normal += len(b.normal)
                if unit is not None:
                    unit.add(b.idstr, CK.KIND_DATA, b.normal)
        return out, normal, zero

    def _check_rp(self) -> None:
        if self._rp_error is not None:
            raise MigrationError(self._rp_error)
        if self._rp_shut is not None and self._rp_shut != 0:
            raise MigrationError(self._refused())

    def _auto_converge(self, new_dirty: int) -> None:
        conv = self._conv
        if conv is None:
            return
        pct = conv.on_sync(self.stats.transferred, new_dirty)
        if pct and not self.stats.throttle and hasattr(self.tracker, "cool"):
            # throttling decisions need the guest's real dirty rate, not hot chunks' superset
            self.tracker.cool()
        if pct != self.stats.throttle:
            self.stats.throttle = pct
            self.machine.set_throttle(pct)

    # -- completion ---------------------------------------------------------------------------

    def _drain(self) -> None:
        """Before the post-copy switch, while the guest still runs: discard on the destination
        the pages to be sent in post-copy, and wait until it has read all that (a PING, then
        its PONG), at most ``DRAIN_TIMEOUT_S`` or a quarter of ``x-io-timeout``.

        Two things used to fill the blackout of a switch with a dirtying guest (traced, 256 MiB
        memstress at 200 MiB/s, median blackout 13-15 ms on a loaded host): the destination
        handles the discards only after the pre-copy bytes queued before them in the sockets'
        buffers (a burst of the rate limiter's window: it read them 5-10 ms after the source
        had stopped its guest), and then drops the discarded pages (50 MiB, 3-5 ms). Both now
        happen while the guest still runs here: after a sync, the pages still to send are
        discarded, and the source sends nothing more until the PONG, which a livemig
        destination sends once they are dropped (QEMU's at once: the wait then only covers the
        queued bytes). The switch then discards only the pages dirtied since (the few this
        wait lets the guest dirty). Without a return path there is no PONG: nothing to wait
        for. With multifd the channels' pages could land after such a discard (see
        PostcopySource.run): only the wait.

        The price (benchmarks/README.md, session 12): the guest runs sooner on the destination,
        before the background push has got far, so with a guest that dirties fast it then
        waits more on page faults (postcopy-blocktime). ``x-postcopy-drain`` false switches as
        before."""
        if not self.config.params.get("x-postcopy-drain", True):
            return
        if not getattr(self, "return_path", False) or self.channel is None:
            return
        bufs: list = []
        if self.multifd is None:
            from livemig.migration.postcopy_source import discard_bufs

            self.stats.note_sync(self.ram.merge(self.tracker.sync()))
            # a sync like any other: QEMU's migration_bitmap_sync sends one for each
            self.emit("MIGRATION_PASS", {"pass": self.stats.dirty_sync_count})
            self.prediscarded = {n: d.copy() for n, d in self.ram.dirty.items()}
            bufs += discard_bufs(self, self.prediscarded)
        seen = self._pongs
        self._pong_event.clear()
        self._send([*bufs, *self.encoder.send(E.Ping(X_DRAIN_PING))])
        # Nothing goes to the destination meanwhile, and it gives up on a main channel quiet
        # for x-io-timeout: wait a quarter of that at most, the switch must still come in time
        quiet = self.config.params["x-io-timeout"] / 1000 / 4
        deadline = time.monotonic() + min(DRAIN_TIMEOUT_S, quiet)
        while self._pongs == seen and time.monotonic() < deadline:
            self._check_cancel()
            self._check_rp()
            self._pong_event.wait(0.005)
            self._pong_event.clear()

    def _complete(self) -> None:
        if self.postcopy is not None and self.postcopy.should_switch():
            self._drain()
            return self.postcopy.run()
        m = self.machine
        caps = self.config.capabilities
        # Real-time before the downtime starts, as the post-copy switch does (and QEMU, which
        # takes the BQL before migration_downtime_start): only system calls, no work the
        # stopped guest waits for (four of them, 40-180 us on a loaded host)
        self.begin_blackout_priority()
        t_stop = self._t_stop = time.monotonic()
        self.stop_guest()
        t_stopped = time.monotonic()
        if "pause-before-switchover" in caps:
            self.state.move(MigrationStatus.PRE_SWITCHOVER)
            while not self._continue.wait(0.1):
                self._check_cancel()
            self._check_cancel()
        # QEMU 10.0 (migration_switchover_prepare) is in "device" for the whole switch-over
        self.state.move(MigrationStatus.DEVICE)
        if self.multifd is not None and self.checks is not None:
            # the channels' jobs are checked against what the tracker saw since the previous
            # sync, which the final one resets: they must all be out first
            multifd.source_flush(self, "downtime")
        # final pass: everything still dirty, no rate limit
        new = self.ram.merge(self.tracker.sync())
        self._frozen = True
        self.stats.note_sync(new)
        self.emit("MIGRATION_PASS", {"pass": self.stats.dirty_sync_count})
        self._record_pass("final sync with the guest stopped")
        t_sync = time.monotonic()
        enc = self.encoder
        self._send(enc.send(E.SectionEnd(self._ram_sid)), "downtime")
        # x-checksums: the END section is one unit (the guest is stopped: nothing to exclude),
        # hashed batch by batch right after each send
        unit = CK.Unit() if self.checks is not None else None
        while True:
            # 1 MiB at a time, as in pre-copy: the destination copies one batch while we
            # gather the next (16 MiB batches serialised the two: downtime 57-257 ms -> 24-32
            # ms for a 16 MiB working set at a 50 ms limit).
            batches = self.ram.take(BATCH_PAGES)
            if not batches:
                break
            out, normal, zero = self._encode_batches(batches, unit)
            if unit is not None:
                unit.feed(self.checks.views)  # type: ignore[union-attr]  # then the kernel's copy
            self._send(out, "downtime", normal, zero)
        if self.multifd is not None:
            multifd.source_flush(self, "downtime", in_section=True)  # all RAM before devices
            if unit is not None and self.mapped_ram is not None:
                for idstr, sealed in self.mapped_ram.seals:  # the file's bitmaps and digests
                    unit.add_device(CK.SEAL_IDSTR, 0, 1, idstr.encode() + sealed)
        self._send([*enc.send(E.RamEos()), *enc.send(E.SectionFooter(self._ram_sid))],
                   "downtime")  # fmt: skip
        if unit:
            self._send(self._checksum(unit), "downtime")
        t_ram = time.monotonic()
        self.stats.remaining = 0
        bufs = self._device_sections()
        if self.checks is not None:
            bufs += self._checksum(self._device_unit)  # the device state as sent
        # EOF leaves with the device state: the destination loads it (and could start the
        # guest) while the vmdesc, a description for analysis tools, is built here (~0.25 ms)
        self._send([*bufs, *enc.send(E.Eof())], "downtime")
        self._send(enc.send(E.VMDescription(enc.vmdesc().description)), "downtime")
        t_dev = time.monotonic()
        self.stats.downtime_breakdown = {
            "vcpu-stop": t_stopped - t_stop,
            "final-sync": t_sync - t_stopped,
            "final-ram": t_ram - t_sync,
            "device-state": t_dev - t_ram - self.verify_time,
        }
        if self.config.verify:
            self.stats.downtime_breakdown["verify-hashing"] = self.verify_time
        self.end_blackout_priority()  # all is sent: only the destination's answer is awaited
        if self.colo is not None:
            return self.colo.run(t_stop)  # checkpoints until replication ends (migration/colo.py)
        if self.return_path:
            self._await_shut()
        else:
            assert self.channel is not None
            self.channel.close_write()
            if self.config.uri.startswith("exec:"):
                self._await_exec_exit()
            if self._rp_unread is not None:
                raise MigrationError(self._rp_unread)
        t_end = time.monotonic()
        self.stats.downtime_breakdown["resume"] = t_end - t_dev
        self.stats.blackout_marks = {"stop": t_stop, "sent": t_dev, "shut": t_end}
        self.stats.set_downtime(t_stop, t_end)
        self.stats.total_time = t_end - self.stats.start
        self.stats.update_window(self.config.params["downtime-limit"])
        active = self.stats.total_time - (self.stats.setup_time or 0)
        if active > 0:
            self.stats.mbps = self.stats.transferred * 8 / 1e6 / active
        if self.config.verify:
            self.verified = self._rp_shut == 0 if self.return_path else None
        m.set_runstate(RunState.POSTMIGRATE)
        self.state.move(MigrationStatus.COMPLETED)

    def begin_blackout_priority(self) -> None:
        """This thread real-time until the guest runs again, here or there; ``stop_guest`` does
        it unless it was done already. A caller may do it before the downtime starts, as QEMU
        takes the BQL before ``migration_downtime_start``: it is no work the stopped guest
        waits for, only system calls (four, 40-180 us measured on a loaded host)."""
        if not self._blackout_prio_taken:
            self._blackout_prio = blackout_priority()
            self._blackout_prio_taken = True

    def stop_guest(self) -> None:
        """The blackout begins: vCPUs stopped in ``finish-migrate`` (event STOP), throttle
        off; from here a failure restarts the guest (``_fail``) unless it has moved on.
        ``_t_stop`` is when the downtime starts (QEMU's ``migration_stop_vm``)."""
        m = self.machine
        self._t_stop = time.monotonic()
        self.begin_blackout_priority()
        self._was_running = m.runstate == RunState.RUNNING
        self._old_runstate = m.runstate
        if self._was_running:
            m.pause(RunState.FINISH_MIGRATE)
        else:
            m.set_runstate(RunState.FINISH_MIGRATE)
        self._stopped_guest = True
        if self.stats.throttle:
            m.set_throttle(0)
            self.stats.throttle = 0

    def end_blackout_priority(self) -> None:
        """This thread goes back to its normal scheduling (``stop_guest`` made it real-time)."""
        restore_priority(self._blackout_prio)
        self._blackout_prio = None
        self._blackout_prio_taken = False

    def _device_sections(self) -> list:
        enc = self.encoder
        bufs: list = []
        entries: list[SaveStateEntry] = machine_entries(self.machine)
        saved = [(e, e.save()) for e in entries]
        sid = 3
        states: list[tuple[str, int, Any, dict[str, Any]]] = [
            (e.idstr, e.instance_id, e.vmsd, values) for e, values in saved
        ]
        gs = encode_globalstate("running" if self._was_running else "paused")
        states.append(("globalstate", 0, GLOBALSTATE_VMSD, gs))
        if self.config.verify:
            t0 = time.monotonic()
            hashes = ram_hashes(self.machine.ram_blocks)
            self.verify_time = time.monotonic() - t0  # in the blackout: reported on its own
            vs = verify_vmsd(self.machine.ram_blocks)
            states.append((VERIFY_IDSTR, 0, vs, {k: bytes.fromhex(v) for k, v in hashes.items()}))
            self.source_hashes = hashes
            states.append((STATE_IDSTR, 0, state_vmsd(entries), state_digests(saved)))
        for idstr, inst, vmsd, values in states:
            enc.devices[idstr] = vmsd
            bufs += enc.send(E.SectionFull(sid, idstr, inst, vmsd.version_id, values))
            sid += 1
        return bufs

    def _await_shut(self) -> None:
        timeout = self.config.params["x-io-timeout"] / 1000
        if not self._rp_event.wait(timeout):
            raise MigrationError(f"destination did not confirm (no SHUT within {timeout:g} s)")
        if self._rp_shut is None:
            raise MigrationError(self._rp_error or "return path closed without SHUT")
        if self._rp_shut != 0:
            raise MigrationError(self._refused())

    def _await_exec_exit(self) -> None:
        """``exec:`` has no return path: the command's exit is the only word on whether it
        took the stream. Unread (a stream that fit in the pipe) or refused (a full disk), it
        was 'completed' and the guest left stopped with its state lost; QEMU does not look
        either. A non-zero status, or no exit within x-io-timeout, fails the migration."""
        assert self.channel is not None
        timeout = self.config.params["x-io-timeout"] / 1000
        status = self.channel.wait_process(timeout, self._cancel.is_set)
        if status != 0:
            how = f"killed by signal {-status}" if status < 0 else f"exited with status {status}"
            raise MigrationError(f"the exec: command {how}: the stream may not have been kept")

    # -- failure and cleanup -----------------------------------------------------------------

    def _fail(self, cancelled: bool, reason: str) -> None:
        # QEMU 10.0's order of events: a failure is MIGRATION failed, then RESUME (its
        # migration_completion_failed, then migration_iteration_finish's vm_start); a cancel
        # is cancelling, RESUME, then cancelled (migrate_fd_cleanup ends the cancel)
        st = self.state
        if cancelled:
            if st.status != MigrationStatus.CANCELLING:
                st.try_move(st.status, MigrationStatus.CANCELLING)
            self._restart_guest()
            st.try_move(MigrationStatus.CANCELLING, MigrationStatus.CANCELLED)
        elif st.status == MigrationStatus.CANCELLING:
            self._restart_guest()
            st.move(MigrationStatus.CANCELLED)
        else:
            st.try_move(st.status, MigrationStatus.FAILED, error=reason)
            self._restart_guest()
        self.stats.total_time = time.monotonic() - self.stats.start

    def _restart_guest(self) -> None:
        """The guest runs on at the source as it ran before (paused if it was paused)."""
        m = self.machine
        if self._stopped_guest:
            try:
                m.set_throttle(0)
                if self._was_running:
                    m.set_runstate(RunState.RUNNING)  # restarts the vCPUs (RESUME)
                else:
                    # the state it was stopped from, as QEMU 10.0 restores vm_old_state: a
                    # guest never started (-S) is in prelaunch again, not paused
                    m.set_runstate(self._old_runstate)
            except LivemigError:
                log.exception("could not restart the guest after a failed migration")
        elif self.stats.throttle:
            m.set_throttle(0)

    def _cleanup(self) -> None:
        multifd.source_close(self, self.state.status == MigrationStatus.COMPLETED)
        if self.tracker is not None:
            try:
                self.tracker.stop()
            except LivemigError:
                log.exception("dirty tracker did not stop cleanly")
        ch = self.channel
        if ch is not None:
            ch.shutdown()
            if self._rp_thread is not None:
                self._rp_thread.join(5)
            ch.close()

    # -- reporting ---------------------------------------------------------------------------

    def query(self) -> dict[str, Any]:
        """The source part of query-migrate."""
        status = self.state.status
        s = self.stats
        out: dict[str, Any] = {"status": status.value}
        shows_ram = status not in (MigrationStatus.SETUP, MigrationStatus.FAILED,
                                   MigrationStatus.CANCELLED, MigrationStatus.NONE)  # fmt: skip
        if shows_ram:
            out["ram"] = s.ram_info()
            multifd.source_query(self, out)

            out["total-time"] = s.elapsed_ms()
            out["setup-time"] = int((s.setup_time or 0) * 1000)
            # QEMU's migrate_show_downtime: completed, and in post-copy, where the blackout is
            # over once the destination runs the guest (COLO: the first migration's)
            if status in _SHOWS_DOWNTIME:
                out["downtime"] = s.downtime_ms or 0
            else:
                out["expected-downtime"] = s.expected_downtime_ms
        if s.throttle:
            out["cpu-throttle-percentage"] = s.throttle
        # as QEMU 8.1+ does: the reason also while post-copy waits paused for a recovery
        if status in (MigrationStatus.FAILED, MigrationStatus.POSTCOPY_PAUSED) and \
                self.state.error:  # fmt: skip
            out["error-desc"] = self.state.error
        if self.tracker_name:  # none yet in setup, nor when it failed before tracking began
            out["x-dirty-tracker"] = self.tracker_name
        if "ram" in out and self.tracker is not None:
            # pages of chunks left writable between syncs (memtrack/hot.py), counted dirty
            out["ram"]["x-hot-pages"] = getattr(self.tracker, "hot_pages", 0)
        if self.config.verify and status == MigrationStatus.COMPLETED:
            if self.return_path:
                out["x-verified"] = self.verified
                out["x-verify-ms"] = round(self.verify_time * 1000, 1)
            else:
                # a file or a pipe: its checksums and RAM digests are checked when it is loaded
                out["x-verify"] = "at-load"
        if self.checks is not None:
            out["x-checksums"] = self.checks.query()
        if self.postcopy is not None:
            if "ram" in out:
                out["ram"]["postcopy-requests"] = self.postcopy.requests
            out.update(self.postcopy.query())
        return out

    def report(self) -> dict[str, Any]:
        """A timeline for ``livemig report``: passes, phases and the downtime breakdown."""
        s = self.stats
        setup_end = s.setup_time or 0.0
        phases: dict[str, list[float]] = {"setup": [0.0, setup_end]}
        if self._t_stop is not None:
            stop = self._t_stop - s.start
            phases["precopy"] = [setup_end, stop]
            switch = s.downtime_breakdown.get("postcopy-switch")
            if switch is not None:
                switch += s.downtime_breakdown.get("verify-hashing", 0.0)
                phases["stop-and-copy"] = [stop, stop + switch]
                if s.total_time is not None:
                    phases["postcopy"] = [stop + switch, s.total_time]
            elif s.total_time is not None:
                phases["stop-and-copy"] = [stop, s.total_time]
        elif s.total_time is not None:
            phases["precopy"] = [setup_end, s.total_time]
        return {
            "start-monotonic": s.start,
            "phases": phases,
            "passes": [p.__dict__ for p in s.passes],
            "setup-time": s.setup_time,
            "total-time": s.total_time,
            "downtime": s.downtime,
            "downtime-breakdown": s.downtime_breakdown,
            "blackout-marks": s.blackout_marks,
            "transferred": s.transferred,
            "dirty-tracker": self.tracker_name,
        }


_SHOWS_DOWNTIME = frozenset({
    MigrationStatus.COMPLETED, MigrationStatus.COLO, MigrationStatus.POSTCOPY_ACTIVE,
    MigrationStatus.POSTCOPY_PAUSED, MigrationStatus.POSTCOPY_RECOVER_SETUP,
    MigrationStatus.POSTCOPY_RECOVER,
})  # fmt: skip


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)
