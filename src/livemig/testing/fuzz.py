"""A fuzzer for the incoming side: mutated real streams fed to a real ``IncomingMigration``.

Theory of operation. The corpus is real streams: one livemig pre-copy stream recorded with
``migrate exec:cat > FILE`` from a running memstress guest (``record_livemig_stream``), and
QEMU 7.2's ``pc-64m-bios.mig`` fixture. Each input is a stream with 1 to 4 mutations (bit
flips, "interesting" bytes, length-like fields overwritten with huge values, truncation,
deleted, duplicated or inserted chunks), biased towards the structural parts of a stream (the
header, the setup records, the device sections and the vmdesc at the end) because the page
payload is just data.

Every input goes to a fresh machine with the stream's RAM layout, through a ``socketpair`` and
``migrate-incoming fd:N``, exactly as a destination receives a socket. An input passes when the
migration ends within the time-out, as ``completed`` or as ``failed`` with the loader's own error
(a ``StreamError``-style message), never as an internal error (an exception the destination did
not expect: a crash). livemig's corpus streams carry checksums (``x-checksums``, as the command
line sends them); on top of that:

* **no load with the wrong RAM**: an input that completes has its RAM compared with the RAM the
  source had at the end of the recorded migration; a difference is a finding (``wrong-ram``);
* **no write outside a RAM block**: each block gets a ``PROT_NONE`` guard page mapped right
  before and after it (``MAP_FIXED_NOREPLACE``), so a stray write kills the process instead of
  silently corrupting a neighbour; the guard count is reported;
* **no allocation sized by an unchecked length field**: ``tracemalloc`` measures the peak of
  Python and numpy allocations while the input is loaded; a peak above ``alloc_limit(input)``
  (a fixed allowance plus a small multiple of the input size) is a finding;
* **no hang**: the loader must end within ``timeout`` seconds after the input was fully offered.

``run_fuzz`` returns ``FuzzStats`` with the counts and the first findings (with the seed and
mutation list to replay them); ``livemig bench faults --fuzz-seconds N`` runs it longer.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import socket
import tempfile
import threading
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from livemig.errors import LivemigError

QEMU_FIXTURE = Path("/work/shared/fixtures/qemu/pc-64m-bios.mig")
INTERNAL = "internal error"
ALLOC_ALLOWANCE = 48 << 20  # receive buffers, decoder state, numpy page batches

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]  # fmt: skip
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FIXED_NOREPLACE = 0x100000
PAGE = 4096


def alloc_limit(input_size: int) -> int:
    """The most a well-behaved loader may allocate (peak) for an input of this size."""
    return ALLOC_ALLOWANCE + 4 * input_size


@dataclass
class Corpus:
    """One seed stream and the machine layout a destination needs to load it."""

    name: str
    data: bytes
    memory: str  # --memory of the destination
    ram_blocks: tuple[str, ...] = ()  # extra --ram-block NAME=SIZE
    smp: int = 1
    ram: dict[str, str] | None = None  # the source's RAM at the end (XXH3-128), when known


@dataclass
class Finding:
    kind: str  # crash | hang | alloc | guard | wrong-ram
    corpus: str
    seed: int
    mutations: list[str]
    detail: str


@dataclass
class FuzzStats:
    inputs: int = 0
    completed: int = 0
    rejected: int = 0  # failed cleanly with the loader's message
    crashes: int = 0
    hangs: int = 0
    big_allocs: int = 0
    wrong_ram: int = 0  # inputs that loaded with RAM other than the source's
    guard_pages: int = 0
    max_peak_alloc: int = 0
    seconds: float = 0.0
    per_corpus: dict[str, int] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return (self.crashes == 0 and self.hangs == 0 and self.big_allocs == 0
                and self.wrong_ram == 0)  # fmt: skip


# -- corpus ------------------------------------------------------------------------------------


def record_livemig_stream(
    path: str | os.PathLike[str],
    memory: str = "4M",
    verify: bool = False,
    checksums: bool = True,
) -> Corpus:
    """Migrate a running memstress guest (1 vCPU) to ``exec:cat > path``; the stream as corpus,
    with the source's final RAM digests.

    With ``checksums`` (the command line's default) every unit of the stream is checked; with
    ``verify`` the stream also carries the x-verify section (RAM digests at switch-over).
    """
    from livemig.guests import build_guest
    from livemig.machine import Machine
    from livemig.machine.ram import parse_ram_blocks
    from livemig.migration.manager import MigrationManager
    from livemig.migration.state import MigrationStatus

    image = build_guest("memstress")
    machine = Machine(parse_ram_blocks(memory), smp=1, serial="null")
    try:
        machine.load_guest(image.data, "ws=1M rate=2000")
        machine.start()
        time.sleep(0.2)  # the guest has written some of its working set
        mgr = MigrationManager(machine)
        mgr.caps.set({"x-verify": verify, "x-checksums": checksums})
        mgr.migrate(f"exec:cat > {path}")
        deadline = time.monotonic() + 60
        while mgr.source.status not in (MigrationStatus.COMPLETED, MigrationStatus.FAILED,
                                        MigrationStatus.CANCELLED):  # fmt: skip
            if time.monotonic() > deadline:
                mgr.cancel()
                raise LivemigError("recording the fuzz corpus stream did not finish in 60 s")
            time.sleep(0.02)
        if mgr.source.status != MigrationStatus.COMPLETED:
            raise LivemigError(f"recording the fuzz corpus failed: {mgr.source.error}")
        assert mgr.outgoing is not None
        mgr.outgoing.join(10)
        from livemig.testing.integrity import ram_digests

        ram = ram_digests(machine.ram_blocks)
    finally:
        machine.close()
    name = "livemig-verify" if verify else "livemig"
    return Corpus(name, Path(path).read_bytes(), memory, ram=ram)


def qemu_fixture_corpus() -> Corpus | None:
    """QEMU 7.2's pc-64m-bios stream, loaded into a machine with its RAM blocks (None: absent)."""
    if not QEMU_FIXTURE.exists():
        return None
    from livemig.wire import Decoder
    from livemig.wire import events as E

    data = QEMU_FIXTURE.read_bytes()
    dec = Decoder()
    dec.receive_data(data[: 1 << 16])
    for ev in dec.events():
        if isinstance(ev, E.RamSetup):
            blocks = [f"{b.idstr}={b.used_length}" for b in ev.blocks]
            pc = [b for b in ev.blocks if b.idstr == "pc.ram"]
            memory = str(pc[0].used_length) if pc else "64M"
            extra = tuple(x for x in blocks if not x.startswith("pc.ram="))
            # The machine takes at most MAX_BLOCKS blocks; QEMU's pc has 9, so this destination
            # refuses the block list and the QEMU corpus exercises the decoder up to RamSetup
            # (header, configuration, section and setup parsing) rather than page placement.
            # Names this machine does not allow ('@') are left out the same way.
            from livemig.machine.ram import MAX_BLOCKS, parse_ram_blocks

            ok = []
            for x in extra:
                try:
                    parse_ram_blocks(memory, (*ok, x))
                except LivemigError:
                    continue
                ok.append(x)
            extra = tuple(ok[: MAX_BLOCKS - 1])
            return Corpus("qemu-pc-64m-bios", data, memory, extra)
    return None


def default_corpus(workdir: str | os.PathLike[str] | None = None) -> list[Corpus]:
    d = Path(workdir or tempfile.mkdtemp(prefix="livemig-fuzz-"))
    d.mkdir(parents=True, exist_ok=True)
    out = [record_livemig_stream(d / "livemig.mig"),
           record_livemig_stream(d / "livemig-verify.mig", verify=True)]  # fmt: skip
    q = qemu_fixture_corpus()
    if q is not None:
        out.append(q)
    return out


# -- mutation ----------------------------------------------------------------------------------

INTERESTING = (0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF)
BIG = (0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFFFFFFFFFF, 1 << 40, 1 << 31, 0x1000)


def _spot(data: bytes, rng: random.Random) -> int:
    """An offset, biased to the structural head and tail of a stream."""
    n = len(data)
    r = rng.random()
    if r < 0.35:
        return rng.randrange(min(n, 4096))
    if r < 0.7:
        return max(0, n - 1 - rng.randrange(min(n, 16384)))
    return rng.randrange(n)


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, list[str]]:
    """1-4 mutations of ``data``; returns the input and a description to replay it."""
    buf = bytearray(data)
    done: list[str] = []
    for _ in range(rng.choice((1, 1, 2, 3, 4))):
        if not buf:
            break
        at = _spot(bytes(buf), rng) if len(buf) < 1 << 16 else _spot_fast(len(buf), rng)
        kind = rng.randrange(7)
        if kind == 0:
            bit = rng.randrange(8)
            buf[at] ^= 1 << bit
            done.append(f"flip {at}.{bit}")
        elif kind == 1:
            v = rng.choice(INTERESTING)
            buf[at] = v
            done.append(f"set {at}={v:#x}")
        elif kind == 2:
            width = rng.choice((1, 2, 4, 8))
            v = rng.choice(BIG) & ((1 << (8 * width)) - 1)
            buf[at : at + width] = v.to_bytes(width, "big")
            done.append(f"big {at}:{width}={v:#x}")
        elif kind == 3:
            del buf[at:]
            done.append(f"truncate {at}")
        elif kind == 4:
            k = rng.randrange(1, 64)
            del buf[at : at + k]
            done.append(f"delete {at}+{k}")
        elif kind == 5:
            k = rng.randrange(1, 256)
            buf[at:at] = buf[at : at + k]
            done.append(f"dup {at}+{k}")
        else:
            k = rng.randrange(1, 32)
            buf[at:at] = rng.randbytes(k)
            done.append(f"insert {at}+{k}")
    return bytes(buf), done


