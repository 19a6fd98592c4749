"""Test doubles for the QMP tests: a fake machine and a raw-socket QMP client."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from enum import Enum
from typing import Any

from livemig.errors import MachineError
from livemig.qmp import QMPServer
from livemig.qmp.machine_commands import MachineControl

TIMEOUT = 5.0


class FakeRunState(Enum):
    PRELAUNCH = "prelaunch"
    RUNNING = "running"
    PAUSED = "paused"
    INMIGRATE = "inmigrate"
    POSTMIGRATE = "postmigrate"
    FINISH_MIGRATE = "finish-migrate"
    SHUTDOWN = "shutdown"


class FakeVCPU:
    def __init__(self, index: int) -> None:
        self.index = index
        self.thread_id: int | None = None


class FakeMachine:
    """Just enough of livemig.machine.Machine: run states, listeners, vCPUs."""

    def __init__(self, smp: int = 2, incoming: bool = False) -> None:
        self._state = FakeRunState.INMIGRATE if incoming else FakeRunState.PRELAUNCH
        self._listeners: list[Callable[[Any, Any], None]] = []
        self.vcpus = [FakeVCPU(i) for i in range(smp)]
        self.exit_status: int | None = None
        self.calls: list[str] = []
        self.lock = threading.Lock()

    @property
    def runstate(self) -> FakeRunState:
        return self._state

    def set_runstate(self, new: FakeRunState) -> None:
        with self.lock:
            old, self._state = self._state, new
        for cb in self._listeners:
            cb(old, new)

    def add_state_listener(self, cb: Callable[[Any, Any], None]) -> None:
        self._listeners.append(cb)

    def start(self) -> None:
        self.calls.append("start")
        for v in self.vcpus:
            v.thread_id = 1000 + v.index
        self.set_runstate(FakeRunState.RUNNING)

    def pause(self) -> None:
        self.calls.append("pause")
        self.set_runstate(FakeRunState.PAUSED)

    def resume(self) -> None:
        self.calls.append("resume")
        if self._state not in (FakeRunState.PAUSED, FakeRunState.POSTMIGRATE):
            raise MachineError(f"cannot resume from {self._state.value}")
        self.set_runstate(FakeRunState.RUNNING)

    def shutdown(self) -> None:
        self.calls.append("shutdown")
        if self._state is not FakeRunState.SHUTDOWN:
            self.set_runstate(FakeRunState.SHUTDOWN)

    def guest_exit(self, status: int) -> None:
        self.exit_status = status
        self.set_runstate(FakeRunState.SHUTDOWN)


class MachineRig:
    def __init__(self, server: QMPServer, machine: FakeMachine, control: MachineControl) -> None:
        self.server = server
        self.machine = machine
        self.control = control
        self.quits = threading.Event()

    @property
    def path(self) -> str:
        return self.server.address.removeprefix("unix:")


class RawClient:
    """A bare socket speaking QMP by hand, to send what no well-behaved client would."""

    def __init__(self, address: str) -> None:
        if address.startswith("unix:"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(address.removeprefix("unix:"))
        else:
            host, port = address.removeprefix("tcp:").rsplit(":", 1)
            self.sock = socket.create_connection((host, int(port)), TIMEOUT)
        self.sock.settimeout(TIMEOUT)
        self.buf = b""

    def send(self, data: bytes | dict[str, Any]) -> None:
        if isinstance(data, dict):
            data = json.dumps(data).encode()
        self.sock.sendall(data)

    def recv_line(self) -> bytes:
        deadline = time.monotonic() + TIMEOUT
        while b"\n" not in self.buf:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no complete line; have {self.buf[:200]!r}")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"server closed; have {self.buf[:200]!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def recv(self) -> dict[str, Any]:
        line = self.recv_line()
        assert line.endswith(b"\r\n"), line
        return json.loads(line)

    def recv_reply(self) -> dict[str, Any]:
        """The next message that is not an event."""
        while True:
            msg = self.recv()
            if "event" not in msg:
                return msg

    def greet_and_negotiate(self, enable: list[str] | None = None) -> dict[str, Any]:
        greeting = self.recv()
        cmd: dict[str, Any] = {"execute": "qmp_capabilities"}
        if enable:
            cmd["arguments"] = {"enable": enable}
        self.send(cmd)
        assert self.recv() == {"return": {}}
        return greeting

    def expect_eof(self) -> bytes:
        rest = self.buf
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return rest
            if not chunk:
                return rest
            rest += chunk
        raise TimeoutError("server did not close the connection")

    def close(self) -> None:
        self.sock.close()
