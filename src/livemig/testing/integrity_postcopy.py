"""Random corruptions of live post-copy migrations, each one's outcome and RAM checked.

A post-copy stream cannot be recorded and replayed: the destination asks for pages, and what
the source sends depends on what it was asked. So each input here is one live migration
between two machines in this process: a memstress guest (1 vCPU, ``ws=4M rate=20000``: the
whole working set dirtied every 50 ms) runs on the source; pre-copy makes two passes
(rate-limited, a 0 ms downtime limit so it never converges by itself), then, 0.1 s later,
``migrate-start-postcopy``; the background push is rate-limited too, so that post-copy lasts
long enough to be asked for pages. Source and destination talk through a
``livemig.testing.relay.FlipRelay`` that damages the stream once: a random byte of a random
connection, a random kind of damage (one bit flipped, 4 KiB zeroed at a 4 KiB boundary of the
connection's bytes, or the connection cut there). Where: with probability 1/2 (1/3 with
``postcopy-preempt``) each, the main channel before the switch-over, the main channel after it
(discards, the package, the background push, requested pages without preempt) and, with
preempt, the preempt channel (requested pages); the byte is uniform within that part, as
measured by one clean migration of the same configuration (live runs vary a little: a
position the run did not reach is drawn again). ``postcopy-preempt`` is on for half the inputs,
chosen per input. Checksums (``x-checksums``) on and off; ``x-verify`` off, so that what is
measured is what the checksums do (x-verify's post-copy check compares digests at the end,
after the guest has run).

What is compared, and why it is sound. The destination is started paused (``-S``: QEMU's
autostart off), so its vCPUs never run: after the switch-over its RAM changes only by what
the migration installs (pages placed with UFFDIO_COPY / UFFDIO_ZEROPAGE, nothing else writes
guest RAM). The source's vCPUs stop at the switch-over and never run again (post-copy never
gives the guest back), so the source's RAM from that moment to the end is exactly the
memory the guest must continue with. A guest that runs after the switch-over would keep
changing its RAM and leave nothing to compare against; a paused one loses nothing of the
page-request path, because a "vCPU" here is a toucher thread: from the moment the destination
is in post-copy it reads, one by one and in random order, the pages the destination still
needs, with ``ctypes.memmove`` (the GIL released, as a vCPU faults inside ``emu_start``). A
read of a missing page faults exactly as a vCPU's would: the fault thread asks for it on the
return path, the source answers on the preempt channel (or the main one), the page is
installed and the reader woken. Reads change nothing. So when the destination says
``completed``, its RAM must equal the source's final RAM byte for byte (XXH3-128 per RAM
block), and any difference is memory the guest would have run on (the guest is started by
``cont`` at that point). While pages are still missing nothing reads guest RAM from Python
(the GIL rule of ``livemig.memtrack.uffd``). Not compared here: the vCPU and device state
(the post-copy package is one checksummed unit, checked before RUN; ``x-verify-state`` and
``livemig bench exact`` cover a guest going on exactly), and the timing of a real guest's
faults (its writes to a page once installed change nothing about which bytes were installed).

Outcome per input (``Tally``):

* ``refused``: failed before POSTCOPY_RUN (the guest never ran on the destination), the source
  guest running again (checked);
* ``identical``: completed, RAM equal to the source's;
* ``recovered``: post-copy paused on both sides (a cut link, or a checksum that failed: the
  damaged page is dropped with the link), then ``migrate-recover`` on the destination and
  ``migrate resume=true`` on the source over a clean link, completed, RAM equal;
* ``stopped``: failed after POSTCOPY_RUN: the destination stopped the incomplete guest
  (internal-error, which ``cont`` cannot leave) instead of running it; the source holds only
  part of it, so the guest is lost, but it never ran on wrong memory. Also counted here: the
  link died while the post-copy package was on its way, so the destination failed before RUN
  but could not tell the source, which keeps its guest stopped (it cannot know the guest did
  not start on the other side) -- lost too, never run wrong;
* ``wrong``: completed with RAM different from the source's;
* ``hangs``: no end within the deadline; ``crashes``: an internal error, a traceback, or a
  refused migration after which the source guest does not run.
"""

from __future__ import annotations

