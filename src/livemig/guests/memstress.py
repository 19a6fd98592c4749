"""The memstress invariant, checked from outside the guest with nothing but its memory.

memstress (``src/memstress.c``) publishes a GuestReport at ``abi.GUEST_REPORT_ADDR`` (working
set start, pages, slices, completed passes per vCPU) and, at ``MEMSTRESS_INFO_ADDR``, its seed
and how far each vCPU got filling its slice. Every page of the working set looks like::

    u64 word 0        pass counter, +1 each time the owning vCPU's sweep visits the page
    u64 word 1..511   pattern(p, j) = page_hash(seed, p) ^ (j * PATTERN_STEP), p = page index

(with boot argument ``comp=N``, N percent of the pages use ``j & 7`` for ``j``: their pattern
repeats every 8 words, so that compression has something to work on.)

At any instruction boundary (a paused machine), for each slice once it is filled:

* counters along the sweep order are non-increasing, neighbours differ by 0 or 1, and the
  first and last differ by at most 1 (one sweep is in progress, exactly as in QEMU's
  migration test);
* ``passes <= counter(last) <= counter(first) <= passes + 1``;
* every page's pattern words are intact (this catches a page lost, zeroed, or sent to the
  wrong place by a migration, which counters alone could miss).

Across two checks (``previous``), no counter and no pass count goes backwards.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from livemig.machine import abi

MEMSTRESS_INFO_ADDR = abi.GUEST_REPORT_ADDR + 0x200
MEMSTRESS_INFO_MAGIC = 0x4F464E4953534D4C  # "LMSSINFO" little-endian
# struct memstress_info: u64 magic; u64 seed; u64 rate; u64 filled[MAX_CPUS]; u64 comp
MEMSTRESS_INFO = struct.Struct(f"<QQQ{abi.MAX_CPUS}QQ")
PAGE_WORDS = abi.PAGE_SIZE // 8
PATTERN_STEP = 0x9E3779B97F4A7C15
SEED_MULT = 0xD6E8FEB86659FD93
CHUNK_PAGES = 4096  # read and compare 16 MiB at a time, so a 1 GiB check stays small in RAM
MAX_PROBLEMS = 20

ReadFn = Callable[[int, int], "bytes | bytearray | memoryview"]

_U64 = np.uint64
_WORD_STEPS = np.arange(1, PAGE_WORDS, dtype=_U64) * _U64(PATTERN_STEP)


def page_hash(seed: int, pages: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over page indices mixed with the seed (as memstress.h)."""
    with np.errstate(over="ignore"):
        salt = _U64((seed * SEED_MULT) & 0xFFFF_FFFF_FFFF_FFFF)
        z = (pages.astype(_U64) ^ salt) + _U64(PATTERN_STEP)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        return z ^ (z >> _U64(31))


_WORD_STEPS_8 = (np.arange(1, PAGE_WORDS, dtype=_U64) & _U64(7)) * _U64(PATTERN_STEP)


def page_pattern(seed: int, pages: np.ndarray, comp: int = 0) -> np.ndarray:
    """Expected words 1..511 of the given pages: an array of shape (len(pages), 511)."""
    out = page_hash(seed, pages)[:, None] ^ _WORD_STEPS[None, :]
    if comp:
        short = page_hash(seed ^ 0xC0, pages) % _U64(100) < _U64(comp)
        out[short] = page_hash(seed, pages[short])[:, None] ^ _WORD_STEPS_8[None, :]
    return out


@dataclass
class InvariantReport:
    """The outcome of one check: ``ok`` and, when not, one line per problem found."""

    ok: bool
    problems: list[str]
    pages: int = 0
    passes: list[int] = field(default_factory=list)  # completed passes, per vCPU slice
    min_counter: int = 0
    max_counter: int = 0
    ws_start: int = 0
    nslices: int = 0
    seed: int = 0
    filling: bool = False  # some vCPU is still writing the initial patterns
    counters: np.ndarray = field(default_factory=lambda: np.zeros(0, _U64), repr=False)

    @property
    def total_passes(self) -> int:
        return sum(self.passes)


