"""Shared machinery of the migration benchmarks: processes, QMP-driven migrations, figures.

Both sides of a benchmark speak QMP, livemig and QEMU alike, so one driver
(``drive_migration``) measures both the same way, as ../shared/design/qemu-baseline.md
describes: ``migrate-incoming`` on a destination started with ``-incoming defer``, ``migrate``
on the source, ``query-migrate`` polled every 50 ms, the end-to-end blackout taken from the
source's STOP event to the destination's RESUME event (both carry the host's wall clock), and
each process's peak RSS (``VmHWM``) read from /proc before it exits.

``GuestProcess`` wraps one such process: its console lines are time-stamped by the host as they
arrive (the guest clock stops while a guest is stopped, so only host times mean anything
across a migration). ``loopback_tcp_throughput`` is the raw-socket baseline the throughput
figure is a ratio to.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from livemig.errors import LivemigError, MigrationError

POLL_INTERVAL = 0.05  # query-migrate every 50 ms, as the QEMU baseline was measured
FINAL_STATES = ("completed", "failed", "cancelled")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used, with its children that ended (``ip netns
    exec`` execs it); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_migration_end(query: Callable[[], dict[str, Any]], timeout: float, what: str,
                       interval: float = 0.02) -> dict[str, Any]:  # fmt: skip
    """Poll ``query()`` (a ``query-migrate``) until completed, failed or cancelled; its last
    reply. ``MigrationError`` naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        q = query()
        if q.get("status") in FINAL_STATES:
            return q
        if time.monotonic() > deadline:
            raise MigrationError(f"{what} did not end in {timeout:g} s")
        time.sleep(interval)


