"""The compute guest recomputed on the host: proof that a guest resumed exactly where it stopped.

RAM hashes prove that a destination's memory equals the source's at switch-over; they do not
prove that the guest then *continues* correctly. The compute guest (``src/compute.c``) makes
that checkable: each vCPU's buffer is a pure function of the seed, the vCPU index and the
number of operations done (``src/compute.h``: FNV-1a over a 4 KiB block, then a
read-modify-write store into it). The guest publishes the seed and buffer size
(``COMPUTE_INFO`` at ``GUEST_REPORT_ADDR + 0x200``) and, after each operation, the operation
count in ``passes[cpu]`` of its GuestReport. So at any instruction boundary (a paused machine)
vCPU ``c``'s buffer must equal the reference after ``passes[c]`` or ``passes[c] + 1``
operations (the store of the next operation may already have happened). An instruction lost or
executed twice, a register restored wrong, a page of the buffer lost or stale: each makes the
buffer leave the reference for good, since every later operation hashes what came before.

The reference runs the very same ``compute.h`` compiled for the host (``src/compute_ref.c``,
built with the machine's compiler and loaded with ctypes), so it costs about what the guest's
work costs natively: a few hundred nanoseconds an operation.

- ``snapshot(read)`` reads what the guest shows (seed, buffer size, counts, a digest of each
  buffer): small enough to cross a QMP connection (``x-guest-check`` returns it).
- ``ComputeReference`` keeps a host copy of every vCPU's buffer and advances it incrementally,
  so a checker that follows one guest through thousands of stops and hundreds of migrations
  (``livemig bench exact``) never recomputes from the start.
- ``check_compute(read)`` does both in one process, from scratch.
"""

from __future__ import annotations

import ctypes
import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from livemig import cbuild
from livemig.errors import LivemigError
from livemig.guests.build import SRC_DIR
from livemig.machine import abi

COMPUTE_INFO_ADDR = abi.GUEST_REPORT_ADDR + 0x200
COMPUTE_INFO_MAGIC = 0x4F464E49504D434C  # "LCMPINFO" little-endian
# struct compute_info: u64 magic; u64 seed; u64 buf_size; u64 filled[MAX_CPUS]
COMPUTE_INFO = struct.Struct(f"<QQQ{abi.MAX_CPUS}Q")
BLOCK_BYTES = 4096
REPORT_KIND_COMPUTE = 2

ReadFn = Callable[[int, int], "bytes | bytearray | memoryview"]


class ComputeCheckError(LivemigError):
    """The memory does not hold a (started) compute guest, so nothing can be checked."""


def library_path(rebuild: bool = False) -> Path:
    """Build the reference's shared library (cached) and return its path."""
    return cbuild.build_host_library(
        "compute_ref", SRC_DIR / "compute_ref.c", headers=[SRC_DIR / "compute.h"], rebuild=rebuild
    )


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library_path()))
    u64p = ctypes.POINTER(ctypes.c_uint64)
    lib.compute_ref_fill.argtypes = [u64p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int]
    lib.compute_ref_fill.restype = None
    lib.compute_ref_run.argtypes = [u64p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64]
    lib.compute_ref_run.restype = None
    return lib


def _ptr(buf: np.ndarray) -> ctypes._Pointer:
    return buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint64))


def digest(data: bytes | bytearray | memoryview | np.ndarray) -> str:
    """The digest compared across processes: XXH3-128 of a buffer, as hex."""
    return xxhash.xxh3_128_hexdigest(memoryview(data).cast("B"))


@dataclass(frozen=True)
class ComputeSnapshot:
    """What a paused compute guest shows: enough to check it against a reference elsewhere."""

    seed: int
    buf_size: int  # bytes per vCPU
    ws_start: int
    passes: tuple[int, ...]
    filled: tuple[bool, ...]
    digests: tuple[str, ...]

    @property
    def ncpus(self) -> int:
        return len(self.passes)

    def to_json(self) -> dict[str, object]:
        return {
            "seed": self.seed,
            "buf-size": self.buf_size,
            "ws-start": self.ws_start,
            "passes": list(self.passes),
            "filled": list(self.filled),
            "digests": list(self.digests),
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> ComputeSnapshot:
        def ints(key: str) -> tuple[int, ...]:
            return tuple(int(v) for v in data[key])  # type: ignore[attr-defined]

        return cls(
            seed=int(data["seed"]),  # type: ignore[arg-type]
            buf_size=int(data["buf-size"]),  # type: ignore[arg-type]
            ws_start=int(data["ws-start"]),  # type: ignore[arg-type]
            passes=ints("passes"),
            filled=tuple(bool(v) for v in data["filled"]),  # type: ignore[attr-defined]
            digests=tuple(str(v) for v in data["digests"]),  # type: ignore[attr-defined]
        )


def _report(read: ReadFn) -> tuple[int, int, int, list[int]]:
    magic, kind, ws_start, _ws_pages, nslices, *passes = abi.GUEST_REPORT.unpack(
        bytes(read(abi.GUEST_REPORT_ADDR, abi.GUEST_REPORT.size))
    )
    if magic != abi.REPORT_MAGIC:
        raise ComputeCheckError("no guest report in memory: the guest has not started yet")
    if kind != REPORT_KIND_COMPUTE:
        raise ComputeCheckError(f"the guest report is of kind {kind}, not compute's")
    if not 1 <= nslices <= abi.MAX_CPUS:
        raise ComputeCheckError(f"the guest report claims {nslices} vCPUs")
    return kind, ws_start, nslices, passes[:nslices]


def snapshot(read: ReadFn) -> ComputeSnapshot:
    """Read a paused compute guest's counts and buffer digests from its memory."""
    _kind, ws_start, ncpus, passes = _report(read)
    magic, seed, buf_size, *filled = COMPUTE_INFO.unpack(
        bytes(read(COMPUTE_INFO_ADDR, COMPUTE_INFO.size))
    )
    if magic != COMPUTE_INFO_MAGIC:
        raise ComputeCheckError("the compute guest has not published its seed yet")
    if buf_size <= 0 or buf_size % BLOCK_BYTES:
        raise ComputeCheckError(f"the compute guest claims a buffer of {buf_size} bytes")
    digests = tuple(digest(read(ws_start + c * buf_size, buf_size)) for c in range(ncpus))
    return ComputeSnapshot(
        seed=seed,
        buf_size=buf_size,
        ws_start=ws_start,
        passes=tuple(passes),
        filled=tuple(bool(f) for f in filled[:ncpus]),
        digests=digests,
    )


@dataclass
class ComputeReport:
    """One check: ``ok`` and one line per problem; ``verified`` vCPUs had their buffer checked."""

    ok: bool
    problems: list[str] = field(default_factory=list)
    passes: list[int] = field(default_factory=list)
    verified: int = 0
    filling: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "problems": list(self.problems),
            "passes": list(self.passes),
            "total-passes": sum(self.passes),
            "verified": self.verified,
            "filling": self.filling,
        }


