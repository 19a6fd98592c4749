"""The machine's command-line flags, shared by every command that builds a machine.

``livemig run`` and the migration commands all take the same ``--memory``, ``--ram-block``,
``--smp``, ``--prefault`` and ``--serial``; declaring them once here keeps the spelling, the
defaults and the error messages the same everywhere.
"""

from __future__ import annotations

import argparse

from livemig.machine.chardev import Chardev
from livemig.machine.machine import Machine
from livemig.machine.ram import parse_ram_blocks


def add_machine_arguments(parser: argparse.ArgumentParser, *, serial: str = "stdio") -> None:
    """Add the machine flags to ``parser`` (``serial`` is the default console back-end)."""
    group = parser.add_argument_group("machine")
    group.add_argument(
        "--memory", "-m", metavar="SIZE", default=None,
        help="size of the main RAM block pc.ram, e.g. 512M, 1G (default 64M)",
    )  # fmt: skip
    group.add_argument(
        "--ram-block", metavar="NAME=SIZE", action="append", default=[],
        help="an extra RAM block with this idstr and size (repeatable)",
    )  # fmt: skip
    group.add_argument("--smp", type=int, default=1, metavar="N", help="number of vCPUs")
    group.add_argument(
        "--prefault", action="store_true", help="populate guest RAM before the guest starts"
    )
    group.add_argument(
        "--serial", metavar="BACKEND", default=serial,
        help="console: stdio, null, file:PATH or unix:PATH (default %(default)s)",
    )  # fmt: skip


def machine_from_args(args: argparse.Namespace, *, serial: Chardev | str | None = None) -> Machine:
    """Build the machine the flags describe; ``serial`` overrides ``--serial``."""
    ram = parse_ram_blocks(args.memory, args.ram_block)
    return Machine(
        ram,
        args.smp,
        serial=serial if serial is not None else args.serial,
        prefault=args.prefault,
    )
