"""The machine: RAM blocks, vCPU threads, port-I/O devices and the run state, put together.

Theory of operation. Every vCPU is a thread running a ``CPUBackend`` (unicorn) over the same
host RAM. A thread runs guest code only while the machine allows it (``_run_allowed``, under
``_cond``); otherwise it *parks*, waiting on the condition. To stop the machine the controlling
thread clears the flag, wakes any vCPU sleeping in a device, and calls ``backend.stop()`` on
each vCPU that has not parked yet, repeating until all have: a stop that lands just before a
vCPU enters the emulator would be forgotten by it, and the repetition makes that harmless. A
stopped backend returns at an instruction boundary with rip at the next instruction, so
stopping and resuming any number of times loses no instruction and no write.

Run-state changes go through ``set_runstate``, which checks QEMU's transition table
(``runstate.py``), stops the vCPUs when leaving ``running`` and starts them when entering it,
then tells the listeners (the QMP server's events, the migration code). The guest itself can
end the run (power port, every vCPU halted, a fault); those requests arrive on a vCPU thread,
which cannot wait for itself to stop, so they are carried out by a short-lived helper thread.

State for migration: ``cpu_states`` / ``load_cpu_states`` (``CPUState`` objects), the devices
(each declares its own ``vmsd``), and the RAM blocks themselves; a paused machine's state loaded
into a new ``Machine`` continues the guest exactly.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from livemig import threads
from livemig.errors import MachineError
from livemig.machine.abi import MAX_CPUS, RING_ADDR, RING_SIZE
from livemig.machine.chardev import BufferChardev, Chardev, open_chardev
from livemig.machine.cpu import EXIT_ERROR, EXIT_HALTED, CPUBackend, CPUState
from livemig.machine.devices.base import Device, PortIOBus
from livemig.machine.devices.clock import GuestClock
from livemig.machine.devices.power import PowerPort
from livemig.machine.devices.ring import RingDevice
from livemig.machine.devices.serial import Serial16550
from livemig.machine.loader import GuestLayout, entry_state, write_guest
from livemig.machine.ram import RAMBlock, RAMBlockSpec, check_ram_blocks, layout
from livemig.machine.runstate import RunState, check_transition
from livemig.machine.unicorn_cpu import UnicornCPU

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0  # a vCPU that does not reach an instruction boundary by then is stuck
_KICK_INTERVAL_S = 0.001
THROTTLE_TIMESLICE_S = 0.010  # QEMU's CPU_THROTTLE_TIMESLICE_NS
_END_STATES = (RunState.SHUTDOWN, RunState.INTERNAL_ERROR, RunState.GUEST_PANICKED)

StateListener = Callable[[RunState, RunState], None]


class VCPU:
    """One vCPU: its backend and the host thread that runs it."""

    def __init__(self, machine: Machine, index: int, backend: CPUBackend) -> None:
        self.index = index
        self.backend = backend
        self.halted = False  # executed hlt; stays stopped (this machine has no interrupts)
        self.failed = False  # the guest faulted on this vCPU
        self.parked = True
        self.thread_id: int | None = None
        self.throttle_until = 0.0  # monotonic time before which auto-converge keeps it parked
        self.runs = 0  # how many times the backend was entered (pauses + 1)
        self._machine = machine
        self._exit = False
        self._thread = threads.Thread(target=self._loop, name=f"vcpu{index}", daemon=True)

    @property
    def runnable(self) -> bool:
        return not (self.halted or self.failed)

    def start_thread(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        m = self._machine
        self.thread_id = threading.get_native_id()
        while True:
            with m._cond:
                self.parked = True
                m._cond.notify_all()
                while not self._exit:
                    if m._run_allowed and self.runnable:
                        nap = self.throttle_until - time.monotonic()
                        if nap <= 0:
                            break
                        m._cond.wait(nap)  # throttled: parked, so a pause needs no kick
                    else:
                        m._cond.wait()
                if self._exit:
                    return
                self.parked = False
            self.runs += 1
            reason, detail = self.backend.run()
            if reason == EXIT_HALTED:
                m._vcpu_halted(self)
            elif reason == EXIT_ERROR:
                m._vcpu_failed(self, detail or "unknown error")

    def join(self, timeout: float) -> None:
        with self._machine._cond:
            self._exit = True
            self._machine._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)


@dataclass
class MachineState:
    """A paused machine's CPU and device state (RAM stays in the blocks)."""

    cpus: list[CPUState]
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)


