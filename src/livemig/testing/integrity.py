"""Random corruptions of real livemig streams, each loaded and its RAM compared with the source's.

Theory of operation. ``record`` migrates a running memstress guest (1 vCPU, a few passes: the
guest keeps writing, so pages go more than once and some are left to a later pass) in one of
four ways, with livemig's checksums (``x-checksums``) on or off, and keeps the bytes plus the
XXH3-128 of every RAM block the source had at the end:

* ``plain``: ``exec:cat > FILE``, one main stream;
* ``mapped-ram``: ``file:`` with capability mapped-ram (a page per fixed file offset);
* ``multifd``: two multifd channels and main, each connection's bytes recorded by a listener
  that only reads (no return path), so the streams can be sent again to a destination;
* ``xbzrle``: as ``plain`` with capability xbzrle: the later passes send most pages as XBZRLE
  deltas against the page sent before (memstress changes one word of a page per pass); the
  recording is refused unless the decoder finds XBZRLE records in it.

Kind ``postcopy`` cannot be recorded (the destination asks for pages): each of its inputs is
a live migration damaged in transit, see ``livemig.testing.integrity_postcopy``.

``corrupt`` damages a stream once, the way a disk or a link does: one bit flipped, a 4 KiB
block zeroed (at a 4 KiB boundary), or the stream cut short, anywhere with equal chance (for
multifd: in one of the connections, chosen by size). ``load`` feeds it to a fresh destination
(plain through a socket pair, mapped-ram from a file, multifd over real connections); with
checksums on the destination requires them, as ``livemig run --incoming file:`` does. An
input that loads has its RAM hashed and compared with the source's: ``identical`` or
``WRONG``. ``run_corruptions`` counts, per stream kind and checksums on/off: inputs, refused,
loaded identical, loaded wrong. ``livemig bench faults --corruptions N`` prints them; with
checksums on, a wrong load is a failure.
"""

from __future__ import annotations

import os
import random
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from livemig.errors import LivemigError

RECORDED = ("plain", "mapped-ram", "multifd", "xbzrle")  # recorded once, corrupted, replayed
# live post-copy migrations, each damaged in transit (``livemig.testing.integrity_postcopy``)
KINDS = (*RECORDED, "postcopy")
MEMORY = "8M"
CHANNELS = 2
PAGE = 4096


@dataclass
class Recording:
    """A stream as recorded (several connections for multifd) and the source's final RAM."""

    kind: str
    checksums: bool
    streams: list[bytes]  # main first, then the multifd channels by id
    ram: dict[str, str]  # block idstr -> XXH3-128 hex of the source's RAM at the end
    memory: str = MEMORY


@dataclass
class Tally:
    inputs: int = 0
    refused: int = 0
    identical: int = 0
    wrong: int = 0
    hangs: int = 0
    crashes: int = 0
    examples: list[str] = field(default_factory=list)  # the first bad outcomes (replayable)
    # live post-copy only (``livemig.testing.integrity_postcopy``): paused, recovered, identical;
    # failed after the switch-over with the incomplete guest stopped (lost, never run wrong)
    recovered: int = 0
    stopped: int = 0

    def count(self, outcome: str, what: str) -> None:
        """One input's outcome; ``what`` (how to replay it, why) kept for the first bad ones."""
        self.inputs += 1
        field_ = {"hang": "hangs", "crash": "crashes"}.get(outcome, outcome)
        setattr(self, field_, getattr(self, field_) + 1)
        if outcome in ("wrong", "hang", "crash", "stopped") and len(self.examples) < 5:
            self.examples.append(what)


def ram_digests(blocks: list[Any]) -> dict[str, str]:
    return {b.idstr: xxhash.xxh3_128(b.view).hexdigest() for b in blocks}


# -- recording ---------------------------------------------------------------------------------


class _Recorder:
    """Accepts every connection on a unix socket and keeps what each sends until it closes."""

    def __init__(self, path: str) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(8)
        self.uri = f"unix:{path}"
        self.data: list[bytearray] = []
        self.threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, name="recorder", daemon=True)
        t.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            buf = bytearray()
            self.data.append(buf)
            t = threading.Thread(target=self._read, args=(conn, buf), daemon=True)
            t.start()
            self.threads.append(t)

    @staticmethod
    def _read(conn: socket.socket, buf: bytearray) -> None:
        with conn:
            while chunk := conn.recv(1 << 20):
                buf += chunk

    def streams(self) -> list[bytes]:
        for t in self.threads:
            t.join(30)
        self.server.close()
        main = [bytes(d) for d in self.data if d[:4] == b"QEVM"]
        chans = [bytes(d) for d in self.data if d[:4] != b"QEVM"]
        chans.sort(key=lambda d: d[24] if len(d) > 24 else 255)  # the initial packet's id
        return main + chans


