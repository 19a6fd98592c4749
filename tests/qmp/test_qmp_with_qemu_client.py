"""The server driven by the official ``qemu.qmp`` client: negotiation, commands, events, errors."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from livemig.errors import MachineError
from livemig.qmp import Arg, CommandRegistry, QMPError, QMPServer

T = 5.0


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


async def connected(server: QMPServer, name: str = "test") -> QMPClient:
    client = QMPClient(name)
    await asyncio.wait_for(client.connect(server.address.removeprefix("unix:")), T)
    return client


async def error_of(client: QMPClient, cmd: str, args: dict[str, Any] | None = None) -> tuple:
    with pytest.raises(ExecuteError) as info:
        await asyncio.wait_for(client.execute(cmd, args), T)
    return info.value.error_class, info.value.error.error.desc


def echo_registry() -> CommandRegistry:
    reg = CommandRegistry()
    reg.add(
        "echo",
        lambda **kw: kw,
        args={
            "text": Arg(str),
            "count": Arg(int, optional=True),
            "flag": Arg(bool, optional=True),
            "ratio": Arg(float, optional=True),
            "mode": Arg(str, optional=True, choices=("fast", "slow")),
            "caps": Arg(
                list,
                optional=True,
                items=Arg(dict, members={"capability": Arg(str), "state": Arg(bool)}),
            ),
            "tls-creds": Arg(str, optional=True, nullable=True),
        },
    )
    reg.add("nothing", lambda: None)
    reg.add("fail", _fail)
    reg.add("machine-fail", _machine_fail)
    reg.add("crash", lambda: 1 / 0)
    reg.add("unserialisable", lambda: {"x": object()})
    return reg


def _fail() -> None:
    raise QMPError("DeviceNotFound", "Device 'x' not found")


def _machine_fail() -> None:
    raise MachineError("vCPU 1 did not stop")


def test_greeting_and_negotiation(make_server: Callable[..., QMPServer]) -> None:
    server = make_server(version=(7, 2, 22))

    async def go() -> None:
        client = await connected(server)
        greeting = client.greeting
        assert greeting is not None
        version = greeting.QMP.version
        assert version["qemu"] == {"micro": 22, "minor": 2, "major": 7}
        assert version["package"].startswith("livemig ")
        assert greeting.QMP.capabilities == ["oob"]
        # qemu.qmp negotiated (with oob); a second qmp_capabilities is refused as QEMU does.
        assert await error_of(client, "qmp_capabilities") == (
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored",
        )
        await client.disconnect()

    run(go())


def test_command_results_and_argument_conversion(make_server: Callable[..., QMPServer]) -> None:
    server = make_server(echo_registry())

    async def go() -> None:
        client = await connected(server)
        assert await client.execute("nothing") == {}
        got = await client.execute(
            "echo",
            {
                "text": "hi",
                "count": 3,
                "flag": True,
                "ratio": 2,
                "mode": "slow",
                "caps": [{"capability": "xbzrle", "state": False}],
                "tls-creds": None,
            },
        )
        assert got == {
            "text": "hi",
            "count": 3,
            "flag": True,
            "ratio": 2.0,
            "mode": "slow",
            "caps": [{"capability": "xbzrle", "state": False}],
            "tls_creds": None,
        }
        await client.disconnect()

    run(go())


@pytest.mark.parametrize(
    ("cmd", "args", "expected"),
    [
        ("no-such", None, ("CommandNotFound", "The command no-such has not been found")),
        ("echo", {}, ("GenericError", "Parameter 'text' is missing")),
        (
            "echo",
            {"text": 5},
            ("GenericError", "Invalid parameter type for 'text', expected: string"),
        ),
        (
            "echo",
            {"text": "a", "count": "3"},
            ("GenericError", "Invalid parameter type for 'count', expected: integer"),
        ),
        (
            "echo",
            {"text": "a", "count": True},
            ("GenericError", "Invalid parameter type for 'count', expected: integer"),
        ),
        (
            "echo",
            {"text": "a", "flag": 1},
            ("GenericError", "Invalid parameter type for 'flag', expected: boolean"),
        ),
        (
            "echo",
            {"text": "a", "ratio": "x"},
            ("GenericError", "Invalid parameter type for 'ratio', expected: number"),
        ),
        ("echo", {"text": "a", "bogus": 1}, ("GenericError", "Parameter 'bogus' is unexpected")),
        (
            "echo",
            {"text": "a", "mode": "warp"},
            ("GenericError", "Parameter 'mode' does not accept value 'warp'"),
        ),
        (
            "echo",
            {"text": "a", "caps": [{"capability": "x"}]},
            ("GenericError", "Parameter 'caps[0].state' is missing"),
        ),
        (
            "echo",
            {"text": "a", "caps": {"capability": "x"}},
            ("GenericError", "Invalid parameter type for 'caps', expected: array"),
        ),
        ("nothing", {"x": 1}, ("GenericError", "Parameter 'x' is unexpected")),
        ("fail", None, ("DeviceNotFound", "Device 'x' not found")),
        ("machine-fail", None, ("GenericError", "vCPU 1 did not stop")),
        ("crash", None, ("GenericError", "internal error in 'crash': ZeroDivisionError")),
        ("unserialisable", None, ("GenericError", "internal error: reply not serialisable")),
    ],
)
def test_errors(
    make_server: Callable[..., QMPServer], cmd: str, args: Any, expected: tuple
) -> None:
    server = make_server(echo_registry())

    async def go() -> None:
        client = await connected(server)
        cls, desc = await error_of(client, cmd, args)
        assert cls == expected[0]
        assert desc.startswith(expected[1]), desc
        # The connection is still usable after any error.
        assert await client.execute("nothing") == {}
        await client.disconnect()

    run(go())


def test_events_reach_every_client(make_server: Callable[..., QMPServer]) -> None:
    server = make_server()

    async def go() -> None:
        clients = [await connected(server, f"c{i}") for i in range(3)]
        before = time.time()
        server.emit_event("STOP")
        server.emit_event("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})
        for client in clients:
            async with asyncio.timeout(T):
                stop = await client.events.get()
                shutdown = await client.events.get()
            assert stop["event"] == "STOP" and "data" not in stop
            ts = stop["timestamp"]
            assert set(ts) == {"seconds", "microseconds"}
            assert abs(ts["seconds"] + ts["microseconds"] / 1e6 - before) < 5
            assert 0 <= ts["microseconds"] < 1_000_000
            assert shutdown["data"] == {"guest": True, "reason": "guest-shutdown"}
        for client in clients:
            await client.disconnect()

    run(go())


def test_slow_command_does_not_block_events_or_oob(make_server: Callable[..., QMPServer]) -> None:
    release = threading.Event()
    reg = CommandRegistry()
    reg.add("slow", lambda: release.wait(T) and "done")
    reg.add("ping", lambda: "pong", allow_oob=True)
    reg.add("inband", lambda: "in")
    server = make_server(reg)

    async def go() -> None:
        client = await connected(server)
        other = await connected(server, "other")
        slow = asyncio.create_task(client.execute("slow"))
        await asyncio.sleep(0.1)
        server.emit_event("STOP")
        async with asyncio.timeout(T):
            assert (await other.events.get())["event"] == "STOP"
        # OOB overtakes the in-band command in progress.
        assert await asyncio.wait_for(client.execute("ping", oob=True), T) == "pong"
        # In-band commands of every client are serialised behind the slow one.
        inband = asyncio.create_task(other.execute("inband"))
        await asyncio.sleep(0.2)
        assert not inband.done()
        release.set()
        assert await asyncio.wait_for(slow, T) == "done"
        assert await asyncio.wait_for(inband, T) == "in"
        # A command without allow_oob cannot go out of band.
        with pytest.raises(ExecuteError) as info:
            await asyncio.wait_for(client.execute("inband", oob=True), T)
        assert info.value.error.error.desc == "The command inband does not support OOB"
        await client.disconnect()
        await other.disconnect()

    run(go())


def test_async_handler_runs_on_loop(make_server: Callable[..., QMPServer]) -> None:
    reg = CommandRegistry()

    async def later(delay: float) -> dict[str, float]:
        await asyncio.sleep(delay)
        return {"slept": delay}

    reg.add("later", later, args={"delay": Arg(float)})
    server = make_server(reg)

    async def go() -> None:
        client = await connected(server)
        assert await asyncio.wait_for(client.execute("later", {"delay": 0.01}), T) == {
            "slept": 0.01
        }
        await client.disconnect()

    run(go())


def test_tcp_port_zero(make_server: Callable[..., QMPServer]) -> None:
    reg = CommandRegistry()
    reg.add("nothing", lambda: None)
    server = make_server(reg, address="tcp:127.0.0.1:0")
    host, port = server.address.removeprefix("tcp:").rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0

    async def go() -> None:
        client = QMPClient("tcp")
        await asyncio.wait_for(client.connect((host, int(port))), T)
        assert await client.execute("nothing") == {}
        await client.disconnect()

    run(go())


def test_postcopy_recovery_commands_run_out_of_band(make_server: Callable[..., QMPServer]) -> None:
    """QEMU 10.0 runs migrate-pause and migrate-recover out of band: post-copy recovery must
    not wait behind an in-band command stuck on the broken link. They used to be refused with
    exec-oob ("does not support OOB") though the greeting offered OOB."""
    from qmp_fakes import FakeMachine

    from livemig.migration.manager import MigrationManager, register_migration_commands

    release = threading.Event()
    reg = CommandRegistry()
    register_migration_commands(reg, MigrationManager(FakeMachine()))
    reg.add("slow", lambda: release.wait(T) and "done")
    server = make_server(reg)

    async def go() -> None:
        client = await connected(server)
        slow = asyncio.create_task(client.execute("slow"))
        await asyncio.sleep(0.1)
        for cmd, args, words in [
            ("migrate-pause", None, "only supported during postcopy-active or postcopy-recover"),
            ("migrate-recover", {"uri": "tcp:127.0.0.1:1"}, "only be run when postcopy is paused"),
        ]:  # fmt: skip
            with pytest.raises(ExecuteError) as info:  # answered while "slow" still runs
                await asyncio.wait_for(client.execute(cmd, args, oob=True), T)
            assert words in info.value.error.error.desc
        assert not slow.done()
        release.set()
        assert await asyncio.wait_for(slow, T) == "done"
        await client.disconnect()

    run(go())