class Machine:
    """An emulated x86-64 machine running a flat guest image.

    ``ram`` lists the RAM blocks (``RAMBlockSpec``: idstr and size; default one 64 MiB
    ``pc.ram``), ``smp`` the number of vCPUs, ``serial`` the console back-end (a ``Chardev``
    or a spec such as ``stdio``, ``file:PATH``, ``unix:PATH``; default an in-memory buffer),
    ``prefault`` whether to populate RAM up front. The machine starts in ``prelaunch``.
    """

    def __init__(
        self,
        ram: Sequence[RAMBlockSpec] | None = None,
        smp: int = 1,
        *,
        serial: Chardev | str | None = None,
        prefault: bool = False,
        cpu_backend: Callable[[int], CPUBackend] = UnicornCPU,
    ) -> None:
        specs = list(ram) if ram is not None else [RAMBlockSpec("pc.ram", 64 << 20)]
        check_ram_blocks(specs)
        if not 1 <= smp <= MAX_CPUS:
            raise MachineError(f"--smp {smp}: this machine supports 1 to {MAX_CPUS} vCPUs")
        self._cond = threading.Condition()
        self._transition_lock = threading.RLock()
        self._run_allowed = False
        self._runstate = RunState.PRELAUNCH
        self._listeners: list[StateListener] = []
        self._ended = threading.Event()
        self._code_stale = True
        self._closed = False
        self.exit_status: int | None = None
        self.shutdown_reason: str | None = None
        self.error: str | None = None
        self.guest: GuestLayout | None = None
        self._throttle_pct = 0
        self._throttle_thread: threading.Thread | None = None

        self.ram_blocks: list[RAMBlock] = []
        self.vcpus: list[VCPU] = []
        self.devices: list[Device] = []
        try:
            for spec, gpa in zip(specs, layout(specs), strict=True):
                self.ram_blocks.append(RAMBlock(spec.idstr, spec.size, gpa, prefault=prefault))
            self.chardev = open_chardev(serial) if serial is not None else BufferChardev()
            self.serial = Serial16550(self.chardev)
            self.clock = GuestClock()
            self.power = PowerPort(self._guest_poweroff)
            self.ring = RingDevice(self.read_guest(RING_ADDR, RING_SIZE))
            self.devices = [self.serial, self.clock, self.power, self.ring]
            self.bus = PortIOBus()
            for dev in self.devices:
                self.bus.attach(dev)
            for i in range(smp):
                backend = cpu_backend(i)
                for block in self.ram_blocks:
                    backend.map_ram(block.gpa, block.size, block.host_addr)
                backend.set_port_io(self.bus.read, self.bus.write)
                self.vcpus.append(VCPU(self, i, backend))
        except BaseException:
            self.close()
            raise
        for vcpu in self.vcpus:
            vcpu.start_thread()
        # vCPU threads run native code against RAM this object owns: stop them before the
        # interpreter tears down, or a process that exits with a running guest crashes.
        ref = weakref.ref(self)
        atexit.register(lambda: (m := ref()) is not None and m.close())

    # -- run state ----------------------------------------------------------------------------

    @property
    def runstate(self) -> RunState:
        return self._runstate

    @property
    def running(self) -> bool:
        return self._runstate == RunState.RUNNING

    def add_state_listener(self, callback: StateListener) -> None:
        """Call ``callback(old, new)`` after every run-state change. It must not block."""
        self._listeners.append(callback)

    def remove_state_listener(self, callback: StateListener) -> None:
        self._listeners.remove(callback)

    def set_runstate(self, new: RunState | str) -> None:
        """Move to ``new`` if the table allows it, stopping or starting the vCPUs as needed."""
        new = RunState(new)
        with self._transition_lock:
            old = self._runstate
            check_transition(old, new)
            if old == new:
                return
            if self._closed:
                raise MachineError(f"machine is closed; cannot enter {new}")
            if old == RunState.RUNNING:
                self._stop_vcpus()
            if new == RunState.RUNNING:
                self._start_vcpus()
            self._runstate = new
            if new in _END_STATES:
                self._ended.set()
            for listener in list(self._listeners):
                try:
                    listener(old, new)
                except Exception:  # a broken listener must not wedge the machine
                    log.exception("run-state listener %r failed on %s -> %s", listener, old, new)

    def start(self) -> None:
        """Run the guest (from ``prelaunch`` or any state that may move to ``running``)."""
        if self.guest is None and self._runstate == RunState.PRELAUNCH:
            raise MachineError("no guest loaded: call load_guest() before start()")
        self.set_runstate(RunState.RUNNING)

    def pause(self, state: RunState | str = RunState.PAUSED) -> None:
        """Stop every vCPU at an instruction boundary (QMP ``stop``); a no-op unless running."""
        with self._transition_lock:
            if self._runstate == RunState.RUNNING:
                self.set_runstate(state)

    def resume(self) -> None:
        """Continue the guest (QMP ``cont``)."""
        self.set_runstate(RunState.RUNNING)

    cont = resume

    def shutdown(self, reason: str = "host-qmp-quit") -> None:
        """Stop the guest for good (QMP ``quit``); the machine can still be inspected."""
        with self._transition_lock:
            if self._runstate in _END_STATES:
                return
            if self.shutdown_reason is None:
                self.shutdown_reason = reason
            self.set_runstate(RunState.SHUTDOWN)

    def wait_for_end(self, timeout: float | None = None) -> bool:
        """Block until the guest ends (shutdown, internal error); False on time-out."""
        return self._ended.wait(timeout)

    # -- stopping and starting the vCPUs -------------------------------------------------------

    def _stop_vcpus(self) -> None:
        with self._cond:
            self._run_allowed = False
        for dev in self.devices:
            dev.vm_state_change(False)  # freezes the clock and wakes vCPUs sleeping in it
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while True:
            with self._cond:
                busy = [v for v in self.vcpus if not v.parked]
            if not busy:
                break
            if time.monotonic() > deadline:
                names = ", ".join(str(v.index) for v in busy)
                raise MachineError(f"vCPU {names} did not stop within {STOP_TIMEOUT_S} s")
            for vcpu in busy:
                vcpu.backend.stop()
            with self._cond:
                self._cond.wait(_KICK_INTERVAL_S)
        for vcpu in self.vcpus:
            clear = getattr(vcpu.backend, "clear_stop", None)
            if clear is not None:
                clear()

    def _start_vcpus(self) -> None:
        if self._code_stale:
            for vcpu in self.vcpus:
                vcpu.backend.flush_translations()
            self._code_stale = False
        for dev in self.devices:
            dev.vm_state_change(True)
        with self._cond:
            self._run_allowed = True
            self._cond.notify_all()

    @contextlib.contextmanager
    def quiesced(self) -> Iterator[None]:
        """Hold every vCPU at an instruction boundary without a run-state change (no STOP /
        RESUME): for host work that must not race a guest write, such as starting dirty
        logging (QEMU: ``pause_all_vcpus`` around internal work)."""
        with self._transition_lock:
            running = self._runstate == RunState.RUNNING
            if running:
                self._stop_vcpus()
            try:
                yield
            finally:
                if running:
                    self._start_vcpus()

    @contextlib.contextmanager
    def stopped_in(self, state: RunState) -> Iterator[RunState]:
        """Stop a running guest in run state ``state`` for the block and run it again after
        (QEMU: ``vm_stop_force_state`` ... ``vm_start``, as COLO's checkpoints do); a guest that
        was not running stays as it was. Yields the run state found. Other run-state changes
        (QMP ``stop``/``cont``) wait until the block ends, so none is undone by it."""
        with self._transition_lock:
            found = self._runstate
            if found == RunState.RUNNING:
                self.set_runstate(state)
            try:
                yield found
            finally:
                if found == RunState.RUNNING and self._runstate == state and not self._closed:
                    self.set_runstate(RunState.RUNNING)

    def invalidate_translations(self) -> None:
        """RAM was written from the host: retranslate guest code before it runs again."""
        self._code_stale = True

    # -- auto-converge throttling (QEMU: cpu-throttle.c) ---------------------------------------

    @property
    def throttle_percentage(self) -> int:
        return self._throttle_pct

    def set_throttle(self, percent: int) -> None:
        """Hold every vCPU back ``percent`` % of the time (0 stops throttling; at most 99).

        As QEMU does: every ``10 ms / (1 - p)`` each vCPU is stopped and parked for
        ``p / (1 - p) * 10 ms``, so it runs about ``1 - p`` of the time.
        """
        if not 0 <= percent <= 99:
            raise MachineError(f"CPU throttle {percent} % is outside 0..99")
        with self._cond:
            self._throttle_pct = percent
            if percent and self._throttle_thread is None:
                self._throttle_thread = threads.Thread(
                    target=self._throttle_loop, name="cpu-throttle", daemon=True
                )
                self._throttle_thread.start()
            self._cond.notify_all()

    def _throttle_loop(self) -> None:
        while True:
            with self._cond:
                pct = self._throttle_pct
                if not pct or self._closed:
                    self._throttle_thread = None
                    return
            # QEMU's cpu_throttle_timer_tick: park every vCPU now, then tick again a period
            # later. The first tick comes at once (cpu_throttle_set): waiting a period first
            # would give the guest up to a second unthrottled at 99 %.
            p = pct / 100
            if self._run_allowed:
                until = time.monotonic() + p / (1 - p) * THROTTLE_TIMESLICE_S
                with self._cond:
                    for vcpu in self.vcpus:
                        vcpu.throttle_until = until
                for vcpu in self.vcpus:
                    if not vcpu.parked:
                        vcpu.backend.stop()
            time.sleep(THROTTLE_TIMESLICE_S / (1 - p))

    # -- requests from the guest (on a vCPU thread) --------------------------------------------

    def _guest_poweroff(self, cpu: int, status: int) -> None:
        with self._cond:
            if self.exit_status is None:
                self.exit_status = status
            self._run_allowed = False  # every vCPU parks at its next boundary
        self.vcpus[cpu].backend.stop()
        self._end_from_guest(RunState.SHUTDOWN, "guest-shutdown")

    def _vcpu_halted(self, vcpu: VCPU) -> None:
        with self._cond:
            vcpu.halted = True
            all_halted = not any(v.runnable for v in self.vcpus)
        if all_halted:
            if self.exit_status is None:
                self.exit_status = 0
            self._end_from_guest(RunState.SHUTDOWN, "guest-halt")

    def _vcpu_failed(self, vcpu: VCPU, detail: str) -> None:
        with self._cond:
            vcpu.failed = True
            if self.error is None:
                self.error = detail
        log.error("guest error: %s", detail)
        self._end_from_guest(RunState.INTERNAL_ERROR, "guest-error")

    def _end_from_guest(self, state: RunState, reason: str) -> None:
        def end() -> None:
            with self._transition_lock:
                if self._runstate in _END_STATES or self._closed:
                    return
                if self.shutdown_reason is None:
                    self.shutdown_reason = reason
                try:
                    self.set_runstate(state)
                except MachineError as exc:
                    log.error("cannot end the guest run: %s", exc)

        threads.Thread(target=end, name=f"machine-{reason}", daemon=True).start()

    # -- the guest ---------------------------------------------------------------------------

    def load_guest(self, image: bytes, cmdline: str = "") -> GuestLayout:
        """Put a flat guest image and its boot arguments in RAM and point every vCPU at it."""
        with self._transition_lock:
            self._require_stopped("load a guest")
            self.guest = write_guest(self.ram_blocks, len(self.vcpus), image, cmdline)
            for vcpu in self.vcpus:
                vcpu.backend.set_state(entry_state(vcpu.backend.get_state(), vcpu.index))
                vcpu.halted = vcpu.failed = False
            self._code_stale = True
            return self.guest

    def _require_stopped(self, what: str) -> None:
        if self._runstate == RunState.RUNNING:
            raise MachineError(f"cannot {what} while the guest is running: pause it first")
        if self._closed:
            raise MachineError(f"cannot {what}: the machine is closed")

    # -- state --------------------------------------------------------------------------------

    def cpu_states(self) -> list[CPUState]:
        """Every vCPU's architectural state (the machine must not be running)."""
        with self._transition_lock:
            self._require_stopped("read CPU state")
            states = []
            for vcpu in self.vcpus:
                state = vcpu.backend.get_state()
                state.halted = vcpu.halted
                states.append(state)
            return states

    def load_cpu_states(self, states: Sequence[CPUState]) -> None:
        """Load one state per vCPU, in index order (the machine must not be running)."""
        with self._transition_lock:
            self._require_stopped("load CPU state")
            if len(states) != len(self.vcpus):
                raise MachineError(
                    f"CPU state for {len(states)} vCPUs given, this machine has "
                    f"{len(self.vcpus)} (start it with the same --smp)"
                )
            for vcpu, state in zip(self.vcpus, states, strict=True):
                if state.index != vcpu.index:
                    raise MachineError(
                        f"CPU state of vCPU {state.index} given for vCPU {vcpu.index}"
                    )
                vcpu.backend.set_state(state)
                vcpu.halted, vcpu.failed = state.halted, False
            # A guest whose state was loaded is a guest: start() may now run it.
            if self.guest is None:
                self.guest = GuestLayout(0, 0, self.ram_blocks[0].size, "")
            self._code_stale = True

    def device(self, idstr: str, instance_id: int = 0) -> Device:
        for dev in self.devices:
            if dev.idstr == idstr and dev.instance_id == instance_id:
                return dev
        raise MachineError(f"no device {idstr!r} instance {instance_id} in this machine")

    def save_state(self) -> MachineState:
        """CPU and device state of a stopped machine (RAM is read from ``ram_blocks``)."""
        with self._transition_lock:
            self._require_stopped("save state")
            return MachineState(
                cpus=self.cpu_states(),
                devices={dev.idstr: dev.save_state() for dev in self.devices},
            )

    def load_state(self, state: MachineState) -> None:
        """Load CPU and device state saved by ``save_state`` (RAM is loaded separately)."""
        with self._transition_lock:
            self._require_stopped("load state")
            for dev in self.devices:
                if dev.idstr not in state.devices:
                    raise MachineError(f"saved state has no device {dev.idstr!r}")
            self.load_cpu_states(state.cpus)
            for dev in self.devices:
                dev.load_state(state.devices[dev.idstr])

    def load_ram_from(self, other: Machine) -> None:
        """Copy every RAM block of ``other`` into this machine's blocks of the same idstr."""
        with self._transition_lock:
            self._require_stopped("load RAM")
            for block in self.ram_blocks:
                src = other.ram_block(block.idstr)
                if src.size != block.size:
                    raise MachineError(
                        f"RAM block {block.idstr!r}: {src.size} bytes there, {block.size} here"
                    )
                block.array[:] = src.array
            self._code_stale = True

    # -- RAM access ---------------------------------------------------------------------------

    def ram_block(self, idstr: str) -> RAMBlock:
        for block in self.ram_blocks:
            if block.idstr == idstr:
                return block
        names = ", ".join(b.idstr for b in self.ram_blocks)
        raise MachineError(f"no RAM block {idstr!r} (this machine has {names})")

    def _locate(self, gpa: int, length: int) -> tuple[RAMBlock, int]:
        for block in self.ram_blocks:
            if block.contains(gpa, length):
                return block, gpa - block.gpa
        raise MachineError(f"guest range {gpa:#x}+{length:#x} is not inside one RAM block")

    def read_guest(self, gpa: int, length: int) -> memoryview:
        """A view of guest-physical memory (valid until the machine is closed)."""
        block, offset = self._locate(gpa, length)
        return block.view[offset : offset + length]

    def write_guest(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest-physical memory from the host (code there is retranslated)."""
        block, offset = self._locate(gpa, len(data))
        block.write(offset, data)
        self._code_stale = True

    # -- teardown -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the vCPUs, end their threads, release devices and RAM. Idempotent."""
        if self._closed:
            return
        with self._transition_lock:
            if self._runstate == RunState.RUNNING:
                self._stop_vcpus()
            self._closed = True
        for vcpu in self.vcpus:
            vcpu.join(STOP_TIMEOUT_S)
        for vcpu in self.vcpus:
            vcpu.backend.close()
        for dev in self.devices:
            dev.close()
        for block in self.ram_blocks:
            block.close()
        self._ended.set()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        blocks = ", ".join(repr(b) for b in self.ram_blocks)
        return f"Machine(smp={len(self.vcpus)}, runstate={self._runstate}, ram=[{blocks}])"