def record(kind: str, checksums: bool, workdir: str | os.PathLike[str]) -> Recording:
    """Migrate a running memstress guest as ``kind``; the bytes and the source's final RAM."""
    from livemig.guests import build_guest
    from livemig.machine import Machine
    from livemig.machine.ram import parse_ram_blocks
    from livemig.migration.manager import MigrationManager
    from livemig.migration.state import MigrationStatus

    d = Path(workdir)
    image = build_guest("memstress")
    machine = Machine(parse_ram_blocks(MEMORY), smp=1, serial="null")
    recorder = None
    try:
        machine.load_guest(image.data, "ws=2M rate=4000")
        machine.start()
        time.sleep(0.3)  # the guest has written its working set
        mgr = MigrationManager(machine)
        caps = {"x-checksums": checksums}
        params: dict[str, Any] = {"downtime-limit": 0, "max-bandwidth": 8 << 20}
        if kind in ("plain", "xbzrle"):
            caps["xbzrle"] = kind == "xbzrle"
            uri = f"exec:cat > {d / 'plain.mig'}"
        elif kind == "mapped-ram":
            caps["mapped-ram"] = True
            uri = f"file:{d / 'mapped.mig'}"
        else:
            caps["multifd"] = True
            params["multifd-channels"] = CHANNELS
            recorder = _Recorder(str(d / "mf.sock"))
            uri = recorder.uri
        mgr.caps.set(caps)
        mgr.params.set(params)
        mgr.migrate(uri)
        # a 0 ms limit against a guest that keeps writing: passes go on until it is raised
        deadline = time.monotonic() + 60
        raised = False
        while mgr.source.status not in (MigrationStatus.COMPLETED, MigrationStatus.FAILED,
                                        MigrationStatus.CANCELLED):  # fmt: skip
            out = mgr.outgoing
            if not raised and out is not None and out.stats.dirty_sync_count >= 4:
                mgr.set_parameters({"downtime-limit": 10000, "max-bandwidth": 1 << 40})
                raised = True
            if time.monotonic() > deadline:
                mgr.cancel()
                raise LivemigError(f"recording a {kind} stream did not finish in 60 s")
            time.sleep(0.01)
        if mgr.source.status != MigrationStatus.COMPLETED:
            raise LivemigError(f"recording a {kind} stream failed: {mgr.source.error}")
        assert mgr.outgoing is not None
        mgr.outgoing.join(10)
        ram = ram_digests(machine.ram_blocks)
    finally:
        machine.close()
    if kind in ("plain", "xbzrle"):
        streams = [(d / "plain.mig").read_bytes()]
        if kind == "xbzrle" and not xbzrle_records(streams[0]):
            raise LivemigError("the xbzrle recording holds no XBZRLE record: the later passes "
                               "sent every page whole, there is nothing of xbzrle to corrupt")  # fmt: skip
    elif kind == "mapped-ram":
        streams = [(d / "mapped.mig").read_bytes()]
    else:
        assert recorder is not None
        streams = recorder.streams()
        if len(streams) != 1 + CHANNELS:
            raise LivemigError(f"recorded {len(streams)} connections, expected {1 + CHANNELS}")
    return Recording(kind, checksums, streams, ram)


def xbzrle_records(stream: bytes) -> int:
    """How many XBZRLE records a main stream holds (decoded, not guessed from bytes)."""
    from livemig.wire import Decoder, find_vmdesc
    from livemig.wire import events as E

    dec = Decoder(vmdesc=find_vmdesc(stream))
    dec.receive_data(stream)
    dec.receive_data(b"")
    return sum(isinstance(ev, E.RamXbzrlePage) for ev in iter(dec.next_event, E.NEED_DATA))


# -- corruption --------------------------------------------------------------------------------


def corrupt(streams: list[bytes], rng: random.Random) -> tuple[list[bytes], str]:
    """One corruption of one of ``streams`` (chosen by size): a bit flip, a zeroed 4 KiB block
    or a cut; returns the streams and how to replay it."""
    sizes = [len(s) for s in streams]
    which = rng.choices(range(len(streams)), weights=sizes)[0]
    buf = bytearray(streams[which])
    kind = rng.randrange(3)
    if kind == 0:
        at, bit = rng.randrange(len(buf)), rng.randrange(8)
        buf[at] ^= 1 << bit
        what = f"stream {which}: flip bit {bit} of byte {at}"
    elif kind == 1:
        at = rng.randrange(len(buf)) & ~(PAGE - 1)
        buf[at : at + PAGE] = bytes(len(buf[at : at + PAGE]))
        what = f"stream {which}: zero 4 KiB at {at}"
    else:
        at = rng.randrange(len(buf))
        del buf[at:]
        what = f"stream {which}: cut at {at}"
    out = list(streams)
    out[which] = bytes(buf)
    return out, what


# -- loading -----------------------------------------------------------------------------------