import contextlib
import ctypes
import random
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from livemig.errors import LivemigError
from livemig.testing.integrity import MEMORY, PAGE, Tally, ram_digests
from livemig.testing.relay import FlipRelay

GUEST_ARGS = "ws=4M rate=20000"  # every working-set page dirtied every ~50 ms
IO_TIMEOUT_MS = 2000
PRECOPY_BANDWIDTH = 32 << 20  # bytes/s: a pass over 8 MiB in about 0.25 s
POSTCOPY_BANDWIDTH = 12 << 20  # the background push: a few hundred ms of post-copy
PRECOPY_SYNCS = 2  # dirty syncs before the switch: every page sent once, the working set twice
# then this long for the guest to dirty its working set again, so that post-copy has most of
# it to send (switched right at a sync, only the pages of the last few ms were left)
SWITCH_AFTER = 0.1
DEADLINE = 45.0  # seconds for one input, recovery included
TOUCH_GAP = 0.001  # between two reads of the toucher


@dataclass
class Layout:
    """Bytes per part of a clean migration of one configuration (what positions come from)."""

    main: int
    switch: int  # main-channel bytes when the source entered postcopy-active
    preempt: int


@dataclass
class Damage:
    conn: int  # 0 main, 1 preempt
    at: int  # the connection's byte; -1: the first big read once the destination's guest runs
    mode: str  # flip | zero | cut
    bit: int = 0
    part: str = ""

    def __str__(self) -> str:
        how = {"flip": f"flip bit {self.bit} of", "zero": "zero 4 KiB at", "cut": "cut at"}
        at = f"byte {self.at}" if self.at >= 0 else "a read after the switch-over"
        return f"{self.part}: {how[self.mode]} {at}"


def pick(layout: Layout, preempt: bool, rng: random.Random) -> Damage:
    """A random damage to a migration shaped like ``layout``."""
    parts = [("main before switch-over", 0, 0, layout.switch),
             ("main after switch-over", 0, layout.switch, layout.main)]  # fmt: skip
    if preempt and layout.preempt > 0:
        parts.append(("preempt", 1, 0, layout.preempt))
    part, conn, lo, hi = rng.choice(parts)
    at = rng.randrange(lo, max(lo + 1, hi))
    mode = rng.choice(("flip", "zero", "cut"))
    if mode == "zero":
        at &= ~(PAGE - 1)
    return Damage(conn, at, mode, rng.randrange(8), part)


