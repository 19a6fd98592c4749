"""The machine's QMP commands and events: query-status, stop, cont, quit, query-cpus-fast, ...

These follow QEMU 10.0's monitor (``system/cpus.c``, ``monitor/qmp-cmds.c``):

* ``stop`` pauses a running guest (STOP event); on a stopped guest it does nothing; in
  ``inmigrate`` it only clears *autostart*, so the guest stays paused when migration ends.
* ``cont`` starts (``prelaunch``) or resumes (``paused``, ``postmigrate``) the guest (RESUME); on a
  running guest it does nothing; in ``inmigrate`` it sets *autostart*; it is refused in
  ``finish-migrate`` ("Migration is not finalized yet") and after shutdown ("Resetting the
  Virtual Machine is required").
* ``stop`` and ``cont`` in ``colo``: ``stop`` clears *autostart* (a COLO standby then takes
  over with the guest paused) and pauses a primary once its checkpoint is taken; ``cont`` is
  refused (a standby runs the guest only when it takes over).
* ``quit`` replies first, then emits SHUTDOWN ``{"guest": false, "reason": "host-qmp-quit"}`` and
  calls ``on_quit``.

Events come from the machine's run-state listener, so they are right whoever changed the state
(QMP, the migration code, the guest): RESUME on entering ``running``; STOP on leaving
``running`` for a stopped state; SHUTDOWN on entering ``shutdown`` (reason ``host-qmp-quit`` after
``quit``, else the machine's ``shutdown_reason`` when it is a QEMU ShutdownCause, else
``guest-shutdown`` when the guest halted or wrote its exit status, else ``host-signal``).
Run states are compared by their QEMU names (``RunState.value``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, Protocol

from livemig.errors import LivemigError
from livemig.qmp.commands import EMPTY, Arg, CommandRegistry, QMPError
from livemig.qmp.server import QMPServer, call_after_reply

# QEMU's runstate_needs_reset() states (we never run with -no-shutdown, so shutdown is final).
_NEEDS_RESET = frozenset({"internal-error", "shutdown", "guest-panicked"})
# QAPI ShutdownCause values (the SHUTDOWN event's "reason").
_SHUTDOWN_CAUSES = frozenset(
    {
        "none",
        "host-error",
        "host-qmp-quit",
        "host-qmp-system-reset",
        "host-signal",
        "host-ui",
        "guest-shutdown",
        "guest-reset",
        "guest-panic",
        "subsystem-reset",
        "snapshot-load",
    }
)


# QEMU 10.0's types of these commands' replies and events' data (query-qmp-schema)
RUN_STATES = ("debug", "inmigrate", "internal-error", "io-error", "paused", "postmigrate",
              "prelaunch", "finish-migrate", "restore-vm", "running", "save-vm", "shutdown",
              "suspended", "watchdog", "guest-panicked", "colo")  # fmt: skip
STATUS_INFO = Arg(dict, members={
    "running": Arg(bool), "status": Arg(str, choices=RUN_STATES, qtype="RunState")})  # fmt: skip
VERSION_INFO = Arg(dict, members={
    "qemu": Arg(dict, members={"major": Arg(int), "minor": Arg(int), "micro": Arg(int)}),
    "package": Arg(str)})  # fmt: skip
NAME_INFO = Arg(dict, members={"name": Arg(str, optional=True)})
CPU_INFO_FAST = Arg(dict, members={
    "cpu-index": Arg(int), "qom-path": Arg(str), "thread-id": Arg(int),
    "props": Arg(dict, optional=True, members={
        k: Arg(int, optional=True) for k in ("node-id", "drawer-id", "book-id", "socket-id",
                                              "die-id", "cluster-id", "module-id", "core-id",
                                              "thread-id")}),
    "target": Arg(str, choices=("x86_64",), qtype="SysEmuTarget")})  # fmt: skip
SHUTDOWN_DATA = {"guest": Arg(bool),
                 "reason": Arg(str, choices=tuple(sorted(_SHUTDOWN_CAUSES)),
                               qtype="ShutdownCause")}  # fmt: skip
EVENTS: dict[str, dict[str, Arg] | None] = {"STOP": None, "RESUME": None,
                                             "SHUTDOWN": SHUTDOWN_DATA}  # fmt: skip


class _Machine(Protocol):
    """What these commands use of ``livemig.machine.Machine``."""

    @property
    def runstate(self) -> Any: ...

    @property
    def vcpus(self) -> list[Any]: ...

    @property
    def exit_status(self) -> int | None: ...

    def start(self) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def shutdown(self) -> None: ...

    def add_state_listener(self, cb: Callable[[Any, Any], None]) -> None: ...


def _state_name(state: Any) -> str:
    return str(getattr(state, "value", state))


class MachineControl:
    """The machine commands' state, returned by ``register_machine_commands``.

    ``autostart`` is QEMU's flag of the same name: whether an incoming guest runs once migration
    completes (``stop``/``cont`` in ``inmigrate`` clear/set it). The migration code reads it.
    """

    def __init__(
        self,
        machine: _Machine,
        server: QMPServer,
        on_quit: Callable[[], Any] | None,
        autostart: bool,
    ) -> None:
        self.machine = machine
        self.server = server
        self.on_quit = on_quit if on_quit is not None else machine.shutdown
        self.autostart = autostart
        self.quit_requested = False
        self._shutdown_sent = False
        self._lock = threading.Lock()

    # --- commands -------------------------------------------------------------------------------

    def query_status(self) -> dict[str, Any]:
        status = _state_name(self.machine.runstate)
        # QEMU 10.0's StatusInfo: "singlestep" went in 9.0
        return {"status": status, "running": status == "running"}

    def stop(self) -> None:
        status = _state_name(self.machine.runstate)
        if status == "inmigrate":
            self.autostart = False
        elif status == "running":
            self.machine.pause()
        elif status == "colo":
            # a COLO standby keeps the guest paused when it takes over; a primary in the midst
            # of a checkpoint pauses once the checkpoint has its state
            self.autostart = False
            self.machine.pause()

    def cont(self) -> None:
        status = _state_name(self.machine.runstate)
        if status in _NEEDS_RESET:
            raise QMPError("GenericError", "Resetting the Virtual Machine is required")
        if status == "finish-migrate":
            raise QMPError("GenericError", "Migration is not finalized yet")
        if status == "colo":
            raise QMPError("GenericError", "The guest is a COLO standby or stopped for a COLO "
                           "checkpoint: a standby runs it only when it takes over "
                           "(x-colo-lost-heartbeat)")  # fmt: skip
        if status == "inmigrate":
            self.autostart = True
        elif status == "prelaunch":
            self.machine.start()
        elif status != "running":
            self.machine.resume()

    def quit(self) -> None:
        self.quit_requested = True
        call_after_reply(self._do_quit)

    def query_cpus_fast(self) -> list[dict[str, Any]]:
        cpus = []
        for vcpu in self.machine.vcpus:
            index = vcpu.index
            thread_id = vcpu.thread_id
            cpus.append(
                {
                    # A vCPU not started yet has no thread; QEMU's always exists, so report
                    # the process, which is where it will run.
                    "thread-id": thread_id if thread_id is not None else os.getpid(),
                    # QEMU's pc machine defaults -smp N to N sockets of one core, one thread.
                    "props": {"core-id": 0, "thread-id": 0, "socket-id": index},
                    "qom-path": f"/machine/unattached/device[{index}]",
                    "cpu-index": index,
                    "target": "x86_64",
                }
            )
        return cpus

    # --- events ---------------------------------------------------------------------------------

    def on_state_change(self, old: Any, new: Any) -> None:
        """Machine run-state listener: turn transitions into STOP / RESUME / SHUTDOWN."""
        old_name, new_name = _state_name(old), _state_name(new)
        if old_name == new_name:
            return
        if new_name == "shutdown":
            reason = self._shutdown_reason()
            self._emit_shutdown(guest=reason.startswith("guest-"), reason=reason)
        elif new_name == "running":
            self.server.emit_event("RESUME")
        elif old_name == "running":
            self.server.emit_event("STOP")

    def _shutdown_reason(self) -> str:
        if self.quit_requested:
            return "host-qmp-quit"
        told = getattr(self.machine, "shutdown_reason", None)
        if told in _SHUTDOWN_CAUSES:
            return told
        if told == "guest-halt" or self.machine.exit_status is not None:
            # Every vCPU halted or the guest wrote its exit status: the guest shut itself down.
            return "guest-shutdown"
        return "host-signal"

    def _emit_shutdown(self, guest: bool, reason: str) -> None:
        with self._lock:
            if self._shutdown_sent:
                return
            self._shutdown_sent = True
        self.server.emit_event("SHUTDOWN", {"guest": guest, "reason": reason})

    def _do_quit(self) -> None:
        # QEMU sends SHUTDOWN even when the machine is already down (e.g. the guest exited).
        self._emit_shutdown(guest=False, reason="host-qmp-quit")
        self.on_quit()


def register_machine_commands(
    registry: CommandRegistry,
    machine: _Machine,
    server: QMPServer,
    on_quit: Callable[[], Any] | None = None,
    autostart: bool = True,
) -> MachineControl:
    """Register the machine commands on ``registry`` and hook the machine's events to ``server``.

    ``on_quit`` runs (in its own thread) after ``quit`` has been answered; by default it shuts
    the machine down. ``autostart`` is the initial value of QEMU's flag (``False`` = ``-S``).
    """
    control = MachineControl(machine, server, on_quit, autostart)
    version = server.version
    package = server.package

    def query_version() -> dict[str, Any]:
        major, minor, micro = version
        return {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": package}

    def query_commands() -> list[dict[str, str]]:
        return [{"name": name} for name in registry.names()]

    def query_name() -> dict[str, str]:
        # QEMU's -name; livemig's machines are unnamed unless the runner names one
        name = getattr(machine, "name", None)
        return {"name": name} if name else {}

    def query_qmp_schema() -> list[dict[str, Any]]:
        from livemig.qmp.schema import introspect

        return introspect(registry, registry.events)

    commands: dict[str, tuple[Callable[..., Any], Arg]] = {
        "query-status": (control.query_status, STATUS_INFO),
        "stop": (control.stop, EMPTY),
        "cont": (control.cont, EMPTY),
        "quit": (control.quit, EMPTY),
        "query-version": (query_version, VERSION_INFO),
        "query-name": (query_name, NAME_INFO),
        "query-commands": (query_commands, Arg(list, items=Arg(dict, members={"name": Arg(str)}))),
        "query-cpus-fast": (control.query_cpus_fast, Arg(list, items=CPU_INFO_FAST)),
        "query-qmp-schema": (query_qmp_schema, Arg(list, items=Arg(object))),
    }
    for name, (handler, returns) in commands.items():
        if name in registry:
            raise LivemigError(f"QMP command '{name}' is already registered")
        registry.add(name, handler, returns=returns)
    for event, data in EVENTS.items():
        registry.add_event(event, data)
    machine.add_state_listener(control.on_state_change)
    return control