def _spot_fast(n: int, rng: random.Random) -> int:
    r = rng.random()
    if r < 0.35:
        return rng.randrange(min(n, 4096))
    if r < 0.7:
        return max(0, n - 1 - rng.randrange(min(n, 16384)))
    return rng.randrange(n)


# -- the target --------------------------------------------------------------------------------


def _inaccessible(addr: int) -> bool:
    """Whether ``addr`` lies in a mapping with no access at all (another mapping's guard)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                span, perms = line.split(None, 2)[:2]
                lo, hi = (int(x, 16) for x in span.split("-"))
                if lo <= addr < hi:
                    return perms.startswith("---")
    except OSError:
        pass
    return False


def _guard_pages(blocks: list[Any]) -> tuple[list[int], int]:
    """PROT_NONE pages right before and after each block: mapped here where the space is free;
    where a mapping without access already sits there (a thread stack's guard page: the kernel
    often places a new block right below the last stack), it guards the block just as well
    and is counted, never unmapped. Returns the pages mapped here (to ``munmap``) and the
    number of guards in all."""
    guards: list[int] = []
    found = 0
    for b in blocks:
        for addr in (b.host_addr - PAGE, b.host_addr + b.size):
            got = _libc.mmap(addr, PAGE, 0,  # PROT_NONE
                             mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED_NOREPLACE, -1, 0)  # fmt: skip
            if got in (None, ctypes.c_void_p(-1).value):
                if _inaccessible(addr):
                    found += 1
                continue
            if got != addr:  # an old kernel ignored the hint: not a guard
                _libc.munmap(got, PAGE)
                continue
            guards.append(addr)
    return guards, len(guards) + found


def feed(corpus: Corpus, data: bytes, timeout: float = 10.0) -> tuple[str, str, int, int]:
    """Load ``data`` into a fresh destination machine: (outcome, detail, peak alloc, guards).

    ``outcome`` is ``completed``, ``rejected`` (failed with the loader's message), ``crash``
    (an internal error), ``hang``, or ``wrong-ram`` (completed with RAM other than the
    source's, when the corpus knows it).
    """
    from livemig.machine import Machine, RunState
    from livemig.machine.ram import parse_ram_blocks
    from livemig.migration.destination import IncomingMigration
    from livemig.migration.options import Parameters
    from livemig.migration.state import MigrationState, MigrationStatus

    machine = Machine(parse_ram_blocks(corpus.memory, corpus.ram_blocks), smp=corpus.smp,
                      serial="null")  # fmt: skip
    guards, n_guards = _guard_pages(machine.ram_blocks)
    a, b = socket.socketpair()
    writer: threading.Thread | None = None
    inc: IncomingMigration | None = None
    hung = False
    try:
        machine.set_runstate(RunState.INMIGRATE)
        params = Parameters()
        params.set({"x-io-timeout": int(timeout * 1000)})
        state = MigrationState("destination")
        done = threading.Event()
        tracemalloc.reset_peak()
        inc = IncomingMigration(machine, f"fd:{b.fileno()}", state, params.query(),
                                autostart=False, on_done=lambda ok: done.set())  # fmt: skip
        b.detach()  # the channel owns the fd now

        def write() -> None:
            a.settimeout(timeout)
            try:
                a.sendall(data)
                a.shutdown(socket.SHUT_WR)
                # the loader may answer on the return path (PONG, SHUT): drain it
                while a.recv(65536):
                    pass
            except OSError:
                pass  # the destination gave up reading: that is its answer

        writer = threading.Thread(target=write, name="fuzz writer", daemon=True)
        inc.start()
        writer.start()
        if not done.wait(timeout + 5):
            # A hang is already proven: a cancel ends a loader blocked on the channel at once,
            # one stuck elsewhere will not end sooner for a longer wait (a closed machine's RAM
            # stays mapped, so leaving it behind is safe).
            hung = True
            inc.cancel()
            done.wait(1)
            return "hang", f"no end {timeout + 5:g} s after the input", 0, n_guards
        _, peak = tracemalloc.get_traced_memory()
        status, err = state.status, state.error or ""
        if status == MigrationStatus.COMPLETED:
            if corpus.ram is not None:
                from livemig.testing.integrity import ram_digests

                mine = ram_digests(machine.ram_blocks)
                if mine != corpus.ram:
                    bad = [n for n in mine if mine[n] != corpus.ram.get(n)]
                    return "wrong-ram", f"loaded, RAM differs in {', '.join(bad)}", peak, n_guards
            return "completed", "", peak, n_guards
        if status == MigrationStatus.FAILED and not err.startswith(INTERNAL):
            return "rejected", err, peak, n_guards
        return "crash", f"{status.value}: {err}", peak, n_guards
    finally:
        a.close()
        if writer is not None:
            writer.join(5)
        if inc is not None:
            inc.join(1 if hung else 5)
        machine.close()
        for g in guards:
            _libc.munmap(g, PAGE)


def run_fuzz(
    corpora: list[Corpus],
    *,
    seconds: float | None = None,
    count: int | None = None,
    seed: int = 0,
    timeout: float = 10.0,
    keep_findings: int = 20,
) -> FuzzStats:
    """Mutate and feed until ``seconds`` pass or ``count`` inputs were tried (round robin)."""
    if not corpora:
        raise LivemigError("fuzz: no corpus streams")
    stats = FuzzStats()
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    t0 = time.monotonic()
    try:
        i = 0
        while True:
            if count is not None and i >= count:
                break
            if seconds is not None and time.monotonic() - t0 >= seconds:
                break
            corpus = corpora[i % len(corpora)]
            input_seed = seed * 1_000_003 + i
            rng = random.Random(input_seed)
            data, muts = mutate(corpus.data, rng)
            outcome, detail, peak, guards = feed(corpus, data, timeout)
            stats.inputs += 1
            stats.per_corpus[corpus.name] = stats.per_corpus.get(corpus.name, 0) + 1
            stats.guard_pages += guards
            stats.max_peak_alloc = max(stats.max_peak_alloc, peak)
            finding = None
            if outcome == "completed":
                stats.completed += 1
            elif outcome == "rejected":
                stats.rejected += 1
            elif outcome == "crash":
                stats.crashes += 1
                finding = "crash"
            elif outcome == "wrong-ram":
                stats.wrong_ram += 1
                finding = "wrong-ram"
            else:
                stats.hangs += 1
                finding = "hang"
            if peak > alloc_limit(len(data)):
                stats.big_allocs += 1
                finding = finding or "alloc"
                detail = f"peak allocation {peak} B for a {len(data)} B input; {detail}"
            if finding and len(stats.findings) < keep_findings:
                stats.findings.append(Finding(finding, corpus.name, input_seed, muts, detail))
            i += 1
    finally:
        stats.seconds = time.monotonic() - t0
        if started:
            tracemalloc.stop()
    return stats
