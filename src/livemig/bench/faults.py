"""``livemig bench faults``: faults injected at each phase of a migration, and the fuzzer.

Each scenario (``run_fault``) starts real ``livemig run`` processes (``livemig.testing.procs``), injects
one fault at one point, and checks what issue 7 demands afterwards:

* the source guest runs on with memstress's invariant intact and makes progress (where the
  source process is alive), and ``query-migrate`` says ``failed`` with an ``error-desc``;
* the destination reports the failure and exits 1 (it never runs the guest as well);
* no thread, socket or file descriptor is left behind in the source (``/proc/PID/fd`` and
  ``/proc/PID/task`` back to what they were before the migration);
* a second migration, to a fresh destination, completes.

Faults: ``stall-destination`` (SIGSTOP the destination: it stops reading; the source's
``x-io-timeout`` fires), ``stall-source`` (SIGSTOP the source: the destination's time-out fires;
then SIGCONT), ``kill-source`` (SIGKILL), ``disk-full`` (``file:`` on a tiny tmpfs). Phases:
``setup`` (before the first byte), ``precopy`` (pages flowing, rate-limited), ``completion``
(``pause-before-switchover`` holds the source at the switch-over; the fault comes before
``migrate-continue``), ``postcopy`` (both sides in postcopy-active, the background push paced
at 1 MB/s so the fault lands mid post-copy).

Post-copy faults, as QEMU handles them (the guest is split: the destination runs it, pages not
yet sent are only on the source): ``cut-link`` (a ``LinkProxy`` relay between the two closes
both connections) and ``stall-destination``/``stall-source`` (SIGSTOP; the peer's
``x-io-timeout`` fires, then SIGCONT) put both sides in postcopy-paused with the reason in
``error-desc``; ``migrate-recover`` on the destination plus ``migrate resume:true`` on the
source then completes and verifies (x-verify checksums, memstress's invariant on the
destination, no fd or thread left in the source). ``kill-source``: the destination pauses
("pages still on the source"), gives up after its ``x-postcopy-auto-recover`` periods, fails
and stops the incomplete guest (internal-error, ``livemig run`` exits 1) rather than run it on
zero-filled pages. ``kill-destination``: the running half of the guest is gone; the source
stays postcopy-paused and never restarts its stale copy (``migrate_cancel`` is refused in
post-copy, as QEMU refuses it; that guest is lost by design, counted apart as
``guests-lost-expected``). In every post-copy case
the run states of both sides are checked at each step: never ``running`` on both.

A SIGSTOP counts as injected only once every thread of the target is stopped
(``stop_process``): ``kill`` returns before the group stop, and a destination that ran on for
a moment once completed a "stalled" migration.

The table gives per phase the faults injected and survived, then the fuzzer's inputs, crashes,
hangs, oversized allocations and loads with the wrong RAM (every input that loads is compared
with the source's RAM), and the guests lost (0 wherever the source is alive).

``--corruptions N`` (``livemig.testing.integrity``): N random corruptions (a bit flipped, a
4 KiB block zeroed, the stream cut) of each of a plain, a mapped-ram, a multifd and an xbzrle
stream, recorded with livemig's checksums on and again off; every input that loads has its RAM
compared with the source's. Then ``--postcopy-corruptions`` (default N/10, at least 20) live
post-copy migrations, each damaged once in transit on its main or preempt channel
(``livemig.testing.integrity_postcopy``): refused before the switch-over, completed, paused
and recovered, or stopped after it; every one that completes has its RAM compared with the
source's. With checksums on a load with the wrong RAM fails the benchmark; off, the count is
there for the record.

Last, a short exact-resume soak (``livemig bench exact``): the compute guest through stop/cont
cycles and one migration of every kind, checked against its host-side reference at every stop.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from livemig.bench.common import table_console
from livemig.errors import LivemigError
from livemig.testing.procs import LivemigProcess, ProcError, ProcHarness, wait_until

IO_TIMEOUT_MS = 1500
SLOW = 8 << 20  # bytes/s during pre-copy: several seconds for the working set
GUEST_ARGS = "ws=8M rate=5000"
START_WAIT = 30.0  # a loaded machine may take long to boot the guest

SCENARIOS: tuple[tuple[str, str], ...] = (
    ("stall-destination", "setup"),
    ("stall-destination", "precopy"),
    ("stall-destination", "completion"),
    ("stall-source", "precopy"),
    ("kill-source", "setup"),
    ("kill-source", "precopy"),
    ("kill-source", "completion"),
    ("disk-full", "setup"),
    ("disk-full", "precopy"),
    ("cut-link", "postcopy"),
    ("stall-destination", "postcopy"),
    ("stall-source", "postcopy"),
    ("kill-destination", "postcopy"),
    ("kill-source", "postcopy"),
)


class FaultSkipped(Exception):
    """The scenario cannot run here (no tmpfs mount, no post-copy); the message says why."""


@dataclass
class FaultResult:
    fault: str
    phase: str
    survived: bool = False
    source_alive: bool = True
    guest_lost: bool = False
    skipped: str = ""
    # post-copy, destination killed: the guest's state was split between the two processes
    # and half of it died; no recovery exists (QEMU's case too), so the loss is expected
    expected_loss: bool = False
    checks: dict[str, bool] = field(default_factory=dict)
    detail: str = ""
    seconds: float = 0.0


def postcopy_supported() -> bool:
    from livemig.migration.options import SUPPORTED_CAPABILITIES

    return "postcopy-ram" in SUPPORTED_CAPABILITIES


# -- helpers -----------------------------------------------------------------------------------


def _task_states(pid: int) -> list[str]:
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            states.append(stat[stat.rindex(")") + 2])  # the field after "(comm)"
    return states


def stop_process(proc: LivemigProcess, timeout: float = 30.0) -> None:
    """SIGSTOP ``proc`` and return only once every one of its threads is stopped.

    ``kill(SIGSTOP)`` returns before the process stops: the kernel wakes one thread to take
    the signal and only that thread starts the group stop. On a loaded machine that thread may
    wait for a CPU for tens of ms while the others run on: a destination stopped that way just
    before ``migrate-continue`` once loaded the final stream and sent SHUT(0), and the
    "stalled" migration completed (the flake in "stall-destination at completion").
    """
    proc.signal(signal.SIGSTOP)
    wait_until(lambda: all(s == "T" for s in _task_states(proc.pid)), timeout,
               f"every thread of {proc.name} stopped", 0.005)  # fmt: skip


def _source(h: ProcHarness) -> LivemigProcess:
    """A memstress source, waited for until its guest runs: ``livemig run`` answers QMP
    before it starts the vCPUs, and a guest check in ``prelaunch`` sends no ``stop``, then
    finds the guest running (seen as "x-guest-check needs a stopped guest")."""
    src = h.source(append=GUEST_ARGS)
    src.wait_status("running", timeout=START_WAIT)
    return src


def _baseline(src: LivemigProcess) -> tuple[int, int]:
    src.cmd("query-status")
    return src.fd_count(), src.thread_count()


def _no_leak(
    src: LivemigProcess, base: tuple[int, int], res: FaultResult, timeout: float = 30.0
) -> bool:
    try:
        # QMP's worker pool (4 threads at most, one at the baseline) may grow when replies race
        # the next command: up to 3 more threads are that pool, not a leak.
        wait_until(lambda: src.fd_count() <= base[0] and src.thread_count() <= base[1] + 3,
                   timeout, "fd and thread counts back to their baseline", 0.1)  # fmt: skip
        return True
    except ProcError:
        fds = sorted(os.readlink(f"/proc/{src.pid}/fd/{f}")
                     for f in os.listdir(f"/proc/{src.pid}/fd"))  # fmt: skip
        tasks = sorted(Path(f"/proc/{src.pid}/task/{t}/comm").read_text().strip()
                       for t in os.listdir(f"/proc/{src.pid}/task"))  # fmt: skip
        res.detail += (f"; leak: fds {len(fds)} (baseline {base[0]}): {fds}; "
                       f"threads {len(tasks)} (baseline {base[1]}): {tasks}")  # fmt: skip
        return False


def _source_ok(src: LivemigProcess) -> tuple[bool, str]:
    """The source guest is running, its invariant holds, and it makes progress."""
    try:
        src.wait_status("running", timeout=START_WAIT)
        now = src.guest_check()
        if not now["ok"]:
            return False, f"invariant broken: {now['problems']}"
        later = src.wait_passes_increase(now["total-passes"], timeout=START_WAIT)
        return bool(later["ok"]), "" if later["ok"] else f"invariant broken: {later['problems']}"
    except ProcError as exc:
        return False, str(exc)


def _dest_failed(dst: LivemigProcess | None, timeout: float = 30.0) -> bool:
    if dst is None:
        return True
    if dst.proc is not None and dst.proc.poll() is None:
        dst.signal(signal.SIGCONT)  # a stopped destination must get to notice and exit
    try:
        return dst.wait_exit(timeout) == 1 and "incoming migration failed" in dst.log()
    except ProcError:
        return False


def _wait_active(src: LivemigProcess, min_bytes: int = 1, timeout: float = 30.0) -> None:
    def ready() -> bool:
        q = src.query_migrate()
        if q.get("status") in ("failed", "completed", "cancelled"):
            raise ProcError(f"migration ended early: {q}")
        return q.get("status") == "active" and q.get("ram", {}).get("transferred", 0) >= min_bytes

    wait_until(ready, timeout, "migration active with pages sent")


def _second_migration(h: ProcHarness, src: LivemigProcess) -> bool:
    dst2 = h.destination()
    src.cmd("migrate-set-capabilities", capabilities=[
        {"capability": "pause-before-switchover", "state": False}])  # fmt: skip
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 30})
    src.cmd("migrate", uri=dst2.incoming)
    info = src.wait_migration(timeout=60)
    if info["status"] != "completed":
        return False
    dst2.wait_status("running", timeout=START_WAIT)
    return bool(dst2.guest_check()["ok"])


@contextlib.contextmanager
def tiny_tmpfs(size: str):  # type: ignore[no-untyped-def]
    """A tmpfs of ``size`` mounted on a fresh directory (FaultSkipped if mount is refused)."""
    d = tempfile.mkdtemp(prefix="livemig-full-")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", d],
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    if r.returncode != 0:
        os.rmdir(d)
        raise FaultSkipped(f"cannot mount a tmpfs for the disk-full case: {r.stderr.strip()}")
    try:
        yield Path(d)
    finally:
        subprocess.run(["umount", "-l", d], capture_output=True, timeout=30)
        with contextlib.suppress(OSError):
            os.rmdir(d)


# -- scenarios -----------------------------------------------------------------------------------


def run_fault(fault: str, phase: str, h: ProcHarness) -> FaultResult:
    """Run one scenario in ``h`` (a fresh harness); the result says which checks held."""
    res = FaultResult(fault, phase)
    t0 = time.monotonic()
    try:
        if phase == "postcopy" and not postcopy_supported():
            raise FaultSkipped("postcopy-ram is not in SUPPORTED_CAPABILITIES yet")
        if phase == "postcopy":
            _POSTCOPY_RUNNERS[fault](h, res)
        else:
            _RUNNERS[fault](h, phase, res)
    except FaultSkipped as exc:
        res.skipped = str(exc)
    except (LivemigError, OSError) as exc:  # ProcError, QMP errors: the scenario failed
        res.checks["ran"] = False
        res.detail = f"{type(exc).__name__}: {exc}"
    res.seconds = time.monotonic() - t0
    res.detail = res.detail.lstrip("; ")
    res.survived = not res.skipped and bool(res.checks) and all(res.checks.values())
    return res


def _common_after(h: ProcHarness, src: LivemigProcess, base: tuple[int, int], res: FaultResult,
                  dst: LivemigProcess | None) -> None:  # fmt: skip
    info = src.wait_migration(timeout=60)
    res.checks["query-migrate failed"] = info.get("status") == "failed"
    res.checks["error-desc"] = bool(info.get("error-desc"))
    res.detail = str(info.get("error-desc", info))
    ok, why = _source_ok(src)
    res.checks["source guest intact"] = ok
    res.guest_lost = not ok
    if why:
        res.detail += f"; {why}"
    res.checks["destination exit 1"] = _dest_failed(dst)
    res.checks["no fd/thread leak"] = _no_leak(src, base, res)
    res.checks["second migrate"] = _second_migration(h, src)


def _stall_destination(h: ProcHarness, phase: str, res: FaultResult) -> None:
    src = _source(h)
    # At completion the whole stream may already sit in the stopped destination's socket
    # buffer: woken, it loads it although the source gave up (no SHUT in time) and resumed its
    # guest. The protocol has no source-to-destination commit (QEMU has the same window), so,
    # as libvirt does, the destination is started paused (-S) and must not run the guest.
    extra = ["--paused"] if phase == "completion" else []
    dst = h.destination(extra=extra)
    src.wait_passes_increase(0, timeout=START_WAIT)
    base = _baseline(src)
    caps = {"return-path": True, "pause-before-switchover": phase == "completion"}
    params = {"x-io-timeout": IO_TIMEOUT_MS, "max-bandwidth": SLOW}
    if phase == "setup":
        stop_process(dst)
        h.migrate(src, dst.incoming, caps=caps, params=params)
    elif phase == "precopy":
        h.migrate(src, dst.incoming, caps=caps, params=params)
        _wait_active(src, 256 << 10)
        stop_process(dst)
    else:
        h.migrate(src, dst.incoming, caps=caps, params={**params, "max-bandwidth": 1 << 30})
        src.wait_migration(timeout=60, states=frozenset({"pre-switchover", "failed"}))
        stop_process(dst)
        src.cmd("migrate-continue", state="pre-switchover")
        _common_after(h, src, base, res, None)
        dst.signal(signal.SIGCONT)
        time.sleep(1.0)
        # exited 1, or loaded and stayed paused: either way not running next to the source
        res.checks["destination not running"] = (not dst.alive()) or dst.status() != "running"
        return
    _common_after(h, src, base, res, dst)


def _deferred_destination(
    h: ProcHarness,
    sock: str,
    caps: dict[str, bool] | None = None,
    params: dict[str, Any] | None = None,
    exit_on_error: bool = True,
) -> tuple[LivemigProcess, str]:
    """A destination started with ``--incoming defer``, given its own capabilities and
    parameters (x-io-timeout: the incoming side takes its parameters at migrate-incoming),
    then listening on a unix socket ``sock``; returns it and the URI."""
    dst = h.destination(incoming="defer")
    uri = f"unix:{h.path(sock)}"
    if caps:
        dst.cmd("migrate-set-capabilities",
                capabilities=[{"capability": k, "state": v} for k, v in caps.items()])  # fmt: skip
    if params:
        dst.cmd("migrate-set-parameters", **params)
    dst.cmd("migrate-incoming", uri=uri, **{"exit-on-error": exit_on_error})
    wait_until(lambda: Path(uri[5:]).exists(), PC_WAIT, f"{uri} listening")
    return dst, uri


def _stall_source(h: ProcHarness, phase: str, res: FaultResult) -> None:
    src = _source(h)
    # The destination's own time-out decides; the stalled source learns when it wakes. A
    # destination started with --incoming URI would wait with the default 30 s.
    dst_timeout = IO_TIMEOUT_MS
    dst, uri = _deferred_destination(h, "stall-src.sock", params={"x-io-timeout": dst_timeout})
    src.wait_passes_increase(0, timeout=START_WAIT)
    base = _baseline(src)
    h.migrate(src, uri, caps={"return-path": True},
              params={"x-io-timeout": 30000, "max-bandwidth": SLOW})  # fmt: skip
    _wait_active(src, 256 << 10)
    stop_process(src)
    try:
        res.checks["destination exit 1"] = _dest_failed(dst, timeout=dst_timeout / 1000 + 40)
    finally:
        src.signal(signal.SIGCONT)
    info = src.wait_migration(timeout=60)
    res.checks["query-migrate failed"] = info.get("status") == "failed"
    res.checks["error-desc"] = bool(info.get("error-desc"))
    res.detail = str(info.get("error-desc", info))
    ok, why = _source_ok(src)
    res.checks["source guest intact"] = ok
    res.guest_lost = not ok
    res.detail += f"; {why}" if why else ""
    res.checks["no fd/thread leak"] = _no_leak(src, base, res)
    res.checks["second migrate"] = _second_migration(h, src)


def _kill_source(h: ProcHarness, phase: str, res: FaultResult) -> None:
    src = _source(h)
    dst = h.destination()
    src.wait_passes_increase(0, timeout=START_WAIT)
    caps = {"return-path": True, "pause-before-switchover": phase == "completion"}
    bw = (1 << 30) if phase == "completion" else SLOW  # completion: converge quickly
    h.migrate(src, dst.incoming, caps=caps, params={"max-bandwidth": bw})
    if phase == "precopy":
        _wait_active(src, 256 << 10)
    elif phase == "completion":
        src.wait_migration(timeout=60, states=frozenset({"pre-switchover", "failed"}))
    src.kill()
    res.source_alive = False
    waiting = False
    if phase == "setup":
        # Killed before it connected, the destination still waits, as QEMU's does; killed
        # just after, it fails and exits, possibly while we ask it (QMP then disconnects).
        with contextlib.suppress(LivemigError):
            waiting = dst.alive() and dst.query_migrate().get("status") in (None, "setup")
    if waiting:
        res.checks["destination still waiting"] = True
    else:
        res.checks["destination exit 1"] = _dest_failed(dst)
    # the guest must not run on the destination from a partial stream
    res.checks["destination did not run the guest"] = "resum" not in dst.log().lower()


def _disk_full(h: ProcHarness, phase: str, res: FaultResult) -> None:
    size = "64k" if phase == "setup" else "4m"
    with tiny_tmpfs(size) as d:
        src = _source(h)
        src.wait_passes_increase(0, timeout=START_WAIT)
        base = _baseline(src)
        h.migrate(src, f"file:{d / 'vm.mig'}", params={"max-bandwidth": 1 << 30})
        info = src.wait_migration(timeout=60)
        res.checks["query-migrate failed"] = info.get("status") == "failed"
        res.checks["error-desc says no space"] = "space" in str(info.get("error-desc", ""))
        res.detail = str(info.get("error-desc", info))
        ok, why = _source_ok(src)
        res.checks["source guest intact"] = ok
        res.guest_lost = not ok
        res.detail += f"; {why}" if why else ""
        res.checks["no fd/thread leak"] = _no_leak(src, base, res)
        res.checks["second migrate"] = _second_migration(h, src)


_RUNNERS = {
    "stall-destination": _stall_destination,
    "stall-source": _stall_source,
    "kill-source": _kill_source,
    "disk-full": _disk_full,
}


# -- post-copy scenarios -----------------------------------------------------------------------

PC_BANDWIDTH = 1 << 20  # bytes/s of background push: post-copy lasts long enough for a fault
PC_WAIT = 30.0  # generous: what is waited for is certain to happen, only the load delays it


class LinkProxy:
    """A unix-socket relay between source and destination: ``cut()`` breaks the link as a
    failed network would (both ends see their connection end, neither process is touched)."""

    def __init__(self, listen_path: str, target_path: str) -> None:
        self.target = target_path
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(listen_path)
        self.server.listen(4)
        self.uri = f"unix:{listen_path}"
        self.socks: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self._closed = False
        t = threading.Thread(target=self._accept, name="fault proxy", daemon=True)
        t.start()
        self.threads.append(t)

    def _accept(self) -> None:
        while not self._closed:
            try:
                a, _ = self.server.accept()
            except OSError:
                return
            b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            b.connect(self.target)
            self.socks += [a, b]
            for x, y in ((a, b), (b, a)):
                t = threading.Thread(target=self._pump, args=(x, y), daemon=True)
                t.start()
                self.threads.append(t)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        buf = bytearray(1 << 16)
        with contextlib.suppress(OSError):
            while n := src.recv_into(buf):
                dst.sendall(memoryview(buf)[:n])
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        """Break every relayed connection and accept no more."""
        self._closed = True
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in self.threads:
            t.join(10)
        for s in self.socks:
            s.close()


def _both_sides(res: FaultResult, src: LivemigProcess | None, dst: LivemigProcess | None,
                when: str) -> None:  # fmt: skip
    """Record the run states now: the guest must never run on both sides, and the source,
    once post-copy started, never runs it again."""
    states = {}
    for name, p in (("source", src), ("destination", dst)):
        if p is not None and p.alive() and "T" not in _task_states(p.pid):
            states[name] = p.status()
    ok = not (states.get("source") == "running" and states.get("destination") == "running")
    ok = ok and states.get("source", "finish-migrate") in ("finish-migrate", "postmigrate")
    key = "guest never runs on both sides"
    res.checks[key] = res.checks.get(key, True) and ok
    if not ok:
        res.detail += f"; {when}: run states {states}"


def _pc_start(h: ProcHarness, res: FaultResult, *, dst_params: dict[str, Any] | None = None,
              src_timeout_ms: int = 30000, proxy: bool = False, exit_on_error: bool = True,
              ) -> tuple[LivemigProcess, LivemigProcess, tuple[int, int], LinkProxy | None]:  # fmt: skip
    """Source and destination in postcopy-active, the background push slow."""
    src = _source(h)
    dst, uri = _deferred_destination(h, "pc-mig.sock", {"postcopy-ram": True}, dst_params,
                                     exit_on_error)  # fmt: skip
    link = None
    if proxy:
        link = LinkProxy(h.path("pc-proxy.sock"), uri[5:])
        uri = link.uri
    src.wait_passes_increase(0, timeout=PC_WAIT)
    base = _baseline(src)
    h.migrate(src, uri, caps={"postcopy-ram": True, "return-path": True, "x-verify": True},
              params={"x-io-timeout": src_timeout_ms, "max-bandwidth": SLOW,
                      "max-postcopy-bandwidth": PC_BANDWIDTH})  # fmt: skip
    _wait_active(src, 256 << 10, timeout=PC_WAIT)
    src.cmd("migrate-start-postcopy")
    for p in (src, dst):
        info = p.wait_migration(PC_WAIT, frozenset({"postcopy-active", "failed", "completed"}))
        if info["status"] != "postcopy-active":
            raise ProcError(f"{p.name} did not reach postcopy-active: {info}")
    _both_sides(res, src, dst, "postcopy-active")
    return src, dst, base, link


def _pc_paused(res: FaultResult, p: LivemigProcess, label: str) -> dict[str, Any]:
    info = p.wait_migration(PC_WAIT, frozenset({"postcopy-paused", "failed", "completed",
                                                "cancelled"}))  # fmt: skip
    res.checks[f"{label} postcopy-paused"] = info["status"] == "postcopy-paused"
    res.checks[f"{label} says why"] = bool(info.get("error-desc"))
    res.detail += f"; {label}: {info.get('error-desc', info['status'])}"
    return info


def _pc_recover(h: ProcHarness, res: FaultResult, src: LivemigProcess, dst: LivemigProcess,
                base: tuple[int, int]) -> None:  # fmt: skip
    """migrate-recover + migrate resume:true, then the migration completes and verifies."""
    new = f"unix:{h.path('pc-recover.sock')}"
    dst.cmd("migrate-recover", uri=new)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 30})  # the push rate now
    src.cmd("migrate", uri=new, resume=True)
    s_info = src.wait_migration(60)
    d_info = dst.wait_migration(60, frozenset({"completed", "failed"}))
    res.checks["recovered and completed"] = (s_info["status"], d_info["status"]) == \
        ("completed", "completed")  # fmt: skip
    res.checks["verified"] = s_info.get("x-verified") is True and \
        d_info.get("x-verify", {}).get("equal") is True  # fmt: skip
    res.checks["recoveries counted"] = s_info.get("x-postcopy", {}).get("recoveries", 0) >= 1
    _both_sides(res, src, dst, "completed")
    res.checks["destination running"] = dst.status() == "running"
    res.checks["source postmigrate"] = src.status() == "postmigrate"
    report = dst.guest_check()
    res.checks["guest invariant on the destination"] = bool(report["ok"])
    res.guest_lost = not (report["ok"] and res.checks["recovered and completed"])
    res.checks["no fd/thread leak"] = _no_leak(src, base, res)


def _pc_cut_link(h: ProcHarness, res: FaultResult) -> None:
    src, dst, base, link = _pc_start(h, res, proxy=True)
    assert link is not None
    link.cut()
    _pc_paused(res, src, "source")
    _pc_paused(res, dst, "destination")
    _both_sides(res, src, dst, "postcopy-paused")
    _pc_recover(h, res, src, dst, base)


def _pc_stall_destination(h: ProcHarness, res: FaultResult) -> None:
    src, dst, base, _ = _pc_start(h, res, src_timeout_ms=IO_TIMEOUT_MS)
    stop_process(dst)
    t0 = time.monotonic()
    try:
        _pc_paused(res, src, "source")
        waited = time.monotonic() - t0
        res.checks["paused after x-io-timeout"] = waited >= IO_TIMEOUT_MS / 1000 * 0.9
        _both_sides(res, src, dst, "destination stopped")
    finally:
        dst.signal(signal.SIGCONT)
    _pc_paused(res, dst, "destination")
    _both_sides(res, src, dst, "postcopy-paused")
    _pc_recover(h, res, src, dst, base)


def _pc_stall_source(h: ProcHarness, res: FaultResult) -> None:
    # the destination's x-io-timeout decides: its guest waits for pages nobody sends
    src, dst, base, _ = _pc_start(h, res, dst_params={"x-io-timeout": IO_TIMEOUT_MS})
    stop_process(src)
    t0 = time.monotonic()
    try:
        _pc_paused(res, dst, "destination")
        res.checks["paused after x-io-timeout"] = \
            time.monotonic() - t0 >= IO_TIMEOUT_MS / 1000 * 0.9  # fmt: skip
        _both_sides(res, src, dst, "source stopped")
    finally:
        src.signal(signal.SIGCONT)
    _pc_paused(res, src, "source")
    _both_sides(res, src, dst, "postcopy-paused")
    _pc_recover(h, res, src, dst, base)


def _pc_kill_destination(h: ProcHarness, res: FaultResult) -> None:
    src, dst, _base, _ = _pc_start(h, res)
    dst.kill()
    # The running half of the guest (vCPUs, devices, every page sent) died with the
    # destination; the source holds only the pages not yet sent. QEMU's source waits in
    # postcopy-paused for a recovery that cannot come; restarting its stale copy would run a
    # guest that has already moved on elsewhere, so neither QEMU nor livemig does.
    res.expected_loss = True
    res.guest_lost = True
    _pc_paused(res, src, "source")
    time.sleep(2 * IO_TIMEOUT_MS / 1000)
    _both_sides(res, src, None, "destination killed")
    info = src.query_migrate()
    res.checks["source still postcopy-paused"] = info["status"] == "postcopy-paused"
    res.checks["source guest not restarted"] = src.status() == "finish-migrate"
    try:
        src.cmd("migrate_cancel")
        after = src.wait_migration(PC_WAIT, frozenset({"cancelled", "failed", "postcopy-paused"}))
        res.detail += f"; migrate_cancel: {after['status']}"
    except LivemigError as exc:
        res.detail += f"; migrate_cancel refused: {exc}"
    time.sleep(0.5)
    res.checks["source guest not restarted after cancel"] = src.status() != "running"


def _pc_kill_source(h: ProcHarness, res: FaultResult) -> None:
    # exit-on-error off: the failed destination stays up so its state can be queried; with
    # x-postcopy-auto-recover it gives up after 2 x-io-timeouts without a source
    src, dst, _base, _ = _pc_start(h, res, exit_on_error=False, dst_params={
        "x-io-timeout": IO_TIMEOUT_MS, "x-postcopy-auto-recover": 2})  # fmt: skip
    src.kill()
    res.source_alive = False
    info = _pc_paused(res, dst, "destination")
    missing = info.get("x-postcopy", {}).get("pages-missing", 0)
    res.checks["pages still missing"] = missing > 0
    # Given up after the recovery periods: the incoming migration fails and the incomplete
    # guest goes to internal-error (stopped, never run on zero-filled pages), which ends
    # ``livemig run`` with status 1.
    try:
        code = dst.wait_exit(PC_WAIT)
    except ProcError:
        code = None
        res.detail += f"; destination still {dst.query_migrate()['status']}"
    log = dst.log()
    res.checks["destination exit 1"] = code == 1
    res.checks["incomplete guest stopped"] = "guest failed" in log
    res.detail += f"; destination exit {code}: {log.strip().splitlines()[-1] if log else ''}"


_POSTCOPY_RUNNERS = {
    "cut-link": _pc_cut_link,
    "stall-destination": _pc_stall_destination,
    "stall-source": _pc_stall_source,
    "kill-destination": _pc_kill_destination,
    "kill-source": _pc_kill_source,
}


# -- the benchmark -----------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("faults", help="fault injection per phase and the incoming-stream fuzzer")
    p.add_argument("--fuzz-seconds", type=float, default=20.0,
                   help="how long to fuzz the destination (default 20)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", metavar="FAULT[:PHASE]", action="append", default=[],
                   help="run only these scenarios (e.g. disk-full, kill-source:precopy)")  # fmt: skip
    p.add_argument("--corruptions", type=int, default=1000, metavar="N",
                   help="random corruptions of each recorded stream kind (plain, mapped-ram, "
                   "multifd, xbzrle), checksums on and off, each load's RAM compared with the "
                   "source's (default 1000; 0: none, post-copy included)")  # fmt: skip
    p.add_argument("--postcopy-corruptions", type=int, default=None, metavar="M",
                   help="live post-copy migrations damaged in transit, checksums on and off "
                   "(about 1 s each; default N/10, at least 20 and at most N; 0: none)")  # fmt: skip
    p.add_argument("--no-faults", action="store_true", help="fuzz only")
    p.add_argument(
        "--exact-cycles",
        type=int,
        default=100,
        help="stop/cont cycles of the exact-resume soak (0: no soak; default 100)",
    )
    p.add_argument(
        "--exact-migrations",
        type=int,
        default=12,
        help="migrations of the exact-resume soak (default 12: one of each kind)",
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=main)


def _selected(only: list[str]) -> list[tuple[str, str]]:
    if not only:
        return list(SCENARIOS)
    out = []
    for fault, phase in SCENARIOS:
        for o in only:
            f, _, ph = o.partition(":")
            if f == fault and (not ph or ph == phase):
                out.append((fault, phase))
    return out


def main(args: argparse.Namespace) -> int:
    from livemig.testing.fuzz import default_corpus, run_fuzz

    results: list[FaultResult] = []
    if not args.no_faults:
        for fault, phase in _selected(args.only):
            with ProcHarness(memory="32M", smp=1) as h:
                r = run_fault(fault, phase, h)
            results.append(r)
            state = "skipped" if r.skipped else ("survived" if r.survived else "FAILED")
            failed = [k for k, v in r.checks.items() if not v]
            why = f" [failed: {', '.join(failed)}]" if failed else ""
            print(f"  {fault:18} {phase:10} {state:8} {r.seconds:5.1f} s  "
                  f"{r.skipped or r.detail}{why}", flush=True)  # fmt: skip
    fuzz = None
    if args.fuzz_seconds > 0:
        with tempfile.TemporaryDirectory(prefix="livemig-fuzz-") as d:
            fuzz = run_fuzz(default_corpus(d), seconds=args.fuzz_seconds, seed=args.seed)
    corruptions = _corruptions(args.corruptions, args.seed, args.postcopy_corruptions) \
        if args.corruptions > 0 else None  # fmt: skip
    figures = _figures(results, fuzz, corruptions)
    if args.exact_cycles or args.exact_migrations:
        from livemig.bench.exact import run_soaks

        _soaks, figures["exact-resume"] = run_soaks(args.exact_cycles, args.exact_migrations, [2])
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        _table(figures)
    bad = figures["guests-lost"] or any(not r.survived and not r.skipped for r in results)
    bad = bad or (fuzz is not None and not fuzz.clean)
    bad = bad or any(t["on"]["wrong"] or t["on"]["crashes"] or t["on"]["hangs"] or
                     t["off"]["crashes"] or t["off"]["hangs"]
                     for t in figures.get("corruptions", {}).values())  # fmt: skip
    exact = figures.get("exact-resume")
    bad = bad or bool(exact and (exact["diverged"] or exact["problems"]))
    return 1 if bad else 0


def _corruptions(count: int, seed: int, postcopy: int | None = None) -> dict[str, Any]:
    from livemig.testing.integrity import run_corruptions

    def progress(kind: str, checksums: bool, t: Any) -> None:
        live = f", {t.recovered} paused and recovered, {t.stopped} stopped" \
            if kind == "postcopy" else ""  # fmt: skip
        print(f"  corruptions {kind:10} checksums {'on ' if checksums else 'off'} {t.inputs} "
              f"inputs: {t.refused} refused, {t.identical} loaded identical{live}, {t.wrong} "
              f"loaded WRONG", file=sys.stderr, flush=True)  # fmt: skip

    tallies = run_corruptions(count, seed=seed, progress=progress, postcopy=postcopy)
    return {kind: {k: asdict(t) for k, t in by.items()} for kind, by in tallies.items()}


def _figures(results: list[FaultResult], fuzz: Any,
             corruptions: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    phases: dict[str, dict[str, int]] = {}
    for r in results:
        p = phases.setdefault(r.phase, {"injected": 0, "survived": 0, "skipped": 0})
        if r.skipped:
            p["skipped"] += 1
        else:
            p["injected"] += 1
            p["survived"] += int(r.survived)
    out: dict[str, Any] = {
        "phases": phases,
        "guests-lost": sum(
            1 for r in results if r.source_alive and r.guest_lost and not r.expected_loss
        ),
        "guests-lost-expected": sum(1 for r in results if r.expected_loss),
        "scenarios": [asdict(r) for r in results],
    }
    if fuzz is not None:
        out["fuzz"] = {
            "inputs": fuzz.inputs, "completed": fuzz.completed, "rejected": fuzz.rejected,
            "crashes": fuzz.crashes, "hangs": fuzz.hangs, "oversized-allocations":
            fuzz.big_allocs, "seconds": round(fuzz.seconds, 1), "per-corpus": fuzz.per_corpus,
            "max-peak-alloc": fuzz.max_peak_alloc, "guard-pages": fuzz.guard_pages,
            "wrong-ram": fuzz.wrong_ram, "findings": [asdict(f) for f in fuzz.findings],
        }  # fmt: skip
    if corruptions is not None:
        out["corruptions"] = corruptions
    return out


def _table(f: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title="livemig bench faults")
    for col in ("phase", "injected", "survived", "skipped"):
        t.add_column(col, justify="right" if col != "phase" else "left")
    for phase, p in f["phases"].items():
        t.add_row(phase, str(p["injected"]), str(p["survived"]), str(p["skipped"]))
    console = table_console()
    console.print(t)
    console.print(f"guests lost (source alive): {f['guests-lost']}")
    if f.get("guests-lost-expected"):
        console.print(f"guests lost by design (post-copy, destination killed: its half of the "
                      f"guest died with it): {f['guests-lost-expected']}")  # fmt: skip
    x = f.get("exact-resume")
    if x:
        console.print(f"exact resume (compute guest vs its reference): {x['cycles']} stop/cont "
                      f"cycles, {x['migrations']} migrations, {x['checks']} checks, "
                      f"diverged {x['diverged']}")  # fmt: skip
        for p in x["problems"]:
            console.print(f"exact-resume problem: {p}")
    z = f.get("fuzz")
    if z:
        ft = Table(title="incoming-stream fuzzer")
        for col in ("inputs", "completed", "rejected", "crashes", "hangs", "oversized allocs",
                    "wrong RAM", "seconds"):  # fmt: skip
            ft.add_column(col, justify="right")
        ft.add_row(*(str(z[k]) for k in ("inputs", "completed", "rejected", "crashes", "hangs",
                                         "oversized-allocations", "wrong-ram", "seconds")))  # fmt: skip
        console.print(ft)
        for finding in z["findings"][:5]:
            console.print(f"finding: {finding}")
    c = f.get("corruptions")
    if c:
        ct = Table(title="random corruptions: every load's RAM compared with the source's")
        for col in ("stream", "checksums", "inputs", "refused", "loaded identical",
                    "loaded WRONG", "hangs", "crashes"):  # fmt: skip
            ct.add_column(col, justify="left" if col in ("stream", "checksums") else "right")
        for kind, by in c.items():
            if kind == "postcopy":
                continue
            for on in ("on", "off"):
                t = by[on]
                ct.add_row(kind, on, *(str(t[k]) for k in ("inputs", "refused", "identical",
                                                            "wrong", "hangs", "crashes")))  # fmt: skip
        console.print(ct)
    pc = (c or {}).get("postcopy")
    if pc:
        pt = Table(title="live post-copy migrations damaged in transit (destination RAM at the "
                   "end compared with the source's)")  # fmt: skip
        cols = (("checksums", ""), ("inputs", "inputs"), ("refused before switch-over", "refused"),
                ("completed identical", "identical"),
                ("paused, recovered identical", "recovered"),
                ("stopped (guest lost, never ran)", "stopped"), ("completed WRONG", "wrong"),
                ("hangs", "hangs"), ("crashes", "crashes"))  # fmt: skip
        for col, _ in cols:
            pt.add_column(col, justify="left" if col == "checksums" else "right")
        for on in ("on", "off"):
            t = pc[on]
            pt.add_row(on, *(str(t[k]) for _, k in cols[1:]))
        console.print(pt)
        for on in ("on", "off"):
            for e in pc[on]["examples"][:3]:
                console.print(f"post-copy, checksums {on}: {e}")
