"""Loading a flat guest image: the image, the BootInfo block and each vCPU's entry state.

The contract is ``abi.py``: the image at ``LOAD_ADDR`` of the first RAM block, ``BootInfo`` at
``BOOT_INFO_ADDR``, and every vCPU entering at the image's first byte with RDI = its index,
RSI = ``BOOT_INFO_ADDR`` and RSP = its own stack top, in 64-bit mode with SSE on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from livemig.errors import MachineError
from livemig.machine.abi import (
    BOOT_INFO,
    BOOT_INFO_ADDR,
    BOOT_MAGIC,
    CMDLINE_SIZE,
    HEAP_ALIGN,
    LOAD_ADDR,
    MAX_BLOCKS,
    MAX_CPUS,
    STACK_SIZE,
    STACK_TOP,
)
from livemig.machine.cpu import CPUState
from livemig.machine.ram import RAMBlock


@dataclass(frozen=True)
class GuestLayout:
    """Where things went: what the guest reads from BootInfo."""

    image_size: int
    heap_start: int
    heap_end: int
    cmdline: str


def _align_up(value: int, align: int) -> int:
    return -(-value // align) * align


def boot_info_bytes(
    blocks: Sequence[RAMBlock], ncpus: int, heap_start: int, heap_end: int, cmdline: str
) -> bytes:
    """The packed ``struct boot_info`` for these blocks and arguments."""
    raw_cmdline = cmdline.encode()
    if len(raw_cmdline) >= CMDLINE_SIZE:
        raise MachineError(
            f"boot arguments are {len(raw_cmdline)} bytes; at most {CMDLINE_SIZE - 1} fit"
        )
    regions: list[int] = []
    for block in blocks:
        regions += [block.gpa, block.size]
    regions += [0] * (2 * MAX_BLOCKS - len(regions))
    return BOOT_INFO.pack(
        BOOT_MAGIC, blocks[0].size, ncpus, len(blocks), heap_start, heap_end, *regions,
        raw_cmdline,
    )  # fmt: skip


def write_guest(
    blocks: Sequence[RAMBlock], ncpus: int, image: bytes, cmdline: str = ""
) -> GuestLayout:
    """Copy the image and BootInfo into RAM (the caller flushes translated code)."""
    if not 1 <= ncpus <= MAX_CPUS:
        raise MachineError(f"{ncpus} vCPUs: the guest ABI supports 1 to {MAX_CPUS}")
    block0 = blocks[0]
    heap_start = _align_up(LOAD_ADDR + len(image), HEAP_ALIGN)
    if not image:
        raise MachineError("the guest image is empty")
    if heap_start >= block0.size:
        raise MachineError(
            f"guest image of {len(image)} bytes does not fit in RAM block {block0.idstr!r} "
            f"of {block0.size} bytes with room for a heap (needs more than {heap_start})"
        )
    block0.write(LOAD_ADDR, image)
    block0.write(BOOT_INFO_ADDR, boot_info_bytes(blocks, ncpus, heap_start, block0.size, cmdline))
    return GuestLayout(len(image), heap_start, block0.size, cmdline)


def entry_state(base: CPUState, index: int) -> CPUState:
    """vCPU ``index``'s state at the guest's first instruction, from the backend's reset state."""
    state = CPUState(**{**base.__dict__, "index": index})
    state.regs = list(base.regs)
    state.set_reg("rdi", index)
    state.set_reg("rsi", BOOT_INFO_ADDR)
    state.set_reg("rsp", STACK_TOP - index * STACK_SIZE)
    state.rip = LOAD_ADDR
    state.rflags = 0x2
    state.halted = False
    return state
