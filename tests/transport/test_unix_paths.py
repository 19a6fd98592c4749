"""A ``unix:`` listener takes the place of a stale socket, never of a user's file: a mistyped
path (``--incoming``, ``capture``, ``--serial``, ``--serve``, ``front --serve``) used to delete
whatever was there."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from livemig.errors import MachineError
from livemig.machine import open_chardev
from livemig.transport import ChannelError, Listener


def _precious(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("precious\n")
    return path


def test_listener_refuses_a_regular_file_and_leaves_it(tmp_path: Path) -> None:
    path = _precious(tmp_path)
    with pytest.raises(ChannelError, match=r"exists and is not a socket: not removed"):
        Listener(f"unix:{path}")
    assert path.read_text() == "precious\n"


def test_listener_replaces_a_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays, as after a kill -9
    listener = Listener(f"unix:{path}")
    try:
        assert path.is_socket()
    finally:
        listener.close()


def test_serial_socket_refuses_a_regular_file(tmp_path: Path) -> None:
    path = _precious(tmp_path)
    with pytest.raises(MachineError, match=r"exists and is not a socket: not removed"):
        open_chardev(f"unix:{path}")
    assert path.read_text() == "precious\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["front", "--serve", "unix:{path}", "--backend", "tcp:127.0.0.1:1"],
        ["capture", "unix:{path}", "{out}", "--timeout", "1"],
    ],
    ids=["front", "capture"],
)
def test_commands_refuse_a_regular_file_in_one_line(tmp_path: Path, argv: list[str]) -> None:
    path = _precious(tmp_path)
    args = [a.format(path=path, out=tmp_path / "out.mig") for a in argv]
    r = subprocess.run([sys.executable, "-m", "livemig", *args], capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().endswith(f"{path} exists and is not a socket: not removed")
    assert path.read_text() == "precious\n"
