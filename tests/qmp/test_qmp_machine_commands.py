"""Machine commands and events against a fake machine, through qemu.qmp and livemig's client."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient
from qmp_fakes import FakeRunState, MachineRig

from livemig.errors import MachineError
from livemig.qmp.client import QMPClientError, QMPConnection, qmp_command

T = 5.0


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


async def client_for(rig: MachineRig) -> QMPClient:
    client = QMPClient("machine-test")
    await asyncio.wait_for(client.connect(rig.path), T)
    return client


async def next_event(client: QMPClient) -> dict[str, Any]:
    async with asyncio.timeout(T):
        return dict(await client.events.get())


def test_status_stop_cont_and_events(rig: MachineRig) -> None:
    async def go() -> None:
        c = await client_for(rig)
        assert await c.execute("query-status") == {
            "status": "prelaunch",
            "running": False,
        }
        assert await c.execute("stop") == {}  # not running: nothing happens, no event
        assert await c.execute("cont") == {}
        assert (await next_event(c))["event"] == "RESUME"
        assert await c.execute("query-status") == {
            "status": "running",
            "running": True,
        }
        assert await c.execute("cont") == {}  # already running: no-op
        assert await c.execute("stop") == {}
        stop = await next_event(c)
        assert stop["event"] == "STOP" and "data" not in stop
        assert (await c.execute("query-status"))["status"] == "paused"
        assert await c.execute("cont") == {}
        assert (await next_event(c))["event"] == "RESUME"
        assert c.events.empty()
        await c.disconnect()

    run(go())
    assert rig.machine.calls == ["start", "pause", "resume"]


def test_cont_refusals(rig: MachineRig) -> None:
    async def go() -> None:
        c = await client_for(rig)
        rig.machine.set_runstate(FakeRunState.FINISH_MIGRATE)
        with pytest.raises(ExecuteError) as info:
            await c.execute("cont")
        assert info.value.error.error.desc == "Migration is not finalized yet"
        rig.machine.set_runstate(FakeRunState.SHUTDOWN)
        with pytest.raises(ExecuteError) as info:
            await c.execute("cont")
        assert info.value.error.error.desc == "Resetting the Virtual Machine is required"
        await c.disconnect()

    run(go())


def test_postmigrate_cont_resumes_and_machine_errors_are_generic(rig: MachineRig) -> None:
    def broken_start() -> None:
        raise MachineError("no vCPU could start")

    async def go() -> None:
        c = await client_for(rig)
        rig.machine.start()
        rig.machine.set_runstate(FakeRunState.FINISH_MIGRATE)
        rig.machine.set_runstate(FakeRunState.POSTMIGRATE)
        assert await c.execute("cont") == {}  # QEMU lets a source run again after migrating
        assert rig.machine.runstate is FakeRunState.RUNNING
        rig.machine.pause()
        rig.machine.set_runstate(FakeRunState.PRELAUNCH)
        rig.machine.start = broken_start  # type: ignore[method-assign]
        with pytest.raises(ExecuteError) as info:
            await c.execute("cont")
        assert info.value.error_class == "GenericError"
        assert info.value.error.error.desc == "no vCPU could start"
        await c.disconnect()

    run(go())


def test_inmigrate_stop_cont_toggle_autostart(rig: MachineRig) -> None:
    rig.machine.set_runstate(FakeRunState.INMIGRATE)
    assert rig.control.autostart is True
    with QMPConnection(rig.server.address) as conn:
        conn.command("stop")
        assert rig.control.autostart is False
        assert conn.command("query-status")["status"] == "inmigrate"
        conn.command("cont")
        assert rig.control.autostart is True
    assert "start" not in rig.machine.calls and "resume" not in rig.machine.calls


def test_migration_state_changes_emit_stop_and_resume(rig: MachineRig) -> None:
    async def go() -> None:
        c = await client_for(rig)
        rig.machine.start()
        assert (await next_event(c))["event"] == "RESUME"
        rig.machine.set_runstate(FakeRunState.FINISH_MIGRATE)  # source switchover
        assert (await next_event(c))["event"] == "STOP"
        rig.machine.set_runstate(FakeRunState.POSTMIGRATE)  # not leaving running: no event
        rig.machine.set_runstate(FakeRunState.RUNNING)
        assert (await next_event(c))["event"] == "RESUME"
        await c.disconnect()

    run(go())


def test_guest_shutdown_event(rig: MachineRig) -> None:
    async def go() -> None:
        c = await client_for(rig)
        rig.machine.start()
        assert (await next_event(c))["event"] == "RESUME"
        rig.machine.guest_exit(3)
        ev = await next_event(c)
        assert ev["event"] == "SHUTDOWN"
        assert ev["data"] == {"guest": True, "reason": "guest-shutdown"}
        await c.disconnect()

    run(go())


def test_quit_replies_then_shutdown_event_then_on_quit(rig: MachineRig) -> None:
    async def go() -> None:
        c = await client_for(rig)
        rig.machine.start()
        assert (await next_event(c))["event"] == "RESUME"
        assert await c.execute("quit") == {}
        ev = await next_event(c)
        assert ev["event"] == "SHUTDOWN"
        assert ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
        await c.disconnect()

    run(go())
    assert rig.quits.wait(T)
    assert rig.machine.runstate is FakeRunState.SHUTDOWN
    assert rig.machine.calls[-1] == "shutdown"


def test_query_version_commands_cpus(rig: MachineRig) -> None:
    with QMPConnection(rig.server.address) as conn:
        assert conn.command("query-version") == {
            "qemu": {"micro": 2, "minor": 0, "major": 10},
            "package": rig.server.package,
        }
        names = [c["name"] for c in conn.command("query-commands")]
        assert sorted(names) == sorted(
            [
                "qmp_capabilities",
                "query-status",
                "stop",
                "cont",
                "quit",
                "query-version",
                "query-name",
                "query-commands",
                "query-qmp-schema",
                "query-cpus-fast",
            ]
        )
        assert conn.command("query-name") == {}  # an unnamed machine, as QEMU without -name
        cpus = conn.command("query-cpus-fast")
        assert [c["cpu-index"] for c in cpus] == [0, 1]
        assert cpus[1]["qom-path"] == "/machine/unattached/device[1]"
        assert cpus[1]["target"] == "x86_64"
        assert cpus[1]["props"] == {"core-id": 0, "thread-id": 0, "socket-id": 1}
        assert cpus[0]["thread-id"] == os.getpid()  # not started yet
        conn.command("cont")
        assert [c["thread-id"] for c in conn.command("query-cpus-fast")] == [1000, 1001]


def test_sync_client_errors_and_events(rig: MachineRig) -> None:
    with QMPConnection(rig.server.address, timeout=T) as conn:
        assert conn.greeting is not None and conn.greeting["QMP"]["capabilities"] == ["oob"]
        with pytest.raises(QMPClientError) as info:
            conn.command("no-such-command")
        err = info.value
        assert (err.command, err.error_class) == ("no-such-command", "CommandNotFound")
        assert str(err) == (
            "QMP no-such-command failed: CommandNotFound: "
            "The command no-such-command has not been found"
        )
        with pytest.raises(QMPClientError, match="Parameter 'x' is unexpected"):
            conn.command("stop", x=1)
        conn.command("cont")
        assert conn.event("RESUME", timeout=T)["event"] == "RESUME"
        with pytest.raises(QMPClientError, match=r"no STOP within 0\.2 s"):
            conn.event("STOP", timeout=0.2)
    assert qmp_command(rig.server.address, "query-status")["status"] == "running"


def test_sync_client_cannot_connect(sockdir) -> None:
    with pytest.raises(QMPClientError, match="cannot connect to QMP unix:"):
        QMPConnection(f"unix:{sockdir}/absent.sock", timeout=1).connect()