class ComputeReference:
    """Host copies of every vCPU's buffer of one compute guest, advanced as the guest goes.

    ``check(snap)`` moves each copy to the snapshot's operation count and compares digests
    (the count may only grow between checks). A failed vCPU stays failed: its guest has left
    the reference for good, and later checks say so again rather than pass by accident.
    """

    def __init__(self, seed: int, buf_size: int, ncpus: int) -> None:
        if buf_size <= 0 or buf_size % BLOCK_BYTES:
            raise ComputeCheckError(f"compute buffer of {buf_size} bytes is not whole pages")
        self.seed, self.buf_size, self.ncpus = seed, buf_size, ncpus
        self._lib = _library()
        self._blocks = buf_size // BLOCK_BYTES
        self._bufs = [np.empty(buf_size // 8, dtype=np.uint64) for _ in range(ncpus)]
        for cpu, buf in enumerate(self._bufs):
            self._lib.compute_ref_fill(_ptr(buf), buf.size, seed, cpu)
        self._ops = [0] * ncpus
        self._failed: list[str | None] = [None] * ncpus
        self.checks = 0

    @classmethod
    def for_snapshot(cls, snap: ComputeSnapshot) -> ComputeReference:
        return cls(snap.seed, snap.buf_size, snap.ncpus)

    def _advance(self, cpu: int, ops: int) -> None:
        if ops > self._ops[cpu]:
            self._lib.compute_ref_run(_ptr(self._bufs[cpu]), self._blocks, self._ops[cpu], ops)
            self._ops[cpu] = ops

    def _digests(self, cpu: int) -> tuple[str, str]:
        """Digests of the reference after ``ops`` and after ``ops + 1`` operations."""
        now = self._bufs[cpu]
        nxt = now.copy()
        ops = self._ops[cpu]
        self._lib.compute_ref_run(_ptr(nxt), self._blocks, ops, ops + 1)
        return digest(now), digest(nxt)

    def check(self, snap: ComputeSnapshot) -> ComputeReport:
        same = (snap.seed, snap.buf_size, snap.ncpus) == (self.seed, self.buf_size, self.ncpus)
        if not same:
            return ComputeReport(
                False,
                [
                    f"guest (seed {snap.seed}, {snap.buf_size} bytes, {snap.ncpus} vCPUs) is "
                    f"not the one this reference follows (seed {self.seed}, {self.buf_size} "
                    f"bytes, {self.ncpus} vCPUs)"
                ],
                list(snap.passes),
            )
        self.checks += 1
        report = ComputeReport(True, passes=list(snap.passes))
        for cpu in range(self.ncpus):
            problem = self._check_cpu(cpu, snap)
            if problem == "filling":
                report.filling += 1
            elif problem:
                report.problems.append(problem)
            else:
                report.verified += 1
        report.ok = not report.problems
        return report

    def _check_cpu(self, cpu: int, snap: ComputeSnapshot) -> str | None:
        ops = snap.passes[cpu]
        if self._failed[cpu] is not None:
            return f"vCPU {cpu}: already diverged ({self._failed[cpu]})"
        if not snap.filled[cpu]:
            if ops:
                return self._fail(cpu, f"{ops} operations counted before its buffer was filled")
            return "filling"
        if ops < self._ops[cpu]:
            return self._fail(cpu, f"operation count went back from {self._ops[cpu]} to {ops}")
        self._advance(cpu, ops)
        if snap.digests[cpu] not in self._digests(cpu):
            return self._fail(
                cpu,
                f"buffer after {ops} operations matches neither the reference after {ops} "
                f"nor after {ops + 1} (check {self.checks})",
            )
        return None

    def _fail(self, cpu: int, why: str) -> str:
        self._failed[cpu] = why
        return f"vCPU {cpu}: {why}"

    @property
    def diverged(self) -> list[int]:
        return [cpu for cpu, why in enumerate(self._failed) if why is not None]


def check_compute(read: ReadFn, reference: ComputeReference | None = None) -> ComputeReport:
    """Check a paused compute guest's memory; without ``reference``, recompute from the start."""
    snap = snapshot(read)
    ref = reference or ComputeReference.for_snapshot(snap)
    return ref.check(snap)


__all__ = [
    "COMPUTE_INFO_ADDR",
    "ComputeCheckError",
    "ComputeReference",
    "ComputeReport",
    "ComputeSnapshot",
    "check_compute",
    "digest",
    "snapshot",
]