class _Problems:
    """Collects problem lines, keeping the first ``limit`` and counting the rest."""

    def __init__(self, limit: int) -> None:
        self.lines: list[str] = []
        self.limit = limit
        self.dropped = 0

    def add(self, line: str) -> None:
        if len(self.lines) < self.limit:
            self.lines.append(line)
        else:
            self.dropped += 1

    def add_each(self, indices: np.ndarray, line: Callable[[int], str]) -> None:
        """One line per index, formatting only those that will be kept."""
        room = max(self.limit - len(self.lines), 0)
        for i in indices[:room]:
            self.add(line(int(i)))
        self.dropped += max(len(indices) - room, 0)

    def result(self) -> list[str]:
        more = [f"... and {self.dropped} more problems"] if self.dropped else []
        return self.lines + more


def check_invariant(
    read: ReadFn,
    previous: InvariantReport | None = None,
    *,
    check_pattern: bool = True,
    max_problems: int = MAX_PROBLEMS,
) -> InvariantReport:
    """Check memstress's memory; ``read(gpa, length)`` returns guest-physical bytes.

    Call it on a paused machine (e.g. ``check_invariant(m.read_guest)``). Give the report of
    an earlier check as ``previous`` to also check that nothing went backwards since.
    """
    head = abi.GUEST_REPORT.unpack(bytes(read(abi.GUEST_REPORT_ADDR, abi.GUEST_REPORT.size)))
    magic, kind, ws_start, ws_pages, nslices = head[:5]
    passes = list(head[5 : 5 + abi.MAX_CPUS])
    info = MEMSTRESS_INFO.unpack(bytes(read(MEMSTRESS_INFO_ADDR, MEMSTRESS_INFO.size)))
    info_magic, seed, _rate = info[:3]
    filled = list(info[3 : 3 + abi.MAX_CPUS])
    comp = int(info[3 + abi.MAX_CPUS])
    if magic != abi.REPORT_MAGIC or kind != abi.REPORT_KIND_MEMSTRESS:
        return InvariantReport(
            ok=False,
            problems=[
                f"no memstress report at 0x{abi.GUEST_REPORT_ADDR:x} (magic 0x{magic:x},"
                f" kind {kind}): the guest has not started yet or is not memstress"
            ],
        )
    if info_magic != MEMSTRESS_INFO_MAGIC:
        return InvariantReport(
            ok=False, problems=[f"memstress info at 0x{MEMSTRESS_INFO_ADDR:x} has a bad magic"]
        )
    if not 1 <= nslices <= abi.MAX_CPUS or ws_pages < nslices or ws_start % abi.PAGE_SIZE:
        return InvariantReport(
            ok=False,
            problems=[
                f"memstress report is malformed: ws_start 0x{ws_start:x}, {ws_pages} pages,"
                f" {nslices} slices"
            ],
        )

    out = _Problems(max_problems)
    counters = np.zeros(ws_pages, dtype=_U64)
    live = np.zeros(ws_pages, dtype=bool)  # pages filled, so their counters mean something
    filling = False
    for s in range(nslices):
        first, end = ws_pages * s // nslices, ws_pages * (s + 1) // nslices
        done = filled[s]
        if done > end - first:
            out.add(f"slice {s}: filled count {done} exceeds its {end - first} pages")
            done = end - first
        filling |= done < end - first
        live[first : first + done] = True
        _scan_slice(read, ws_start, seed, comp, first, end, first + done, counters, out,
                    check_pattern)  # fmt: skip
        _check_counters(s, first, end, done, counters, passes[s], ws_start, out)

    live_counters = counters[live]
    report = InvariantReport(
        ok=False,
        problems=[],
        pages=int(ws_pages),
        passes=passes[:nslices],
        min_counter=int(live_counters.min()) if live_counters.size else 0,
        max_counter=int(live_counters.max()) if live_counters.size else 0,
        ws_start=int(ws_start),
        nslices=int(nslices),
        seed=int(seed),
        filling=filling,
        counters=counters,
    )
    if previous is not None:
        _check_progress(previous, report, out)
    report.problems = out.result()
    report.ok = not report.problems
    return report


