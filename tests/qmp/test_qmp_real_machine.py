"""End to end: a real livemig machine running a built guest, controlled through qemu.qmp."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from qemu.qmp import QMPClient

from livemig.qmp import CommandRegistry, QMPServer
from livemig.qmp.machine_commands import register_machine_commands

machine_mod = pytest.importorskip("livemig.machine")
guests = pytest.importorskip("livemig.guests")

T = 10.0


@pytest.fixture
def idle_machine() -> Iterator[Any]:
    try:
        image = guests.build_guest("idle")
    except Exception as exc:  # no compiler on this host: the guest tests report that
        pytest.skip(f"cannot build the idle guest: {exc}")
    machine = machine_mod.Machine([machine_mod.RAMBlockSpec("pc.ram", 4 << 20)], smp=2)
    machine.load_guest(image.data, "seconds=0 period_ms=5")
    yield machine
    machine.close()


async def _events(client: QMPClient, n: int) -> list[dict[str, Any]]:
    out = []
    async with asyncio.timeout(T):
        for _ in range(n):
            out.append(dict(await client.events.get()))
    return out


def test_stop_cont_quit_on_a_real_machine(
    idle_machine: Any, make_server: Callable[..., QMPServer]
) -> None:
    registry = CommandRegistry()
    server = make_server(registry)
    register_machine_commands(registry, idle_machine, server)

    async def go() -> None:
        client = QMPClient("e2e")
        await asyncio.wait_for(client.connect(server.address.removeprefix("unix:")), T)
        assert (await client.execute("query-status"))["status"] == "prelaunch"
        await client.execute("cont")
        assert [e["event"] for e in await _events(client, 1)] == ["RESUME"]
        cpus = await client.execute("query-cpus-fast")
        assert [c["cpu-index"] for c in cpus] == [0, 1]
        assert all(c["thread-id"] != os.getpid() for c in cpus)  # real vCPU threads
        for _ in range(3):
            await client.execute("stop")
            assert await client.execute("query-status") == {
                "status": "paused",
                "running": False,
            }
            await client.execute("cont")
        assert [e["event"] for e in await _events(client, 6)] == ["STOP", "RESUME"] * 3
        assert (await client.execute("query-status"))["running"] is True
        await client.execute("quit")
        (shutdown,) = await _events(client, 1)
        assert shutdown["event"] == "SHUTDOWN"
        assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
        await client.disconnect()

    asyncio.run(asyncio.wait_for(go(), 30))
    assert idle_machine.wait_for_end(T)
    assert idle_machine.runstate.value == "shutdown"
