"""``livemig run`` as a user runs it: a subprocess, its console on stdout, QMP via qemu.qmp."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from livemig.cli import main


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "livemig", "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


async def _wait_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        # the socket file appears at bind(), a moment before listen(): wait for a connect
        if path.exists():
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(str(path))
                    return
                except ConnectionRefusedError:
                    pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no QMP socket: {proc.stderr.read() if proc.stderr else ''!r}")
        await asyncio.sleep(0.05)


def test_run_memstress_stop_cont_quit_over_qmp() -> None:
    sockdir = Path(tempfile.mkdtemp(prefix="lmrun", dir="/tmp"))  # short path for AF_UNIX
    sock = sockdir / "qmp.sock"
    proc = _spawn("--guest", "memstress", "--memory", "32M", "--smp", "2",
                  "--append", "ws=4M mark_ms=20", "--qmp", f"unix:{sock}")  # fmt: skip

    async def drive() -> list[str]:
        await _wait_socket(sock, proc, 60)
        qmp = QMPClient("test")
        await asyncio.wait_for(qmp.connect(str(sock)), 10)
        states = []
        for _ in range(3):
            await asyncio.sleep(0.1)
            await qmp.execute("stop")
            states.append((await qmp.execute("query-status"))["status"])
            await qmp.execute("cont")
            states.append((await qmp.execute("query-status"))["status"])
        cpus = await qmp.execute("query-cpus-fast")
        assert [c["cpu-index"] for c in cpus] == [0, 1]
        await qmp.execute("quit")
        # quit ends the monitor: the server may close before we do (QEMU too), which
        # qemu.qmp reports as EOFError from disconnect()
        with contextlib.suppress(EOFError):
            await qmp.disconnect()
        return states

    try:
        states = asyncio.run(asyncio.wait_for(drive(), 60))
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(sockdir, ignore_errors=True)
    assert states == ["paused", "running"] * 3
    assert proc.returncode == 0, err
    assert b"memstress: cpu0 pass" in out and b"memstress: cpu1 pass" in out


def test_run_exits_with_the_guest_status(tmp_path: Path) -> None:
    prog = tmp_path / "seven.c"
    prog.write_text(
        '#include "livemig.h"\nint main(int cpu, const struct boot_info *bi)\n'
        '{ (void)bi; if (cpu == 0) puts("bye\\n"); return 7; }\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "livemig", "run", "--guest", str(prog), "--memory", "8M"],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == b"bye\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run"], "give --guest"),
        (["run", "--guest", "no-such-guest", "--memory", "8M"], "no-such-guest"),
        (["run", "--guest", "idle", "--memory", "8M", "--qmp", "udp:1"], "QMP address"),
        (["run", "--guest", "idle", "--memory", "1000001"], "page size"),
        (["run", "--guest", "idle", "--incoming", "defer"], "exclude each other"),
    ],
)
def test_run_bad_input(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 1
    assert message in capsys.readouterr().err


def test_run_shows_the_compiler_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.c"
    bad.write_text("int main(void) { return nope; }\n")
    assert main(["run", "--guest", str(bad), "--memory", "8M"]) == 1
    assert "nope" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only")
def test_run_ctrl_c_is_status_130() -> None:
    proc = _spawn("--guest", "idle", "--memory", "8M", "--serial", "null")
    time.sleep(1.5)
    proc.send_signal(2)
    proc.communicate(timeout=30)
    assert proc.returncode == 130


def test_destination_that_cannot_listen_removes_its_qmp_socket(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    sock = Path(tempfile.mkdtemp(prefix="lmrun", dir="/tmp")) / "qmp.sock"
    try:
        out = subprocess.run([sys.executable, "-m", "livemig", "run", "--memory", "16M",
                              "--incoming", f"tcp:127.0.0.1:{port}", "--qmp", f"unix:{sock}"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    finally:
        busy.close()
    assert out.returncode == 1 and "cannot listen" in out.stderr
    assert not sock.exists(), "a QMP socket file left behind with nobody listening"


def test_messages_from_threads_stay_whole_lines(capfd: pytest.CaptureFixture[str]) -> None:
    """``run``'s messages come from several threads (start-up, the incoming migration's end):
    ``print`` writes a line's text and its newline apart, so two messages at once came out as
    "...16.0 MiBlivemig run: incoming migration failed: ..." on one line."""
    import threading

    from livemig.cli.run import _say

    def talk(n: int) -> None:
        for i in range(1000):
            _say(f"thread {n} message {i} " + "x" * 40)

    threads = [threading.Thread(target=talk, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 8 * 1000
    bad = [ln for ln in lines if ln.count("livemig run:") != 1 or not ln.endswith("x" * 40)]
    assert not bad, bad[:3]