def _scan_slice(
    read: ReadFn,
    ws_start: int,
    seed: int,
    comp: int,
    first: int,
    end: int,
    filled_end: int,
    counters: np.ndarray,
    out: _Problems,
    check_pattern: bool,
) -> None:
    """Gather the slice's counters and compare the pattern of its filled pages."""
    for lo in range(first, end, CHUNK_PAGES):
        hi = min(lo + CHUNK_PAGES, end)
        raw = read(ws_start + lo * abi.PAGE_SIZE, (hi - lo) * abi.PAGE_SIZE)
        words = np.frombuffer(raw, dtype="<u8").reshape(hi - lo, PAGE_WORDS)
        counters[lo:hi] = words[:, 0]
        n_check = min(hi, filled_end) - lo
        if not check_pattern or n_check <= 0:
            continue
        expected = page_pattern(seed, np.arange(lo, lo + n_check, dtype=_U64), comp)
        _pattern_problems(words[:n_check], expected, lo, ws_start, out)


def _pattern_problems(
    words: np.ndarray, expected: np.ndarray, lo: int, ws_start: int, out: _Problems
) -> None:
    """Report each page (row) whose words 1..511 differ from the expected pattern."""
    mismatch = words[:, 1:] != expected

    def line(row: int) -> str:
        j = int(np.flatnonzero(mismatch[row])[0])
        p = lo + row
        return (
            f"page {p} (gpa 0x{ws_start + p * abi.PAGE_SIZE:x}): pattern word {j + 1} is"
            f" 0x{int(words[row, j + 1]):016x}, expected 0x{int(expected[row, j]):016x}"
            f" ({int(mismatch[row].sum())} of {PAGE_WORDS - 1} words differ)"
        )

    out.add_each(np.flatnonzero(mismatch.any(axis=1)), line)


def _check_counters(
    s: int,
    first: int,
    end: int,
    done: int,
    counters: np.ndarray,
    passes: int,
    ws_start: int,
    out: _Problems,
) -> None:
    """The sweep invariant of one slice (see the module docstring)."""
    c = counters[first:end]

    def gpa(i: int) -> str:
        return f"0x{ws_start + (first + i) * abi.PAGE_SIZE:x}"

    if done < end - first:
        # Still filling: no page has been swept yet, so every filled counter must be 0.
        out.add_each(
            np.flatnonzero(c[:done]),
            lambda i: f"slice {s}: page {first + i} (gpa {gpa(i)}) counter {c[i]} while filling",
        )
        if passes:
            out.add(f"slice {s}: {passes} passes reported while still filling")
        return
    # uint64 difference: a rise of one wraps to 2**64-1, so "<= 1" means a drop of 0 or 1.
    steps = c[:-1] - c[1:]
    out.add_each(
        np.flatnonzero(steps > 1),
        lambda i: (
            f"slice {s}: page {first + i + 1} (gpa {gpa(i + 1)}) has counter {c[i + 1]} after"
            f" page {first + i} with {c[i]}: along the sweep neighbours must differ by 0 or 1"
        ),
    )
    head, tail = int(c[0]), int(c[-1])
    if not 0 <= head - tail <= 1:
        out.add(
            f"slice {s}: first page counter {head} and last {tail} differ by more than one pass"
        )
    if not passes <= tail <= head <= passes + 1:
        out.add(
            f"slice {s}: counters {head}..{tail} do not match {passes} completed passes"
            " (want passes <= last <= first <= passes + 1)"
        )


def _check_progress(prev: InvariantReport, cur: InvariantReport, out: _Problems) -> None:
    """Nothing may go backwards between two checks of the same run."""
    if (prev.ws_start, prev.pages, prev.nslices, prev.seed) != (
        cur.ws_start,
        cur.pages,
        cur.nslices,
        cur.seed,
    ):
        out.add(
            f"layout changed since the previous check: ws 0x{prev.ws_start:x}+{prev.pages}"
            f" pages/{prev.nslices} slices seed {prev.seed} -> ws 0x{cur.ws_start:x}+"
            f"{cur.pages} pages/{cur.nslices} slices seed {cur.seed}"
        )
        return
    for s, (a, b) in enumerate(zip(prev.passes, cur.passes, strict=True)):
        if b < a:
            out.add(f"slice {s}: passes went backwards from {a} to {b}")
    if prev.counters.shape == cur.counters.shape:
        out.add_each(
            np.flatnonzero(cur.counters < prev.counters),
            lambda p: (
                f"page {p} (gpa 0x{cur.ws_start + p * abi.PAGE_SIZE:x}): counter went"
                f" backwards from {prev.counters[p]} to {cur.counters[p]}"
            ),
        )
