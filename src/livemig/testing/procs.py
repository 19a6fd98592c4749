"""A harness for end-to-end tests with real, separate ``livemig run`` processes.

``ProcHarness`` (a context manager) starts source and destination processes in a temporary
directory, each with a QMP unix socket there, and drives them with
``livemig.qmp.client.QMPConnection``. Every wait is bounded; at teardown every process it
started is killed (SIGKILL by pid, never by name) and reaped, and its QMP connection closed.

    with ProcHarness() as h:
        src = h.source(append="ws=16M rate=20000")
        dst = h.destination(incoming=f"unix:{h.path('mig.sock')}")
        h.migrate(src, dst.incoming, caps={"events": True})
        info = h.wait_migration(src)        # the final query-migrate
        report = dst.guest_check()          # stop, x-guest-check, cont

A process can run inside a network namespace (``netns="A"``: ``ip netns exec A ...``); QMP
stays on a pathname unix socket, which works across network namespaces.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from livemig.errors import LivemigError
from livemig.qmp.client import QMPClientError, QMPConnection

FINAL_STATES = frozenset({"completed", "failed", "cancelled"})
START_TIMEOUT = 30.0  # the first start may compile the guest


class ProcError(LivemigError):
    """A harness process did not start, answer or end as expected (the message has its log)."""


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (the usual bind-to-0 trick)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll ``predicate`` until it returns something truthy; ProcError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise ProcError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class LivemigProcess:
    """One ``livemig run`` process with its QMP socket and log files."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        workdir: Path,
        qmp_path: Path,
        incoming: str | None = None,
        netns: str | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.workdir = workdir
        self.qmp_path = qmp_path
        self.qmp_uri = f"unix:{qmp_path}"
        self.incoming = incoming
        self.netns = netns
        self.stdout_path = workdir / f"{name}.out"
        self.stderr_path = workdir / f"{name}.err"
        self.proc: subprocess.Popen[bytes] | None = None
        self._qmp: QMPConnection | None = None
        self.events: list[dict[str, Any]] = []

    # -- life cycle ----------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT, wait_qmp: bool = True) -> LivemigProcess:
        """Spawn the process and (``wait_qmp``) wait until its QMP socket answers."""
        cmd = [sys.executable, "-m", "livemig", *self.argv]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=self.workdir
            )
        if not wait_qmp:
            return self  # e.g. a destination expected to fail and exit at once
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ProcError(f"{self.name} exited with {self.proc.returncode} at start: "
                                f"{self.log()}")  # fmt: skip
            if self.qmp_path.exists():
                try:
                    self._qmp = QMPConnection(self.qmp_uri, timeout=10.0).connect()
                    return self
                except QMPClientError:
                    pass
            if time.monotonic() >= deadline:
                raise ProcError(f"{self.name}: no QMP at {self.qmp_path} after {timeout:g} s: "
                                f"{self.log()}")  # fmt: skip
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ProcError(f"{self.name} was not started")
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float = 15.0) -> int:
        """The exit status, waiting at most ``timeout`` s."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise ProcError(f"{self.name} still running after {timeout:g} s") from exc

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL and reap (idempotent); close the QMP connection first."""
        self.close_qmp()
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                # A stopped (SIGSTOP) process still dies of SIGKILL.
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def log(self) -> str:
        """The process's stderr so far (for failure messages)."""
        try:
            return self.stderr_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # -- QMP -----------------------------------------------------------------------------------

    @property
    def qmp(self) -> QMPConnection:
        if self._qmp is None:
            raise ProcError(f"{self.name} has no QMP connection")
        return self._qmp

    def close_qmp(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None

    def cmd(self, name: str, **arguments: Any) -> Any:
        """Execute a QMP command (use ``**{"a-b": 1}`` for dashed argument names)."""
        return self.qmp.command(name, **arguments)

    def pull_events(self) -> list[dict[str, Any]]:
        """Events received so far are appended to ``self.events``; returns the new ones."""
        self.qmp.command("query-status")  # lets the client read what the server sent
        new = self.qmp.events()
        self.events.extend(new)
        return new

    def event_names(self, name: str | None = None) -> list[Any]:
        """``(event, data)`` of every event collected so far (only ``name`` if given)."""
        self.pull_events()
        return [(e["event"], e.get("data")) for e in self.events
                if name is None or e["event"] == name]  # fmt: skip

    def status(self) -> str:
        return str(self.cmd("query-status")["status"])

    def wait_status(self, status: str | Sequence[str], timeout: float = 15.0) -> str:
        wanted = {status} if isinstance(status, str) else set(status)
        return wait_until(lambda: (s := self.status()) in wanted and s,
                          timeout, f"{self.name} run state in {sorted(wanted)}")  # fmt: skip

    def query_migrate(self) -> dict[str, Any]:
        return dict(self.cmd("query-migrate"))

    def wait_migration(
        self, timeout: float = 60.0, states: frozenset[str] = FINAL_STATES
    ) -> dict[str, Any]:
        """Poll query-migrate until its status is one of ``states``; the last reply."""
        last: dict[str, Any] = {}

        def done() -> bool:
            nonlocal last
            last = self.query_migrate()
            return last.get("status") in states

        try:
            wait_until(done, timeout, f"{self.name} migration in {sorted(states)}", 0.05)
        except ProcError as exc:
            raise ProcError(f"{exc}; last query-migrate: {last}; log: {self.log()}") from exc
        return last

    def guest_check(self) -> dict[str, Any]:
        """``stop``, ``x-guest-check``, then ``cont`` if the guest was running."""
        was = self.status()
        if was == "running":
            self.cmd("stop")
        try:
            return dict(self.cmd("x-guest-check"))
        finally:
            if was == "running":
                self.cmd("cont")

    def wait_passes_increase(self, than: int, timeout: float = 15.0) -> dict[str, Any]:
        """Guest checks until memstress's total passes exceed ``than`` and every vCPU has filled
        its slice of the working set; the last report.

        (Total passes alone let a test go on while one vCPU, slow on a loaded host, was still
        filling: a snapshot test then found 3 of the 4 MiB it expected.)
        """
        report: dict[str, Any] = {}

        def more() -> bool:
            nonlocal report
            report = self.guest_check()
            return report["total-passes"] > than and not report.get("filling", False)

        wait_until(more, timeout, f"{self.name} guest passes > {than}", 0.1)
        return report

    # -- resources -----------------------------------------------------------------------------

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def thread_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def read_ram(self, size: int) -> bytes:
        """The guest's RAM as this process holds it, read from outside (``/proc/PID/mem``,
        root): the one shared mapping of ``size`` bytes of a RAM block's memfd (or anonymous,
        where memfd_create was refused; ``livemig.machine.ram``). Read it while the guest is
        stopped."""
        found = []
        with open(f"/proc/{self.pid}/maps") as maps:
            for line in maps:
                fields = line.split()
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if hi - lo == size and fields[1] == "rw-s" and \
                        ("/memfd:livemig:" in line or "/dev/zero" in line):  # fmt: skip
                    found.append(lo)
        if len(found) != 1:
            raise ProcError(f"{self.name}: {len(found)} shared mappings of {size} bytes")
        with open(f"/proc/{self.pid}/mem", "rb") as mem:
            mem.seek(found[0])
            return mem.read(size)


class ProcHarness:
    """Source and destination processes in one temporary directory, all killed at the end."""

    def __init__(self, workdir: str | Path | None = None, memory: str = "64M", smp: int = 2):
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="livemig-e2e-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.memory = memory
        self.smp = smp
        self.procs: list[LivemigProcess] = []
        self._n = 0

    def path(self, name: str) -> str:
        return str(self.workdir / name)

    def _spawn(
        self,
        role: str,
        argv: list[str],
        incoming: str | None,
        netns: str | None,
        wait_qmp: bool = True,
    ) -> LivemigProcess:
        self._n += 1
        name = f"{role}{self._n}"
        qmp_path = self.workdir / f"{name}.qmp"
        full = ["run", "--qmp", f"unix:{qmp_path}", "--serial", "null", *argv]
        proc = LivemigProcess(name, full, self.workdir, qmp_path, incoming, netns)
        self.procs.append(proc)
        return proc.start(wait_qmp=wait_qmp)

    def source(
        self,
        guest: str = "memstress",
        append: str = "ws=16M rate=20000",
        memory: str | None = None,
        smp: int | None = None,
        extra: Sequence[str] = (),
        netns: str | None = None,
    ) -> LivemigProcess:
        """A running guest, its QMP connected."""
        argv = ["--guest", guest, "--memory", memory or self.memory,
                "--smp", str(smp or self.smp), *extra]  # fmt: skip
        if append:
            argv += ["--append", append]
        proc = self._spawn("src", argv, None, netns)
        if not {"-S", "--paused"} & set(extra):
            # QMP answers before ``livemig run`` starts the vCPUs: a guest check in prelaunch
            # sends no stop and then finds the guest running
            wait_until(lambda: proc.status() != "prelaunch", START_TIMEOUT,
                       f"{proc.name} guest started")  # fmt: skip
        return proc

    def destination(
        self,
        incoming: str | None = None,
        memory: str | None = None,
        smp: int | None = None,
        extra: Sequence[str] = (),
        netns: str | None = None,
        wait_qmp: bool = True,
    ) -> LivemigProcess:
        """A process waiting for an incoming migration (default: a fresh unix socket)."""
        if incoming is None:
            incoming = f"unix:{self.workdir / f'mig{self._n + 1}.sock'}"
        argv = ["--incoming", incoming, "--memory", memory or self.memory,
                "--smp", str(smp or self.smp), *extra]  # fmt: skip
        proc = self._spawn("dst", argv, incoming, netns, wait_qmp)
        if incoming.startswith("unix:") and wait_qmp:
            # the listener exists once the socket file does
            wait_until(lambda: Path(incoming[5:]).exists(), 10, f"{incoming} listening")
        return proc

    def front(
        self, backend: str, serve: str, extra: Sequence[str] = (), netns: str | None = None
    ) -> LivemigProcess:
        """A ``livemig front`` for the guest served at ``backend`` (QMP: ``x-query-front``)."""
        self._n += 1
        name = f"front{self._n}"
        qmp_path = self.workdir / f"{name}.qmp"
        argv = ["front", "--serve", serve, "--backend", backend, "--qmp", f"unix:{qmp_path}",
                *extra]  # fmt: skip
        proc = LivemigProcess(name, argv, self.workdir, qmp_path, None, netns)
        self.procs.append(proc)
        return proc.start()

    def migrate(
        self,
        src: LivemigProcess,
        uri: str | None,
        caps: dict[str, bool] | None = None,
        params: dict[str, Any] | None = None,
    ) -> None:
        """Set capabilities and parameters on ``src``, then QMP ``migrate`` to ``uri``."""
        if uri is None:
            raise ProcError("migrate: no destination URI")
        if caps:
            src.cmd("migrate-set-capabilities", capabilities=[
                {"capability": k, "state": v} for k, v in caps.items()])  # fmt: skip
        if params:
            src.cmd("migrate-set-parameters", **params)
        src.cmd("migrate", uri=uri)

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> ProcHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
