"""A 16550-style UART at COM1 (QEMU: hw/char/serial.c), wired to a chardev back-end.

Register map (offset from ``SERIAL_BASE``; DLAB is LCR bit 7)::

    +0  read: RBR (receive buffer)     write: THR (transmit)       DLAB: divisor low
    +1  IER (interrupt enable)                                     DLAB: divisor high
    +2  read: IIR (no interrupts here)  write: FCR (FIFO control)
    +3  LCR   +4 MCR   +5 LSR (bit 0 data ready, bits 5-6 transmitter empty)   +6 MSR   +7 SCR

The machine has no interrupt controller, so the guest polls LSR; transmission is instantaneous
(THR is always empty). Received bytes wait in a 16-byte FIFO, refilled from a host-side queue
as the guest reads. Beside the UART, ``CONSOLE_LOCK_PORT`` is a lock the guest runtime holds
while it prints a line (see ``_console_acquire``). The migrated state is QEMU's field list for
the serial device, plus the ``serial/recv_fifo`` subsection (QEMU's name) when the FIFO holds bytes.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, ClassVar

from livemig import vmstate as vs
from livemig.machine.abi import CONSOLE_LOCK_PORT, SERIAL_BASE
from livemig.machine.chardev import Chardev
from livemig.machine.devices.base import Device

FIFO_SIZE = 16
LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40
IIR_NO_INT = 0x01
IIR_FIFO_ENABLED = 0xC0
FCR_FIFO_ENABLE = 0x01
FCR_RX_RESET = 0x02
LCR_DLAB = 0x80
MSR_DEFAULT = 0xB0  # DCD, DSR and CTS asserted: a terminal is attached

FIFO8_VMSD = vs.vmsd("Fifo8", 1, [vs.buffer("data", FIFO_SIZE), vs.u32("head"), vs.u32("num")])
RECV_FIFO_VMSD = vs.vmsd("serial/recv_fifo", 1, [vs.struct_field("recv_fifo", FIFO8_VMSD)])


class Serial16550(Device):
    """COM1, polled, with a receive FIFO."""

    idstr: ClassVar[str] = "serial"
    ports: ClassVar[tuple[range, ...]] = (
        range(SERIAL_BASE, SERIAL_BASE + 8),
        range(CONSOLE_LOCK_PORT, CONSOLE_LOCK_PORT + 1),
    )
    vmsd = vs.vmsd(
        "serial",
        3,
        [
            vs.u16("divider"),
            vs.u8("rbr"),
            vs.u8("ier"),
            vs.u8("iir"),
            vs.u8("lcr"),
            vs.u8("mcr"),
            vs.u8("lsr"),
            vs.u8("msr"),
            vs.u8("scr"),
            vs.u8("fcr_vmstate"),
        ],
        minimum_version_id=2,
        subsections=[RECV_FIFO_VMSD],
    )

    def __init__(self, chardev: Chardev) -> None:
        self.divider = 12  # 9600 baud, the PC BIOS default
        self.rbr = 0
        self.ier = 0
        self.iir = IIR_NO_INT
        self.lcr = 0x03  # 8N1
        self.mcr = 0
        self.lsr = LSR_THRE | LSR_TEMT
        self.msr = MSR_DEFAULT
        self.scr = 0
        self.fcr_vmstate = 0
        self._fifo: deque[int] = deque()
        self._pending: deque[int] = deque()  # host bytes not yet in the FIFO
        self._lock = threading.Lock()
        self._console_owner: int | None = None  # vCPU holding CONSOLE_LOCK_PORT
        self.chardev = chardev
        chardev.set_input_handler(self.receive)

    # -- host side ----------------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Bytes typed on the back-end (called from its thread)."""
        with self._lock:
            self._pending.extend(data)
            self._refill()

    def _refill(self) -> None:
        while self._pending and len(self._fifo) < FIFO_SIZE:
            self._fifo.append(self._pending.popleft())
        self._update_lsr()

    def _update_lsr(self) -> None:
        self.lsr = (self.lsr & ~LSR_DR) | (LSR_DR if self._fifo else 0)

    # -- guest side ---------------------------------------------------------------------------

    def _console_acquire(self, cpu: int) -> int:
        """The console lock: guest memory atomics are not atomic between vCPUs here (each runs
        in its own emulator instance), so the runtime takes its print lock from the device.
        Not migrated (QEMU's serial fields stay as they are): a line being printed across a
        switch-over can at worst interleave with another vCPU's once."""
        with self._lock:
            if self._console_owner is None or self._console_owner == cpu:
                self._console_owner = cpu
                return 0
            return 1

    def io_read(self, cpu: int, port: int, size: int) -> int:
        if port == CONSOLE_LOCK_PORT:
            return self._console_acquire(cpu)
        off = port - SERIAL_BASE
        with self._lock:
            dlab = self.lcr & LCR_DLAB
            if off == 0:
                if dlab:
                    return self.divider & 0xFF
                if self._fifo:
                    self.rbr = self._fifo.popleft()
                    self._refill()
                return self.rbr
            if off == 1:
                return (self.divider >> 8) if dlab else self.ier
            if off == 2:
                return self.iir
            if off == 5:
                self._update_lsr()
                return self.lsr
            return {3: self.lcr, 4: self.mcr, 6: self.msr, 7: self.scr}[off]

    def io_write(self, cpu: int, port: int, size: int, value: int) -> None:
        if port == CONSOLE_LOCK_PORT:
            with self._lock:
                if self._console_owner == cpu:
                    self._console_owner = None
            return
        off = port - SERIAL_BASE
        value &= 0xFF
        if off == 0 and not self.lcr & LCR_DLAB:
            self.chardev.write(bytes((value,)))
            return
        with self._lock:
            if off == 0:
                self.divider = (self.divider & 0xFF00) | value
            elif off == 1:
                if self.lcr & LCR_DLAB:
                    self.divider = (self.divider & 0x00FF) | (value << 8)
                else:
                    self.ier = value & 0x0F
            elif off == 2:
                self._write_fcr(value)
            elif off == 3:
                self.lcr = value
            elif off == 4:
                self.mcr = value & 0x1F
            elif off == 7:
                self.scr = value

    def _write_fcr(self, value: int) -> None:
        if value & FCR_RX_RESET:
            self._fifo.clear()
            self._update_lsr()
        self.fcr_vmstate = value & 0xC9
        self.iir = IIR_NO_INT | (IIR_FIFO_ENABLED if value & FCR_FIFO_ENABLE else 0)

    # -- state --------------------------------------------------------------------------------

    def save_state(self) -> dict[str, Any]:
        with self._lock:
            values = super().save_state()
            if self._fifo:
                data = bytes(self._fifo).ljust(FIFO_SIZE, b"\0")
                values[RECV_FIFO_VMSD.name] = {
                    "recv_fifo": {"data": data, "head": 0, "num": len(self._fifo)}
                }
        return values

    def load_state(self, values: dict[str, Any]) -> None:
        with self._lock:
            super().load_state(values)
            self._fifo.clear()
            sub = values.get(RECV_FIFO_VMSD.name)
            if sub is not None:
                fifo = sub["recv_fifo"]
                data, head = fifo["data"], fifo["head"]
                num = min(fifo["num"], FIFO_SIZE)
                self._fifo.extend(data[(head + i) % FIFO_SIZE] for i in range(num))
            self._refill()

    def close(self) -> None:
        self.chardev.set_input_handler(None)
        self.chardev.close()
