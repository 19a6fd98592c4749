"""Exact-resume soak: one deterministic guest through stop/cont cycles and chains of migrations.

RAM hashes at switch-over say that the destination's memory equals the source's; they do not
say that the guest then goes on as it would have. This soak says that. It boots the compute
guest (``livemig.guests.compute``: every vCPU's buffer is a pure function of the seed and its
operation count) in a real ``livemig run`` process and then, for as long as asked, alternates:

* **stop/cont cycles** over QMP with randomised timing (0 to 2 ms between them), checking the
  guest at every stop against a host-side reference that this process keeps and advances;
* **a migration** of one of the kinds in ``KINDS``, to a fresh ``livemig run`` process that
  then carries the guest on (pre-copy over unix and TCP, with x-verify, multifd with and
  without compression, post-copy with and without preempt, XBZRLE, auto-converge throttling,
  ``file:`` snapshots plain and mapped-ram, a paused guest, and migrations that fail or are
  cancelled, after which the guest goes on on the source), or a COLO failover: the guest
  replicated to a standby, its primary SIGKILLed, the standby going on from its last
  checkpoint.

The reference follows the guest across every process (``x-guest-check`` with ``reference:
false`` returns the counts and buffer digests); one wrong word anywhere in a buffer, one
instruction lost or executed twice, and every later check fails. ``SoakResult`` counts the
cycles and migrations survived; ``diverged`` is the only acceptable zero.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from livemig.errors import LivemigError
from livemig.guests.compute import ComputeReference, ComputeSnapshot
from livemig.testing.procs import LivemigProcess, ProcHarness, free_tcp_port, wait_until

MIGRATION_TIMEOUT = 60.0
# Capabilities and parameters a hop may change: every hop sets all of them on its source, so
# nothing one hop asked for leaks into the next migration of the same process. x-checksums is
# on unless a hop says otherwise, as ``livemig migrate`` has it (and ``run --incoming file:``
# requires it).
_CAPS = ("return-path", "x-verify", "multifd", "postcopy-ram", "postcopy-preempt", "xbzrle",
         "auto-converge", "mapped-ram", "x-checksums", "x-colo")  # fmt: skip
_CAPS_ON = ("x-checksums",)
_PARAMS: dict[str, Any] = {"max-bandwidth": 0, "downtime-limit": 300, "multifd-channels": 2,
                           "multifd-compression": "none"}  # fmt: skip


class Diverged(LivemigError):
    """The guest left its reference: it did not resume exactly."""


class SoakError(LivemigError):
    """A step of the soak failed for a reason other than a divergence (the message says)."""


@dataclass
class SoakConfig:
    smp: int = 2
    memory: str = "32M"
    buf: str = "256K"  # per vCPU
    seed: int = 1
    cycles: int = 300  # stop/cont cycles in all, spread over the hops
    migrations: int = 0  # 0: one of each kind
    kinds: Sequence[str] = ()  # default: every kind in KINDS, in a shuffled order
    rng_seed: int = 0
    workdir: str | None = None


@dataclass
class SoakResult:
    smp: int
    cycles: int = 0
    migrations: dict[str, int] = field(default_factory=dict)
    checks: int = 0
    guest_ops: int = 0
    diverged: bool = False
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    hops: list[dict[str, Any]] = field(default_factory=list)

    @property
    def migrations_total(self) -> int:
        return sum(self.migrations.values())

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "migrations-total": self.migrations_total}


class _Soak:
    def __init__(self, cfg: SoakConfig, h: ProcHarness, log: Callable[[str], None]) -> None:
        self.cfg, self.h, self.log = cfg, h, log
        self.rng = random.Random(cfg.rng_seed)
        self.ref: ComputeReference | None = None
        self.result = SoakResult(smp=cfg.smp)
        self.n = 0

    # -- checking ------------------------------------------------------------------------------

    def check(self, proc: LivemigProcess, when: str) -> None:
        """Stop (if running), compare with the reference, resume as it was."""
        was = proc.status()
        if was in ("running", "colo"):  # colo: a replicated primary amid a checkpoint
            proc.cmd("stop")
        snap = ComputeSnapshot.from_json(proc.cmd("x-guest-check", reference=False))
        if self.ref is None:
            self.ref = ComputeReference.for_snapshot(snap)
        report = self.ref.check(snap)
        self.result.checks += 1
        self.result.guest_ops = sum(snap.passes)
        if not report.ok:
            raise Diverged(f"{when}: " + "; ".join(report.problems))
        if was in ("running", "colo"):
            proc.cmd("cont")

    def cycles(self, proc: LivemigProcess, count: int, where: str) -> None:
        for _ in range(count):
            time.sleep(self.rng.choice((0.0, 0.0001, 0.0005, 0.002)))
            self.check(proc, f"stop/cont cycle {self.result.cycles + 1} on {where}")
            self.result.cycles += 1

    # -- one migration -------------------------------------------------------------------------

    def settings(self, proc: LivemigProcess, caps: dict[str, bool], params: dict[str, Any]) -> None:
        proc.cmd("migrate-set-capabilities", capabilities=[
            {"capability": c, "state": bool(caps.get(c, c in _CAPS_ON))} for c in _CAPS])  # fmt: skip
        proc.cmd("migrate-set-parameters", **{**_PARAMS, **params})

    def deferred(self, caps: dict[str, bool], params: dict[str, Any] | None = None,
                 uri: str | None = None) -> tuple[LivemigProcess, str]:  # fmt: skip
        """A destination started with ``--incoming defer``, given its capabilities first."""
        dst = self.h.destination(incoming="defer")
        self.settings(dst, caps, params or {})
        self.n += 1
        uri = uri or f"unix:{self.h.path(f'exact{self.n}.sock')}"
        dst.cmd("migrate-incoming", uri=uri)
        if uri.startswith("unix:"):
            wait_until(lambda: Path(uri[5:]).exists(), 30, f"{uri} listening")
        return dst, uri

    def finish(self, src: LivemigProcess, dst: LivemigProcess, kind: str) -> LivemigProcess:
        info = src.wait_migration(MIGRATION_TIMEOUT)
        if info.get("status") != "completed":
            raise SoakError(f"{kind}: migration ended {info.get('status')}: "
                            f"{info.get('error-desc')}; destination: {dst.log()}")  # fmt: skip
        dst.wait_status(("running", "paused"), 30)
        self.record(kind, info)
        src.kill()
        return dst

    def record(self, kind: str, info: dict[str, Any]) -> None:
        self.result.migrations[kind] = self.result.migrations.get(kind, 0) + 1
        self.result.hops.append({
            "kind": kind, "status": info.get("status"), "total-time": info.get("total-time"),
            "downtime": info.get("downtime"),
            "passes": (info.get("ram") or {}).get("dirty-sync-count"),
        })  # fmt: skip

    def migrate(self, kind: str, src: LivemigProcess) -> LivemigProcess:
        hop = KINDS[kind]
        return hop(self, src)


# Each hop takes the process that runs the guest and returns the one that runs it afterwards.


def _precopy(s: _Soak, src: LivemigProcess) -> LivemigProcess:
    dst = s.h.destination()
    s.settings(src, {}, {})
    src.cmd("migrate", uri=dst.incoming)
    return s.finish(src, dst, "precopy")


def _precopy_tcp_verify(s: _Soak, src: LivemigProcess) -> LivemigProcess:
    uri = f"tcp:127.0.0.1:{free_tcp_port()}"
    dst = s.h.destination(incoming=uri)
    wait_until(lambda: dst.status() == "inmigrate", 30, "destination listening")
    s.settings(src, {"return-path": True, "x-verify": True}, {})
    src.cmd("migrate", uri=uri)
    return s.finish(src, dst, "precopy-tcp-verify")


def _multifd(s: _Soak, src: LivemigProcess) -> LivemigProcess:
    comp = s.rng.choice(("none", "zstd"))
    params = {"multifd-channels": s.rng.choice((2, 3)), "multifd-compression": comp}
    dst, uri = s.deferred({"multifd": True}, params)
    s.settings(src, {"multifd": True}, params)
    src.cmd("migrate", uri=uri)
    return s.finish(src, dst, "multifd")


def _postcopy(s: _Soak, src: LivemigProcess, preempt: bool = False) -> LivemigProcess:
    caps = {"postcopy-ram": True, "postcopy-preempt": preempt}
    dst, uri = s.deferred(caps)
    # A bandwidth limit keeps pre-copy going long enough to switch in the middle of it.
    s.settings(src, caps, {"max-bandwidth": 8 << 20})
    src.cmd("migrate", uri=uri)
    wait_until(lambda: src.query_migrate().get("status") in ("active", "completed"), 30,
               "pre-copy active")  # fmt: skip
    time.sleep(s.rng.uniform(0, 0.05))
    src.cmd("migrate-start-postcopy")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    return s.finish(src, dst, "postcopy-preempt" if preempt else "postcopy")


def _xbzrle(s: _Soak, src: LivemigProcess) -> LivemigProcess:
    dst = s.h.destination()
    s.settings(src, {"xbzrle": True}, {"max-bandwidth": 32 << 20})
    src.cmd("migrate", uri=dst.incoming)
    return s.finish(src, dst, "xbzrle")


def _auto_converge(s: _Soak, src: LivemigProcess) -> LivemigProcess:
    """Too little bandwidth for the downtime limit: the throttle rises until it is seen at
    work, then the limit goes up and the migration converges (throttled stops included)."""
    dst = s.h.destination()
    s.settings(src, {"auto-converge": True}, {"max-bandwidth": 2 << 20, "downtime-limit": 1})
    src.cmd("migrate", uri=dst.incoming)

    def throttled() -> bool:
        info = src.query_migrate()
        if info.get("status") not in ("setup", "active"):
            raise SoakError(f"auto-converge: migration ended {info.get('status')} before the "
                            f"throttle started: {info.get('error-desc')}")  # fmt: skip
        return int(info.get("cpu-throttle-percentage", 0)) > 0

    wait_until(throttled, 30, "the CPU throttle to start")
    time.sleep(s.rng.uniform(0.05, 0.3))
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0, "downtime-limit": 300})
    return s.finish(src, dst, "auto-converge")


def _snapshot(s: _Soak, src: LivemigProcess, mapped: bool = False) -> LivemigProcess:
    s.n += 1
    kind = "snapshot-mapped-ram" if mapped else "snapshot"
    path = s.h.path(f"exact{s.n}.mig")
    s.settings(src, {"mapped-ram": mapped}, {})
    src.cmd("migrate", uri=f"file:{path}")
    info = src.wait_migration(MIGRATION_TIMEOUT)
    if info.get("status") != "completed":
        raise SoakError(f"{kind}: saving ended {info.get('status')}: {info.get('error-desc')}")
    if mapped:
        dst, _uri = s.deferred({"mapped-ram": True}, uri=f"file:{path}")
    else:
        dst = s.h.destination(incoming=f"file:{path}")
    dst.wait_status("running", 30)
    s.record(kind, info)
    src.kill()
    Path(path).unlink(missing_ok=True)
    return dst


def _paused(s: _Soak, src: LivemigProcess) -> LivemigProcess:
    """A stopped guest migrates and stays stopped; ``cont`` on the destination runs it."""
    src.cmd("stop")
    dst = s.h.destination()
    s.settings(src, {}, {})
    src.cmd("migrate", uri=dst.incoming)
    dst = s.finish(src, dst, "paused")
    if dst.wait_status(("paused", "running"), 30) != "paused":
        raise SoakError("paused: the destination runs a guest that was stopped on the source")
    dst.cmd("cont")
    return dst


def _cancelled(s: _Soak, src: LivemigProcess) -> LivemigProcess:
    dst = s.h.destination()
    s.settings(src, {}, {"max-bandwidth": 1 << 20})
    src.cmd("migrate", uri=dst.incoming)
    wait_until(lambda: src.query_migrate().get("status") == "active", 30, "migration active")
    time.sleep(s.rng.uniform(0, 0.1))
    src.cmd("migrate_cancel")
    info = src.wait_migration(MIGRATION_TIMEOUT)
    if info.get("status") != "cancelled":
        raise SoakError(f"cancelled: migration ended {info.get('status')}")
    src.wait_status("running", 30)
    s.record("cancelled", info)
    dst.kill()
    return src


def _failed(s: _Soak, src: LivemigProcess) -> LivemigProcess:
    """The destination is killed mid-migration: the guest goes on, on the source."""
    dst = s.h.destination()
    s.settings(src, {}, {"max-bandwidth": 1 << 20})
    src.cmd("migrate", uri=dst.incoming)
    wait_until(lambda: src.query_migrate().get("status") == "active", 30, "migration active")
    time.sleep(s.rng.uniform(0, 0.1))
    dst.kill()
    info = src.wait_migration(MIGRATION_TIMEOUT)
    if info.get("status") != "failed":
        raise SoakError(f"failed: migration ended {info.get('status')}")
    src.wait_status("running", 30)
    s.record("failed", info)
    return src


def _failover(s: _Soak, src: LivemigProcess) -> LivemigProcess:
    """Replication (COLO) with checkpoints every 10-50 ms, stop/cont cycles on the replicated
    primary, then the primary SIGKILLed at a random moment: the standby goes on from its last
    whole checkpoint."""
    dst = s.h.destination()
    s.settings(src, {"return-path": True, "x-colo": True},
               {"x-checkpoint-delay": s.rng.choice((10, 25, 50))})  # fmt: skip
    src.cmd("migrate", uri=dst.incoming)
    info = src.wait_migration(MIGRATION_TIMEOUT, frozenset({"colo", "failed", "completed",
                                                            "cancelled"}))  # fmt: skip
    if info.get("status") != "colo":
        raise SoakError(f"failover: replication did not start: {info.get('error-desc')}")
    for i in range(5):  # stops amid checkpoints (not counted in the soak's cycles)
        time.sleep(s.rng.choice((0.0, 0.005, 0.02)))
        s.check(src, f"stop/cont {i + 1} on the replicated primary {src.name}")
    time.sleep(s.rng.uniform(0, 0.3))
    src.kill()
    dst.wait_status("running", 30)
    colo = dst.cmd("query-colo-status")
    if not colo.get("x-took-over"):
        raise SoakError(f"failover: the standby did not take over: {colo}")
    s.record("failover", {**info, "status": "took over"})
    return dst


KINDS: dict[str, Callable[[_Soak, LivemigProcess], LivemigProcess]] = {
    "precopy": _precopy,
    "precopy-tcp-verify": _precopy_tcp_verify,
    "multifd": _multifd,
    "postcopy": _postcopy,
    "postcopy-preempt": lambda s, p: _postcopy(s, p, preempt=True),
    "xbzrle": _xbzrle,
    "auto-converge": _auto_converge,
    "snapshot": _snapshot,
    "snapshot-mapped-ram": lambda s, p: _snapshot(s, p, mapped=True),
    "paused": _paused,
    "cancelled": _cancelled,
    "failed": _failed,
    "failover": _failover,
}


def soak(cfg: SoakConfig, log: Callable[[str], None] = lambda _msg: None) -> SoakResult:
    """Run the soak; never raises for a divergence or a failed step: ``result.problems``."""
    kinds = list(cfg.kinds) or list(KINDS)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise SoakError(f"unknown migration kind(s) {unknown}; known: {', '.join(KINDS)}")
    total = cfg.migrations or len(kinds)
    started = time.monotonic()
    with ProcHarness(cfg.workdir, memory=cfg.memory, smp=cfg.smp) as h:
        s = _Soak(cfg, h, log)
        order: list[str] = []
        while len(order) < total:
            batch = kinds[:]
            s.rng.shuffle(batch)
            order += batch
        order = order[:total]
        per_hop = [cfg.cycles // (total + 1)] * (total + 1)
        per_hop[-1] += cfg.cycles - sum(per_hop)
        try:
            proc = h.source(guest="compute", append=f"buf={cfg.buf} seed={cfg.seed}")
            wait_until(lambda: _started(proc), 30, "the compute guest to fill its buffers")
            s.cycles(proc, per_hop[0], proc.name)
            for i, kind in enumerate(order):
                proc = s.migrate(kind, proc)
                s.check(proc, f"right after migration {i + 1} ({kind})")
                s.cycles(proc, per_hop[i + 1], proc.name)
                log(f"{i + 1}/{total} {kind}: {s.result.cycles} cycles, "
                    f"{s.result.guest_ops} guest operations, exact")  # fmt: skip
        except Diverged as exc:
            s.result.diverged = True
            s.result.problems.append(str(exc))
        except LivemigError as exc:
            s.result.problems.append(f"{type(exc).__name__}: {exc}{_logs(h)}")
    s.result.seconds = round(time.monotonic() - started, 1)
    return s.result


def _logs(h: ProcHarness) -> str:
    """The exit status and last log lines of the processes of the step that failed."""
    out = []
    for p in h.procs[-2:]:
        code = p.proc.poll() if p.proc is not None else None
        state = "running" if code is None else f"exited {code}"
        out.append(f"\n--- {p.name} ({state}):\n{p.log()[-1500:]}")
    return "".join(out)


def _started(proc: LivemigProcess) -> bool:
    proc.cmd("stop")
    try:
        report = proc.cmd("x-guest-check", reference=False)
    except LivemigError:
        return False  # not published yet
    finally:
        proc.cmd("cont")
    return all(report["filled"])


def summary(results: Sequence[SoakResult]) -> dict[str, Any]:
    """Totals over several soaks (e.g. 1 and 2 vCPUs)."""
    kinds: Counter[str] = Counter()
    for r in results:
        kinds.update(r.migrations)
    return {
        "cycles": sum(r.cycles for r in results),
        "migrations": sum(r.migrations_total for r in results),
        "by-kind": dict(sorted(kinds.items())),
        "checks": sum(r.checks for r in results),
        "diverged": sum(r.diverged for r in results),
        "problems": [p for r in results for p in r.problems],
    }
