"""Layouts of livemig's own sections that every decoder knows without being told.

A QEMU stream's device sections have no length prefix: a reader needs each one's field layout
(from the device, or the vmdesc trailer). The trailer comes last, so a section before the RAM
that a reader cannot lay out would stop it from decoding a stream prefix (a capture cut short,
a test's sink). ``x-machine`` (``savevm/machine_check.py``) is such a section, so its layout
lives here and ``Decoder`` uses it when nothing else describes it. QEMU never sends it.
"""

from __future__ import annotations

from livemig import vmstate

MACHINE_IDSTR = "x-machine"
MACHINE_DEVICES_SIZE = 512  # "idstr/instance/version;..." as text, NUL-padded
MACHINE_VMSD = vmstate.vmsd(
    MACHINE_IDSTR, 1, [vmstate.u32("cpus"), vmstate.buffer("devices", MACHINE_DEVICES_SIZE)]
)

BUILTIN_LAYOUTS = {MACHINE_IDSTR: MACHINE_VMSD}