class _Toucher:
    """Reads the pages the destination still needs, as a vCPU would (see the module docstring)."""

    def __init__(self, inc: Any, rng: random.Random) -> None:
        pc = inc.postcopy
        self.pages = [(b.host_addr, int(i)) for n, b in pc.blocks.items()
                      for i in np.flatnonzero(pc.need[n])]  # fmt: skip
        rng.shuffle(self.pages)
        self.stop = threading.Event()
        self.touched = 0
        self.thread = threading.Thread(target=self._run, name="postcopy toucher", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        word = ctypes.c_uint64()
        for addr, i in self.pages:
            if self.stop.wait(TOUCH_GAP):
                return
            # the GIL is released for the copy: the fault thread can serve it
            ctypes.memmove(ctypes.addressof(word), addr + i * PAGE, 8)
            self.touched += 1


def migrate_once(checksums: bool, preempt: bool, damage: Damage | None, workdir: Path,
                 seed: int = 0) -> tuple[str, str, Layout | None, bool]:  # fmt: skip
    """One live post-copy migration through a relay that does ``damage`` (None: none).

    Returns (outcome, detail, the layout seen, whether the damage happened)."""
    from livemig.guests import build_guest
    from livemig.machine import Machine, RunState
    from livemig.machine.ram import parse_ram_blocks
    from livemig.migration.manager import MigrationManager
    from livemig.migration.postcopy_source import migrate_recover, start_postcopy
    from livemig.migration.state import MigrationStatus as S

    image = build_guest("memstress")
    src = Machine(parse_ram_blocks(MEMORY), smp=1, serial="null")
    dst = Machine(parse_ram_blocks(MEMORY), smp=1, serial="null")
    sm = MigrationManager(src)
    dm = MigrationManager(dst, autostart=lambda: False)
    relay: FlipRelay | None = None
    toucher: _Toucher | None = None
    closable = True
    final = {S.COMPLETED, S.FAILED, S.CANCELLED}
    try:
        src.load_guest(image.data, GUEST_ARGS)
        src.start()
        dst.set_runstate(RunState.INMIGRATE)
        caps = {"postcopy-ram": True, "return-path": True, "x-checksums": checksums,
                "postcopy-preempt": preempt}  # fmt: skip
        sm.caps.set(caps)
        dm.caps.set(caps)
        dm.params.set({"x-io-timeout": IO_TIMEOUT_MS})
        sm.params.set({"x-io-timeout": IO_TIMEOUT_MS, "downtime-limit": 0,
                       "max-bandwidth": PRECOPY_BANDWIDTH,
                       "max-postcopy-bandwidth": POSTCOPY_BANDWIDTH})  # fmt: skip
        target = dm.incoming_start("tcp:127.0.0.1:0")
        if damage is None:
            relay = FlipRelay(target, conn=-1, flip_at=0)
        else:
            relay = FlipRelay(target, conn=damage.conn, mode=damage.mode, bit=damage.bit,
                              flip_at=damage.at if damage.at >= 0 else None)  # fmt: skip
        time.sleep(0.3)  # the guest has written its working set
        sm.migrate(relay.uri)
        deadline = time.monotonic() + DEADLINE
        switch: int | None = None
        asked = paused = False
        synced: float | None = None
        inc = dm.incoming
        assert inc is not None
        while True:
            if time.monotonic() > deadline:
                return "hang", _states(sm, dm, "no end"), None, relay.flipped.is_set()
            s, d = sm.source.status, dm.dest.status
            out = sm.outgoing
            if synced is None and s == S.ACTIVE and out is not None and \
                    out.stats.dirty_sync_count >= PRECOPY_SYNCS:  # fmt: skip
                synced = time.monotonic()
            if not asked and synced is not None and time.monotonic() - synced >= SWITCH_AFTER:
                start_postcopy(sm)
                asked = True
            if switch is None and s in (S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.COMPLETED):
                switch = relay.carried[0] if relay.carried else 0
            if switch is not None and inc.guest_started:
                # armed once the destination's guest runs, not when the source switched: the
                # package (device state, discards) follows the source's switch, and damage to
                # it is refused before the guest runs there (the source takes its guest back)
                relay.armed.set()
            if toucher is None and inc.guest_started and inc.postcopy is not None and \
                    d == S.POSTCOPY_ACTIVE:  # fmt: skip
                toucher = _Toucher(inc, random.Random(seed))
            if d in final and (s in final or s == S.POSTCOPY_PAUSED or not inc.guest_started):
                break
            if s == S.POSTCOPY_PAUSED and d == S.POSTCOPY_PAUSED:
                if paused:
                    return "hang", _states(sm, dm, "paused again after a recovery"), None, \
                        relay.flipped.is_set()  # fmt: skip
                paused = True
                uri = f"unix:{workdir / f'recover-{seed}.sock'}"
                with contextlib.suppress(FileNotFoundError):
                    (workdir / f"recover-{seed}.sock").unlink()
                migrate_recover(dm, uri)
                sm.migrate(uri, resume=True)
            time.sleep(0.005)
        # the destination ended; let the source see it (SHUT, or a failed link)
        while sm.source.status not in final and sm.source.status != S.POSTCOPY_PAUSED and \
                time.monotonic() < deadline:  # fmt: skip
            time.sleep(0.005)
        hit = relay.flipped.is_set()
        carried = [*relay.carried, 0, 0]
        layout = Layout(carried[0], switch or 0, carried[1] if preempt else 0)
        d, derr = dm.dest.status, dm.dest.error or ""
        if derr.startswith("internal error") or (sm.source.error or "").startswith(
                "internal error"):  # fmt: skip
            return "crash", _states(sm, dm, "internal error"), layout, hit
        if d == S.COMPLETED:
            if toucher is not None:
                toucher.stop.set()
                toucher.thread.join(5)
            mine, theirs = ram_digests(dst.ram_blocks), ram_digests(src.ram_blocks)
            if mine != theirs:
                bad = [n for n in mine if mine[n] != theirs.get(n)]
                return "wrong", f"RAM differs from the source's in {', '.join(bad)}", layout, hit
            return ("recovered" if paused else "identical"), "", layout, hit
        if not inc.guest_started:
            if sm.source.status in (S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED):
                # The package left the source but never arrived whole, and the link died with
                # it: the source cannot know that the destination did not start the guest, so
                # it must not restart its copy (QEMU's rule too). Nothing runs; lost.
                return "stopped", _states(sm, dm, "the switch-over broke off"), layout, hit
            # refused before the guest ran there: the source must run its guest on
            t_end = time.monotonic() + 10
            while src.runstate != RunState.RUNNING and time.monotonic() < t_end:
                time.sleep(0.01)
            if src.runstate != RunState.RUNNING:
                return "crash", _states(sm, dm, f"refused, but the source guest is "
                                        f"{src.runstate.value}"), layout, hit  # fmt: skip
            return "refused", derr, layout, hit
        if dst.runstate != RunState.INTERNAL_ERROR:
            # paused would do as badly as running: ``cont`` would run it on zero-filled pages
            return "crash", _states(sm, dm, f"failed after the switch-over, yet the incomplete "
                                    f"guest is {dst.runstate.value}"), layout, hit  # fmt: skip
        return "stopped", derr, layout, hit
    finally:
        if toucher is not None:
            toucher.stop.set()
        for m in (sm, dm):
            m.cancel()
        if dm.incoming is not None:
            dm.incoming.cancel()
            dm.incoming.join(10)
        if sm.outgoing is not None:
            sm.outgoing.join(10)
        if relay is not None:
            relay.close()
        if toucher is not None:
            toucher.thread.join(10)
            # a reader still asleep on a missing page: unmapping its RAM would crash the
            # process; leave that machine be (the input is already counted as a hang)
            closable = not toucher.thread.is_alive()
        src.close()
        if closable:
            dst.close()


def _states(sm: Any, dm: Any, what: str) -> str:
    return (f"{what}: source {sm.source.status.value} ({sm.source.error or ''}), destination "
            f"{dm.dest.status.value} ({dm.dest.error or ''})")  # fmt: skip


def calibrate(checksums: bool, preempt: bool, workdir: Path) -> Layout:
    """A clean migration of this configuration: it must complete with identical RAM."""
    outcome, detail, layout, _ = migrate_once(checksums, preempt, None, workdir)
    if outcome != "identical" or layout is None:
        raise LivemigError(f"an unharmed post-copy migration (checksums {checksums}, preempt "
                           f"{preempt}) ends {outcome}: {detail}")  # fmt: skip
    if layout.switch <= 0 or layout.switch >= layout.main:
        raise LivemigError(f"the unharmed post-copy migration switched over at byte "
                           f"{layout.switch} of {layout.main}")  # fmt: skip
    return layout


def run_postcopy_corruptions(count: int, *, seed: int = 0, workdir: str | None = None,
                             progress: Any = None) -> dict[str, Tally]:  # fmt: skip
    """``count`` damaged live post-copy migrations, checksums on and off: the tallies."""
    out: dict[str, Tally] = {}
    with tempfile.TemporaryDirectory(prefix="livemig-integrity-pc-", dir=workdir) as d:
        for checksums in (True, False):
            layouts = {p: calibrate(checksums, p, Path(d)) for p in (False, True)}
            tally = Tally()
            for i in range(count):
                rng = random.Random(seed * 1_000_003 + i)
                preempt = rng.random() < 0.5
                for _attempt in range(5):  # a position this run did not reach: again
                    damage = pick(layouts[preempt], preempt, rng)
                    try:
                        outcome, detail, _, hit = migrate_once(checksums, preempt, damage,
                                                               Path(d), seed=i)  # fmt: skip
                    except Exception as exc:  # an error escaping livemig's API is a crash
                        outcome, detail, hit = "crash", f"{type(exc).__name__}: {exc}", True
                    what = f"seed {seed}, input {i}, preempt {'on' if preempt else 'off'}, " \
                        f"{damage}"  # fmt: skip
                    if hit or outcome in ("hang", "crash", "wrong"):
                        tally.count(outcome, f"{what}: {detail}")
                        break
                else:
                    tally.examples.append(f"{what}: not counted, 5 positions never reached")
            out["on" if checksums else "off"] = tally
            if progress is not None:
                progress("postcopy", checksums, tally)
    return out
