"""The contract between the machine and the guest programs that run on it.

Everything a guest may rely on when it starts, and every port it may talk to. The C side of
this contract lives in ``livemig/guests/src/livemig.h``; keep the two in step.

Guest-physical memory (the first RAM block is mapped at address 0; further blocks follow, each
aligned to ``BLOCK_ALIGN``)::

    0x0000_0000  unused (null page stays unmapped-by-convention: never written)
    0x0000_1000  BootInfo, written by the machine before the first instruction
    0x0000_2000  GuestReport, written by the guest (e.g. memstress publishes its layout)
    0x0001_0000  request/response ring of the livemig-ring device, RING_SIZE bytes
                 (layout in livemig/machine/devices/ring.py and guests/src/ring.h)
    0x0008_0000  vCPU stacks, STACK_SIZE each, growing down from STACK_TOP - cpu*STACK_SIZE
    0x0010_0000  the guest image (flat binary), entry point at its first byte
    heap_start   first byte after the image, rounded up to 1 MiB; heap_end = end of block 0

On entry each vCPU has RDI = its index, RSI = BOOT_INFO_ADDR, RSP = its stack top, 64-bit long
mode, flat segments, SSE enabled.
"""

from __future__ import annotations

import struct

PAGE_SIZE = 4096
BOOT_INFO_ADDR = 0x1000
GUEST_REPORT_ADDR = 0x2000
STACK_TOP = 0x100000
STACK_SIZE = 0x10000
MAX_CPUS = 8
LOAD_ADDR = 0x100000
HEAP_ALIGN = 0x100000
BLOCK_ALIGN = 0x200000
MIN_RAM = 4 * 1024 * 1024

# I/O ports
SERIAL_BASE = 0x3F8  # 16550 UART, COM1: THR/RBR at +0, LSR at +5 (bit 5 THR empty, bit 0 data)
POWER_PORT = 0x501  # out: the guest exits with this status (any width)
CLOCK_PORT_LO = 0x510  # in 32: latch guest clock (ns) and return its low half
CLOCK_PORT_HI = 0x514  # in 32: high half of the value latched by the last CLOCK_PORT_LO read
SLEEP_PORT = 0x518  # out 32: sleep this many microseconds (host-side; a pause wakes it)
RING_DOORBELL_PORT = 0x520  # out 32: responses were produced: the device drains them now
RING_WAIT_PORT = 0x524  # in 32: wait (bounded) for a request; returns how many are ready
RING_SPACE_PORT = 0x528  # in 32: wait (bounded) for a free response slot; returns how many
RING_SETUP_PORT = 0x52C  # out 32: 1 = the guest initialised the ring header, 2 = ring touched
CONSOLE_LOCK_PORT = 0x530  # in 32: 0 = this vCPU now holds the console lock, 1 = held by
# another; out: release it (the serial device's; whole lines from several vCPUs)

RING_ADDR = 0x10000  # the ring area, below the vCPU stacks
RING_SIZE = 0x70000

BOOT_MAGIC = 0x4749_4D45_5649_4C  # "LIVEMIG" little-endian
REPORT_MAGIC = 0x5452_4F50_4552_4D4C  # "LMREPORT" little-endian
CMDLINE_SIZE = 1024
MAX_BLOCKS = 8

# struct boot_info (little-endian, as the guest reads it):
#   u64 magic; u64 ram_size (block 0); u32 ncpus; u32 nblocks; u64 heap_start; u64 heap_end;
#   struct { u64 gpa; u64 size; } blocks[MAX_BLOCKS]; char cmdline[CMDLINE_SIZE];
BOOT_INFO = struct.Struct(f"<QQIIQQ{2 * MAX_BLOCKS}Q{CMDLINE_SIZE}s")

# struct guest_report (little-endian, written by the guest):
#   u64 magic; u64 kind (1 = memstress); u64 ws_start (gpa); u64 ws_pages; u64 nslices;
#   u64 passes[MAX_CPUS] (completed passes per vCPU)
GUEST_REPORT = struct.Struct(f"<QQQQQ{MAX_CPUS}Q")
REPORT_KIND_MEMSTRESS = 1