def load(rec: Recording, streams: list[bytes], timeout: float = 10.0) -> tuple[str, str]:
    """Load ``streams`` into a fresh destination: (``identical`` | ``wrong`` | ``refused`` |
    ``hang`` | ``crash``, detail)."""
    from livemig.machine import Machine, RunState
    from livemig.machine.ram import parse_ram_blocks
    from livemig.migration.destination import IncomingMigration
    from livemig.migration.options import Parameters
    from livemig.migration.state import MigrationState, MigrationStatus

    machine = Machine(parse_ram_blocks(rec.memory), smp=1, serial="null")
    tmp: str | None = None
    feeders: list[threading.Thread] = []
    socks: list[socket.socket] = []
    inc = None
    try:
        machine.set_runstate(RunState.INMIGRATE)
        params = Parameters()
        params.set({"x-io-timeout": int(timeout * 1000), "multifd-channels": CHANNELS})
        state = MigrationState("destination")
        done = threading.Event()
        caps = {"x-checksums"} if rec.checksums else set()
        if rec.kind in ("plain", "xbzrle"):
            a, b = socket.socketpair()
            socks.append(a)
            uri = f"fd:{b.fileno()}"
        elif rec.kind == "mapped-ram":
            fd, tmp = tempfile.mkstemp(prefix="livemig-corrupt-")
            with os.fdopen(fd, "wb") as f:
                f.write(streams[0])
            uri = f"file:{tmp}"
            caps.add("mapped-ram")
        else:
            tmp = tempfile.mktemp(prefix="livemig-corrupt-", suffix=".sock")
            uri = f"unix:{tmp}"
            caps.add("multifd")
        inc = IncomingMigration(machine, uri, state, params.query(), autostart=False,
                                on_done=lambda ok: done.set())  # fmt: skip
        inc.capabilities = frozenset(caps)
        if rec.kind in ("plain", "xbzrle"):
            b.detach()  # the channel owns the fd now
        inc.start()
        if rec.kind in ("plain", "xbzrle"):
            feeders.append(_feeder(socks[0], streams[0], timeout))
        elif rec.kind == "multifd":
            for data in streams:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(inc.uri.partition(":")[2])
                socks.append(s)
                feeders.append(_feeder(s, data, timeout))
        if not done.wait(timeout + 5):
            inc.cancel()
            done.wait(2)
            return "hang", f"no end {timeout + 5:g} s after the input"
        status, err = state.status, state.error or ""
        if status == MigrationStatus.FAILED:
            return ("crash" if err.startswith("internal error") else "refused"), err
        if status != MigrationStatus.COMPLETED:
            return "crash", f"ended {status.value}: {err}"
        mine = ram_digests(machine.ram_blocks)
        if mine == rec.ram:
            return "identical", ""
        bad = [n for n in mine if mine[n] != rec.ram.get(n)]
        return "wrong", f"RAM differs from the source's in {', '.join(bad)}"
    finally:
        for s in socks:
            s.close()
        for t in feeders:
            t.join(5)
        if inc is not None:
            inc.join(5)
        machine.close()
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _feeder(sock: socket.socket, data: bytes, timeout: float) -> threading.Thread:
    def run() -> None:
        sock.settimeout(timeout)
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):  # a return path would answer here: drain it
                pass
        except OSError:
            pass  # the destination gave up reading: that is its answer

    t = threading.Thread(target=run, name="corrupt feeder", daemon=True)
    t.start()
    return t


def postcopy_count(count: int) -> int:
    """Live post-copy inputs for ``count`` of each recorded kind: each is a whole migration
    (about a second), so a tenth of them, at least 20 (never more than ``count``)."""
    return min(count, max(20, count // 10))


def run_corruptions(count: int, *, seed: int = 0, kinds: tuple[str, ...] = KINDS,
                    workdir: str | None = None, progress: Any = None,
                    postcopy: int | None = None) -> dict[str, dict[str, Tally]]:  # fmt: skip
    """``count`` corruptions of each kind of stream, checksums on and off: the tallies.
    Kind ``postcopy`` gets ``postcopy`` inputs (default ``postcopy_count(count)``)."""
    out: dict[str, dict[str, Tally]] = {}
    with tempfile.TemporaryDirectory(prefix="livemig-integrity-", dir=workdir) as d:
        for kind in kinds:
            if kind == "postcopy":
                from livemig.testing.integrity_postcopy import run_postcopy_corruptions

                n = postcopy_count(count) if postcopy is None else postcopy
                if n > 0:
                    out[kind] = run_postcopy_corruptions(n, seed=seed, workdir=d,
                                                         progress=progress)  # fmt: skip
                continue
            for checksums in (True, False):
                sub = Path(d) / f"{kind}-{'on' if checksums else 'off'}"
                sub.mkdir()
                rec = record(kind, checksums, sub)
                outcome, detail = load(rec, rec.streams)
                if outcome != "identical":
                    raise LivemigError(f"the unharmed {kind} stream does not load as recorded: "
                                       f"{outcome} {detail}")  # fmt: skip
                tally = Tally()
                for i in range(count):
                    rng = random.Random(seed * 1_000_003 + i)
                    streams, what = corrupt(rec.streams, rng)
                    outcome, detail = load(rec, streams)
                    tally.count(outcome, f"seed {seed}, input {i}: {what}: {detail}")
                out.setdefault(kind, {})["on" if checksums else "off"] = tally
                if progress is not None:
                    progress(kind, checksums, tally)
    return out
