"""Layouts of livemig's own sections that every decoder knows without being told.

A QEMU stream's device sections have no length prefix: a reader needs each one's field layout
(from the device, or the vmdesc trailer). The trailer comes last, so a section before the RAM
that a reader cannot lay out would stop it from decoding a stream prefix (a capture cut short,
a test's sink). ``x-machine`` (``savevm/machine_check.py``) and ``x-checksum``
(``savevm/checksum.py``, right after the first RAM unit) are such sections, so their layouts
live here and ``Decoder`` uses them when nothing else describes them. QEMU never sends them.
"""

from __future__ import annotations

from livemig import vmstate

MACHINE_IDSTR = "x-machine"
MACHINE_DEVICES_SIZE = 512  # "idstr/instance/version;..." as text, NUL-padded
MACHINE_VMSD = vmstate.vmsd(
    MACHINE_IDSTR, 1, [vmstate.u32("cpus"), vmstate.buffer("devices", MACHINE_DEVICES_SIZE)]
)

CHECKSUM_IDSTR = "x-checksum"
CHECKSUM_EXCLUDED_BYTES = 128  # a bit per data record of a unit (at most 1024)
CHECKSUM_VMSD = vmstate.vmsd(
    CHECKSUM_IDSTR, 1, [vmstate.u32("records"), vmstate.u64("digest"),
                        vmstate.buffer("excluded", CHECKSUM_EXCLUDED_BYTES)],
)  # fmt: skip

BUILTIN_LAYOUTS = {MACHINE_IDSTR: MACHINE_VMSD, CHECKSUM_IDSTR: CHECKSUM_VMSD}
