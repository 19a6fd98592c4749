"""A minimal unicorn machine for testing guest images on their own, without livemig.machine.

It implements just the guest ABI (abi.py): RAM shared by every vCPU at address 0, the image
at LOAD_ADDR, BootInfo, and the ports (serial, power, clock, sleep). vCPUs run round-robin
on the calling thread, a bounded number of instructions at a time, so between two slices the
whole machine is stopped at instruction boundaries: exactly what the memstress invariant
needs. Guest time is host monotonic time; a sleeping vCPU is skipped until its deadline.
"""

from __future__ import annotations

import ctypes
import mmap
import time

from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_64, UC_PROT_ALL, Uc
from unicorn.x86_const import (
    UC_X86_INS_IN,
    UC_X86_INS_OUT,
    UC_X86_REG_RDI,
    UC_X86_REG_RIP,
    UC_X86_REG_RSI,
    UC_X86_REG_RSP,
)

from livemig.machine import abi

_NOWHERE = 0xFFFF_FFFF_FFFF_FFF0


class HarnessCPU:
    def __init__(self, harness: Harness, index: int, host_addr: int, ram: int) -> None:
        self.index = index
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.uc.mem_map_ptr(0, ram, UC_PROT_ALL, host_addr)
        self.uc.reg_write(UC_X86_REG_RIP, abi.LOAD_ADDR)
        self.uc.reg_write(UC_X86_REG_RDI, index)
        self.uc.reg_write(UC_X86_REG_RSI, abi.BOOT_INFO_ADDR)
        self.uc.reg_write(UC_X86_REG_RSP, abi.STACK_TOP - index * abi.STACK_SIZE)
        self.uc.hook_add(UC_HOOK_INSN, self._in, None, 1, 0, UC_X86_INS_IN)
        self.uc.hook_add(UC_HOOK_INSN, self._out, None, 1, 0, UC_X86_INS_OUT)
        self.harness = harness
        self.latched = 0
        self.sleep_until = 0

    def _in(self, uc: Uc, port: int, size: int, _user: object) -> int:
        if port == abi.SERIAL_BASE + 5:
            return 0x60  # THR empty, transmitter idle
        if port == abi.CLOCK_PORT_LO:
            self.latched = self.harness.clock_ns()
            return self.latched & 0xFFFF_FFFF
        if port == abi.CLOCK_PORT_HI:
            return self.latched >> 32
        return 0

    def _out(self, uc: Uc, port: int, size: int, value: int, _user: object) -> None:
        if port == abi.SERIAL_BASE:
            self.harness.output.append(value & 0xFF)
        elif port == abi.POWER_PORT:
            self.harness.exit_status = value
            uc.emu_stop()
        elif port == abi.SLEEP_PORT:
            self.sleep_until = self.harness.clock_ns() + value * 1000
            uc.emu_stop()

    def run(self, count: int) -> None:
        rip = self.uc.reg_read(UC_X86_REG_RIP)
        self.uc.emu_start(rip, _NOWHERE, count=count)


class Harness:
    """``Harness(image, cmdline, ram=..., ncpus=...)``; ``run_for(seconds)``, ``read(gpa, n)``."""

    def __init__(
        self, image: bytes, cmdline: str = "", *, ram: int = 8 << 20, ncpus: int = 1
    ) -> None:
        self.mem = mmap.mmap(-1, ram)
        self._anchor = ctypes.c_char.from_buffer(self.mem)
        host_addr = ctypes.addressof(self._anchor)
        heap_start = -(-(abi.LOAD_ADDR + len(image)) // abi.HEAP_ALIGN) * abi.HEAP_ALIGN
        self.mem[abi.LOAD_ADDR : abi.LOAD_ADDR + len(image)] = image
        blocks = [0, ram] + [0] * (2 * abi.MAX_BLOCKS - 2)
        info = abi.BOOT_INFO.pack(
            abi.BOOT_MAGIC, ram, ncpus, 1, heap_start, ram, *blocks, cmdline.encode()
        )
        self.mem[abi.BOOT_INFO_ADDR : abi.BOOT_INFO_ADDR + len(info)] = info
        self.output = bytearray()
        self.exit_status: int | None = None
        self._t0 = time.monotonic_ns()
        self.cpus = [HarnessCPU(self, i, host_addr, ram) for i in range(ncpus)]

    def clock_ns(self) -> int:
        return time.monotonic_ns() - self._t0

    def read(self, gpa: int, length: int) -> memoryview:
        return memoryview(self.mem)[gpa : gpa + length]

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    def step(self, count: int = 20_000) -> None:
        """Give every awake vCPU one slice of at most ``count`` instructions."""
        now = self.clock_ns()
        awake = [c for c in self.cpus if c.sleep_until <= now]
        if not awake:
            wake = min(c.sleep_until for c in self.cpus)
            time.sleep(min(max(wake - now, 0) / 1e9, 0.05))
            return
        for cpu in awake:
            if self.exit_status is not None:
                return
            cpu.run(count)

    def run_for(self, seconds: float, count: int = 20_000) -> None:
        """Run until the guest exits or ``seconds`` of host time have passed."""
        deadline = time.monotonic() + seconds
        while self.exit_status is None and time.monotonic() < deadline:
            self.step(count)

    def run_until(self, predicate, timeout: float, count: int = 20_000) -> bool:  # type: ignore[no-untyped-def]
        """Run until ``predicate()`` holds (True), the guest exits or time runs out (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            if self.exit_status is not None:
                return bool(predicate())
            self.step(count)
        return bool(predicate())
