"""Numbers of QEMU's migration stream, named as QEMU names them (reference §3-§8)."""

from __future__ import annotations

import enum

QEVM_MAGIC = 0x5145564D  # "QEVM"
QEVM_VERSION = 3
TARGET_PAGE_SIZE = 4096

# Top-level record type bytes (QEMU_VM_*).
QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_START = 0x01
QEMU_VM_SECTION_PART = 0x02
QEMU_VM_SECTION_END = 0x03
QEMU_VM_SECTION_FULL = 0x04
QEMU_VM_SUBSECTION = 0x05
QEMU_VM_VMDESCRIPTION = 0x06
QEMU_VM_CONFIGURATION = 0x07
QEMU_VM_COMMAND = 0x08
QEMU_VM_SECTION_FOOTER = 0x7E

# RAM record flags (RAM_SAVE_FLAG_*), in the low bits of the page-aligned record word.
RAM_SAVE_FLAG_FULL = 0x001
RAM_SAVE_FLAG_ZERO = 0x002
RAM_SAVE_FLAG_MEM_SIZE = 0x004
RAM_SAVE_FLAG_PAGE = 0x008
RAM_SAVE_FLAG_EOS = 0x010
RAM_SAVE_FLAG_CONTINUE = 0x020
RAM_SAVE_FLAG_XBZRLE = 0x040
RAM_SAVE_FLAG_HOOK = 0x080
RAM_SAVE_FLAG_COMPRESS_PAGE = 0x100
RAM_SAVE_FLAG_MULTIFD_FLUSH = 0x200
# Every flag lives below the smallest possible target page size.
RAM_FLAGS_MASK = 0x3FF

ENCODING_FLAG_XBZRLE = 0x01

RAM_IDSTR = "ram"
RAM_VERSION = 4

# QEMU's cap on a PACKAGED blob (MAX_VM_CMD_PACKAGED_SIZE).
MAX_PACKAGED_SIZE = 1 << 24
# Return-path messages larger than this are refused by the source.
MAX_RP_PAYLOAD = 512
RECV_BITMAP_ENDING = 0x0123456789ABCDEF
# POSTCOPY_RAM_DISCARD batching limit of QEMU's source.
MAX_DISCARDS_PER_COMMAND = 12


class Command(enum.IntEnum):
    """MIG_CMD_*: the command numbers after a 0x08 type byte."""

    INVALID = 0
    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10
    SWITCHOVER_START = 11


class ReturnPathType(enum.IntEnum):
    """MIG_RP_MSG_*: destination -> source message types."""

    INVALID = 0
    SHUT = 1
    PONG = 2
    REQ_PAGES_ID = 3
    REQ_PAGES = 4
    RECV_BITMAP = 5
    RESUME_ACK = 6
    SWITCHOVER_ACK = 7
    # livemig's own (far from QEMU's numbers): the reason the destination failed, sent before
    # SHUT(1) and only to a source that announced it reads it (X_FEATURES_PING): a QEMU source
    # never announces it, so it never receives one.
    X_ERROR = 0x4C01
    # livemig's own: a COLO message from a standby (QEMU writes them as bare words on the return
    # path; livemig frames them, so they mix with the other messages). Sent only after the
    # source's stream enabled COLO (ENABLE_COLO) and announced X_FEATURES_PING.
    X_COLO = 0x4C02


# A PING value no QEMU source sends: a livemig source sends it after OPEN_RETURN_PATH to say
# that it reads X_ERROR. Any destination answers a PING with PONG (QEMU's too), so the stream
# stays one a QEMU destination loads.
X_FEATURES_PING = 0x4C4D0001
# A PING a livemig source sends right before the post-copy switch and waits for the PONG of
# while its guest still runs: the destination has then read everything sent before it
# (migration/source.py, ``_drain``). Any destination answers it; it means nothing more.
X_DRAIN_PING = 0x4C4D0002


# Capability names that change the byte layout of the stream.
CAP_X_IGNORE_SHARED = "x-ignore-shared"
CAP_POSTCOPY_RAM = "postcopy-ram"
CAP_MAPPED_RAM = "mapped-ram"
