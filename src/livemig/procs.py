"""Starting ``livemig run`` processes and talking QMP to them: the demo's and benches' harness.

A ``LivemigProcess`` is one ``livemig run`` child with its QMP socket and serial console in a
working directory; ``source`` and ``destination`` build the two sides of a migration. Every
wait is bounded, and ``stop`` always ends the child (quit, then SIGTERM, then SIGKILL), so a
failed demo or benchmark never leaves a machine behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from livemig.errors import LivemigError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LivemigProcess:
    """One ``livemig run`` child process."""

    def __init__(self, name: str, workdir: Path, args: list[str],
                 prefix: list[str] | None = None) -> None:  # fmt: skip
        self.name = name
        self.workdir = Path(workdir)
        self.qmp_path = self.workdir / f"{name}.qmp"
        self.serial_path = self.workdir / f"{name}.serial"
        self.log_path = self.workdir / f"{name}.log"
        self.serial_path.write_bytes(b"")
        cmd = [*(prefix or []), sys.executable, "-m", "livemig", "run", *args,
               "--qmp", f"unix:{self.qmp_path}", "--serial", f"file:{self.serial_path}"]  # fmt: skip
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)  # fmt: skip
        self._qmp: Any = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the QMP socket answers (guest builds and RAM set-up happen before it)."""
        from livemig.qmp.client import QMPConnection

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LivemigError(f"{self.name} exited with status {self.proc.returncode}: "
                                   f"{self.log_tail()}")  # fmt: skip
            if self.qmp_path.exists():
                try:
                    self._qmp = QMPConnection(f"unix:{self.qmp_path}", timeout=30).connect()
                    return
                except LivemigError:
                    pass
            time.sleep(0.05)
        raise LivemigError(f"{self.name}: QMP not ready within {timeout:g} s")

    def qmp(self, command: str, **args: Any) -> Any:
        if self._qmp is None:
            self.wait_ready()
        return self._qmp.command(command, **args)

    def log_tail(self, n: int = 5) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-n:])

    def serial_lines(self) -> list[str]:
        return self.serial_path.read_text(errors="replace").splitlines()

    def stop(self, timeout: float = 5.0) -> int | None:
        """End the process whatever state it is in; returns its exit status."""
        if self.proc.poll() is None and self._qmp is not None:
            try:
                self._qmp.command("quit")
            except LivemigError:
                pass
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and self.proc.poll() is None:
                os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        if self._qmp is not None:
            try:
                self._qmp.close()
            except Exception:  # the peer is gone; nothing to release beyond the socket
                pass
            self._qmp = None
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> LivemigProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def source(
    workdir: Path,
    *,
    guest: str,
    memory: str,
    smp: int,
    append: str = "",
    extra: list[str] | None = None,
    prefix: list[str] | None = None,
) -> LivemigProcess:
    args = ["--guest", guest, "--memory", memory, "--smp", str(smp), *(extra or [])]
    if append:
        args += ["--append", append]
    return LivemigProcess("source", workdir, args, prefix)


def destination(workdir: Path, *, memory: str, smp: int, incoming: str,
                extra: list[str] | None = None, prefix: list[str] | None = None
                ) -> LivemigProcess:  # fmt: skip
    args = ["--memory", memory, "--smp", str(smp), "--incoming", incoming, *(extra or [])]
    return LivemigProcess("destination", workdir, args, prefix)
