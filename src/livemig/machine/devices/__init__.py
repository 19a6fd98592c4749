"""Port-I/O devices of the machine: serial console, guest clock, power port."""

from livemig.machine.devices.base import Device, PortIOBus
from livemig.machine.devices.clock import GuestClock
from livemig.machine.devices.power import PowerPort
from livemig.machine.devices.serial import Serial16550

__all__ = ["Device", "GuestClock", "PortIOBus", "PowerPort", "Serial16550"]
