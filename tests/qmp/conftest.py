"""Fixtures for the QMP tests: servers on unix and TCP sockets, a machine rig, raw clients."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qmp_fakes import FakeMachine, MachineRig, RawClient

from livemig.qmp import CommandRegistry, QMPServer
from livemig.qmp.machine_commands import register_machine_commands


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Not tmp_path: unix socket paths must stay under 108 bytes.
    d = Path(tempfile.mkdtemp(prefix="qmpt", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def make_server(sockdir: Path) -> Iterator[Callable[..., QMPServer]]:
    servers: list[QMPServer] = []

    def make(
        registry: CommandRegistry | None = None, address: str | None = None, **kw: Any
    ) -> QMPServer:
        server = QMPServer(
            address or f"unix:{sockdir}/qmp{len(servers)}.sock",
            registry or CommandRegistry(),
            **kw,
        )
        server.start()
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.close()


@pytest.fixture
def rig(make_server: Callable[..., QMPServer]) -> MachineRig:
    registry = CommandRegistry()
    machine = FakeMachine()
    holder: dict[str, MachineRig] = {}

    def on_quit() -> None:
        machine.shutdown()
        holder["rig"].quits.set()

    # register_machine_commands needs the server; the server only needs the registry object,
    # which may still grow until clients use it.
    server = make_server(registry)
    control = register_machine_commands(registry, machine, server, on_quit=on_quit)
    holder["rig"] = MachineRig(server, machine, control)
    return holder["rig"]


@pytest.fixture
def raw() -> Iterator[Callable[[str], RawClient]]:
    clients: list[RawClient] = []

    def connect(address: str) -> RawClient:
        c = RawClient(address)
        clients.append(c)
        return c

    yield connect
    for c in clients:
        c.close()
