"""The emulated x86-64 machine that livemig migrates.

RAM blocks (``RAMBlock``, named by ``idstr``, anonymous shared host memory), vCPUs (unicorn,
one thread each, behind the small ``CPUBackend`` interface), port-I/O devices whose state is
declared as typed fields (serial console, guest clock, power port), and QEMU's run states.
``abi`` is the contract with the guest programs.

Typical use::

    m = Machine(parse_ram_blocks("256M"), smp=2, serial="stdio")
    m.load_guest(image, "ws=64M rate=10000")
    m.start(); ...; m.pause()
    state = m.save_state()          # CPUs and devices; RAM is m.ram_blocks
    m2 = Machine(...same RAM and smp...); m2.load_ram_from(m); m2.load_state(state); m2.start()
"""

from livemig.machine import abi
from livemig.machine.chardev import (
    BufferChardev,
    Chardev,
    NullChardev,
    SocketChardev,
    StdioChardev,
    StreamChardev,
    open_chardev,
)
from livemig.machine.cpu import CPU_VMSD, CPUBackend, CPUState, SegmentCache
from livemig.machine.devices import Device, GuestClock, PortIOBus, PowerPort, Serial16550
from livemig.machine.loader import GuestLayout
from livemig.machine.machine import VCPU, Machine, MachineState
from livemig.machine.ram import (
    DEFAULT_IDSTR,
    RAMBlock,
    RAMBlockSpec,
    check_ram_blocks,
    parse_ram_blocks,
)
from livemig.machine.runstate import TRANSITIONS, RunState, check_transition, is_legal
from livemig.machine.unicorn_cpu import UnicornCPU

__all__ = [
    "CPU_VMSD",
    "DEFAULT_IDSTR",
    "TRANSITIONS",
    "VCPU",
    "BufferChardev",
    "CPUBackend",
    "CPUState",
    "Chardev",
    "Device",
    "GuestClock",
    "GuestLayout",
    "Machine",
    "MachineState",
    "NullChardev",
    "PortIOBus",
    "PowerPort",
    "RAMBlock",
    "RAMBlockSpec",
    "RunState",
    "SegmentCache",
    "Serial16550",
    "SocketChardev",
    "StdioChardev",
    "StreamChardev",
    "UnicornCPU",
    "abi",
    "check_ram_blocks",
    "check_transition",
    "is_legal",
    "open_chardev",
    "parse_ram_blocks",
]