def peak_rss(pid: int) -> int | None:
    """Peak resident set (``VmHWM``, anonymous + file + shmem) of ``pid`` in bytes."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


class GuestProcess:
    """One VM process (livemig or QEMU) with a QMP socket and a time-stamped console.

    ``console`` is either ``"stdout"`` (the process writes its console to stdout, as ``livemig
    run --serial stdio`` does) or a path to a unix socket the process serves its serial port on
    (QEMU's ``-chardev socket,server=on``), which this object connects to.
    """

    def __init__(
        self,
        argv: Sequence[str],
        qmp_path: str,
        *,
        console: str = "stdout",
        name: str = "vm",
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.qmp_path = qmp_path
        self.qmp_uri = f"unix:{qmp_path}"
        self.lines: list[tuple[float, str]] = []  # (time.monotonic(), line)
        self._lines_lock = threading.Lock()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if console == "stdout" else subprocess.DEVNULL,
            stderr=self._stderr,
            env=env,
            start_new_session=True,  # a Ctrl-C of the benchmark is ours to forward
        )
        self._console = console
        self._reader: threading.Thread | None = None
        if console == "stdout":
            assert self.proc.stdout is not None
            self._start_reader(self.proc.stdout)
        self.peak_rss: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _start_reader(self, stream: Any) -> None:
        def read() -> None:
            buf = b""
            while True:
                chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.recv(65536)
                if not chunk:
                    break
                now = time.monotonic()
                buf += chunk
                *whole, buf = buf.split(b"\n")
                with self._lines_lock:
                    self.lines += [(now, ln.decode(errors="replace").rstrip("\r")) for ln in whole]

        self._reader = threading.Thread(target=read, name=f"{self.name} console", daemon=True)
        self._reader.start()

    def connect_console(self, timeout: float = 10.0) -> None:
        """Attach to a unix-socket serial port (QEMU's ``-chardev socket``)."""
        path = self._console
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(path)
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise MigrationError(f"{self.name}: no serial socket at {path}") from None
                time.sleep(0.05)
        self._start_reader(sock)

    def console_lines(self, since: float = 0.0) -> list[tuple[float, str]]:
        with self._lines_lock:
            return [(t, ln) for t, ln in self.lines if t >= since]

    def wait_line(self, pred: Callable[[str], bool], timeout: float, since: float = 0.0) -> float:
        """Wait until a console line satisfies ``pred``; return its host time."""
        deadline = time.monotonic() + timeout
        while True:
            for t, ln in self.console_lines(since):
                if pred(ln):
                    return t
            self.check_alive()
            if time.monotonic() > deadline:
                tail = "\n".join(ln for _, ln in self.console_lines()[-5:])
                raise MigrationError(f"{self.name}: expected console line not seen in "
                                     f"{timeout} s; last lines:\n{tail}")  # fmt: skip
            time.sleep(0.05)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise MigrationError(
                f"{self.name} (pid {self.pid}) exited with status {self.proc.returncode}: "
                f"{self.stderr_tail()}"
            )

    def stderr_tail(self, n: int = 800) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-n:].strip()

    def wait_qmp(self, timeout: float) -> None:
        """Wait until the QMP socket accepts connections."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.qmp_path):
            self.check_alive()
            if time.monotonic() > deadline:
                raise MigrationError(f"{self.name}: no QMP socket at {self.qmp_path} "
                                     f"after {timeout} s: {self.stderr_tail()}")  # fmt: skip
            time.sleep(0.05)

    def qmp(self, timeout: float = 30.0) -> Any:
        from livemig.qmp.client import QMPConnection

        return QMPConnection(self.qmp_uri, timeout=timeout).connect()

    def stop(self, timeout: float = 10.0) -> None:
        """Record the peak RSS, then end the process (QMP quit, then SIGTERM, then SIGKILL)."""
        if self.proc.poll() is None:
            self.peak_rss = peak_rss(self.pid)
            try:
                with self.qmp(timeout=2.0) as q:
                    q.command("quit")
            except LivemigError:
                pass
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    self.proc.wait(timeout=timeout)
                    break
                except subprocess.TimeoutExpired:
                    self.proc.send_signal(sig)
            else:
                self.proc.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(timeout=2.0)
        self._stderr.close()


@dataclass
class MigrationFigures:
    """What one migration measured, for livemig or QEMU alike (times in ms, sizes in bytes)."""

    status: str
    vm: str = "livemig"  # or the QEMU that ran: "QEMU 10.0.2"
    total_ms: float | None = None
    downtime_ms: float | None = None
    setup_ms: float | None = None
    blackout_ms: float | None = None  # source STOP event -> destination RESUME event
    transferred: int = 0
    passes: int = 0
    mbps: float | None = None
    throughput: float | None = None  # bytes/s over a pre-copy window, when measured
    src_rss: int | None = None
    dst_rss: int | None = None
    guest_ram: int = 0
    ok: bool = False  # guest integrity after the migration
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _event_time(ev: dict[str, Any]) -> float:
    ts = ev.get("timestamp") or {}
    return float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6


def set_migration(q: Any, caps: dict[str, bool] | None, params: dict[str, Any] | None) -> None:
    """``migrate-set-capabilities`` and ``migrate-set-parameters`` on one side, each if given."""
    if caps:
        q.command("migrate-set-capabilities", capabilities=[
            {"capability": k, "state": v} for k, v in caps.items()])  # fmt: skip
    if params:
        q.command("migrate-set-parameters", **params)


def placement(smp: int) -> tuple[list[set[int]], set[int]] | None:
    """CPUs for ``smp`` vCPUs (one each) and for the migration threads (the rest), or None
    when this machine has no CPU left over once every vCPU has its own."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) <= smp:
        return None
    return [{c} for c in cpus[:smp]], set(cpus[smp:])


def pin_threads(
    q: Any, vcpus: list[set[int]] | None, migration: set[int], pid: int | None = None
) -> int:
    """Pin a VM's threads the way libvirt's ``vcpupin`` and ``emulatorpin`` do, by the thread
    ids QMP reports: vCPU i to ``vcpus[i]`` (``query-cpus-fast``; skipped when None), and the
    migration threads to ``migration`` (``query-migrationthreads``), or with ``pid`` every
    thread of that process that is not a vCPU (``emulatorpin``: a destination, whose loading
    QEMU 10.0 does in its main thread and lists no migration thread for). The threads pinned."""
    pinned = 0
    cpus = q.command("query-cpus-fast")
    if vcpus is not None:
        for cpu in cpus:
            os.sched_setaffinity(int(cpu["thread-id"]), vcpus[int(cpu["cpu-index"])])
            pinned += 1
    if pid is not None:
        vcpu_tids = {int(c["thread-id"]) for c in cpus}
        for tid in (int(t) for t in os.listdir(f"/proc/{pid}/task")):
            if tid not in vcpu_tids:
                try:
                    os.sched_setaffinity(tid, migration)
                    pinned += 1
                except ProcessLookupError:
                    pass  # ended meanwhile
        return pinned
    for t in q.command("query-migrationthreads"):
        try:
            os.sched_setaffinity(int(t["thread-id"]), migration)
            pinned += 1
        except ProcessLookupError:
            pass  # ended meanwhile
    return pinned


def drive_migration(
    src: GuestProcess,
    dst: GuestProcess,
    *,
    port: int,
    caps: dict[str, bool] | None = None,
    params: dict[str, Any] | None = None,
    timeout: float = 120.0,
    window: Callable[[float, dict[str, Any]], bool] | None = None,
    pin: tuple[list[set[int]], set[int]] | None = None,
    host: str = "127.0.0.1",
) -> tuple[MigrationFigures, list[tuple[float, dict[str, Any]]]]:
    """Migrate ``src`` to ``dst`` over tcp:``host``:``port`` (the destination's address) and
    measure it.

    ``window(t, info)`` is called on every poll during the migration with the host time and the
    ``query-migrate`` reply; when it returns True the migration is cancelled (a measurement of
    pre-copy that need not converge). ``pin`` (from ``placement``): both sides' migration
    threads go to its migration CPUs once they exist (the caller pins the vCPUs, for the VM's
    lifetime). Returns the figures and every polled reply with its time.
    """
    uri = f"tcp:{host}:{port}"
    samples: list[tuple[float, dict[str, Any]]] = []
    with src.qmp() as sq, dst.qmp() as dq:
        dq.command("migrate-incoming", uri=uri)
        pinned = pin_threads(dq, None, pin[1], pid=dst.pid) if pin is not None else 0
        set_migration(sq, caps, params)
        sq.events()  # only events of this migration from here on
        dq.events()
        t0 = time.monotonic()
        sq.command("migrate", uri=uri)
        if pin is not None:
            pinned += pin_threads(sq, None, pin[1])  # the vCPUs: the caller's
        info: dict[str, Any] = {}
        cancelled = False
        while True:
            now = time.monotonic()
            info = sq.command("query-migrate")
            samples.append((now, info))
            status = info.get("status", "")
            if status in FINAL_STATES:
                break
            if not cancelled and window is not None and window(now, info):
                sq.command("migrate_cancel")
                cancelled = True
            if now - t0 > timeout and not cancelled:
                sq.command("migrate_cancel")
                cancelled = True
            if now - t0 > timeout + 30:
                raise MigrationError(f"migration stuck in {status!r} after {timeout + 30:.0f} s")
            time.sleep(POLL_INTERVAL)
        ram = info.get("ram", {})
        fig = MigrationFigures(
            status=info.get("status", "?"),
            total_ms=info.get("total-time"),
            downtime_ms=info.get("downtime"),
            setup_ms=info.get("setup-time"),
            transferred=int(ram.get("transferred", 0)),
            passes=int(ram.get("dirty-sync-count", 0)),
            mbps=ram.get("mbps"),
        )
        if pin is not None:
            fig.extra["pinned-migration-threads"] = pinned
        if fig.status == "completed":
            stop = _wait_event(sq, "STOP", 5.0)
            resume = _wait_event(dq, "RESUME", 10.0)
            if stop is not None and resume is not None:
                fig.blackout_ms = (_event_time(resume) - _event_time(stop)) * 1e3
            else:
                fig.notes.append("STOP/RESUME event missing: no blackout figure")
    return fig, samples


def _wait_event(q: Any, name: str, timeout: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    seen: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        seen += q.events()
        for ev in seen:
            if ev.get("event") == name:
                return ev
        try:
            q.command("query-status")  # a round trip lets pending events arrive
        except LivemigError:
            return None
        time.sleep(0.02)
    return None


def window_throughput(
    samples: list[tuple[float, dict[str, Any]]], skip_s: float = 0.5
) -> float | None:
    """Bytes/s sent during active pre-copy, skipping the first ``skip_s`` (setup, warm-up)."""
    active = [(t, i) for t, i in samples if i.get("status") == "active"]
    if len(active) < 2:
        return None
    start = active[0][0] + skip_s
    win = [(t, i) for t, i in active if t >= start] or active
    if len(win) < 2:
        return None
    (ta, a), (tb, b) = win[0], win[-1]
    if tb <= ta:
        return None
    return (b["ram"]["transferred"] - a["ram"]["transferred"]) / (tb - ta)


def loopback_tcp_throughput(total: int, chunk: int = 1 << 20) -> float:
    """Raw Python loopback TCP: bytes/s of one stream, ``sendall`` of ``chunk``-byte buffers.

    The receiver runs in its own process (as the destination does), reading into a reused
    buffer with ``recv_into``.
    """
    code = (
        "import socket,sys\n"
        "s=socket.create_connection(('127.0.0.1',int(sys.argv[1])))\n"
        "b=bytearray(1<<20);v=memoryview(b);n=0\n"
        "while True:\n"
        "    k=s.recv_into(v)\n"
        "    if not k: break\n"
        "    n+=k\n"
        "print(n)\n"
    )
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        port = lsock.getsockname()[1]
        rx = subprocess.Popen([sys.executable, "-c", code, str(port)], stdout=subprocess.PIPE)
        lsock.settimeout(10)
        conn, _ = lsock.accept()
        buf = memoryview(bytearray(os.urandom(chunk)))
        t0 = time.perf_counter()
        sent = 0
        with conn:
            while sent < total:
                conn.sendall(buf)
                sent += chunk
            conn.shutdown(socket.SHUT_WR)
            out, _ = rx.communicate(timeout=60)
        elapsed = time.perf_counter() - t0
    if int(out or 0) != sent:
        raise MigrationError(f"loopback baseline: receiver got {out!r} of {sent} bytes")
    return sent / elapsed


def summarize(values: Sequence[float | None]) -> dict[str, float | None]:
    """Median, min and max of the values that are not None."""
    xs = [v for v in values if v is not None]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


class Workdir:
    """A temporary directory for sockets and logs (short path: unix sockets are limited)."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="lmbench-", dir="/tmp"))

    def sock(self, name: str) -> str:
        return str(self.path / f"{name}.sock")

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Workdir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def table_console(stderr: bool = False) -> Any:
    """A rich console for a benchmark's tables: the terminal's width on a terminal, 200
    columns otherwise, so that a table piped to a file or pasted in a README keeps its columns
    instead of being squeezed to rich's default 80 (cells cut to "channe…")."""
    from rich.console import Console

    probe = Console(stderr=stderr)
    return probe if probe.is_terminal else Console(stderr=stderr, width=200)
