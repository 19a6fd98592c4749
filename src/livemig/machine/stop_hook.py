"""Stopping a unicorn vCPU exactly: the native block hook that every ``UnicornCPU`` carries.

Why this exists (the root cause of livemig issue #24). unicorn's ``uc_emu_stop`` from another
thread sets ``stop_request`` and calls ``cpu_exit``, which makes the vCPU's
``icount_decr`` negative. unicorn then notices the request in two kinds of places:

* at the start of every translation block (``gen_tb_start``), before any instruction of the
  block ran: rip is restored to the block's first instruction, an exact boundary;
* **after every guest load and store** (``check_exit_request`` emitted by
  ``tcg_gen_qemu_ld/st_*`` in unicorn's ``tcg/tcg-op.c``, meant for hooks and invalid memory
  accesses): the helper calls ``cpu_loop_exit_restore``, which rewinds rip to the start of
  the instruction that made the access, although that access (and everything before it in
  the instruction) already happened.

So a stop from another thread that lands between the load and the store of a read-modify-write
instruction (``add [mem], reg``, ``xor [mem], reg``, ``inc [mem]``, ...) lets the store through,
then rewinds rip, and the resumed vCPU executes the instruction again: the memory operand is
updated twice. The compute guest's ``block[i] ^= x`` is such an instruction; so is code all
over a Linux kernel. A four-instruction loop (``add qword [rbx], 1; inc rcx; mov [rbx+8], rcx;
jmp``) stopped from another thread every 0.1-2 ms drifted by 226 increments in 1,000 stops.
unicorn's tracker knows the class (issue #1355, "emu_stop is still not thread-safe"); the per
access check is there in unicorn 2.1.4 and on its master branch as of 2025-09.

The work-around keeps the stop on the vCPU's own thread, at a block start: a stopper only
raises a flag in a small C struct, and a ``UC_HOOK_BLOCK`` hook written in C
(``csrc/vcpu_stop.c``, built with the machine's compiler, cached like the guests) calls
``uc_emu_stop`` from the vCPU's thread when it sees the flag. unicorn syncs rip to the block's
address before calling the hook and then exits at the block-start check, before the block's
first instruction: an exact boundary. No request is ever pending while an instruction
executes, so the per-access check can never rewind a half-done one. A stop requested while the
vCPU is not in the emulator is not lost either: the first block of the next run stops.

Cost: one call per translation block, in C (no Python, no GIL): about 5 % on a
four-instruction loop, less on real code (``livemig bench machine`` measures it). A Python
block hook would have cost many times the guest's speed.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

from livemig import cbuild
from livemig.errors import BuildError, MachineError

SOURCE = Path(__file__).resolve().parent / "csrc" / "vcpu_stop.c"
HOOK_SYMBOL = "livemig_vcpu_stop_hook"
_LOADED: list[ctypes.CDLL] = []  # unicorn calls into these for the life of the process


class StopFlag(ctypes.Structure):
    """``struct livemig_vcpu_stop`` of ``csrc/vcpu_stop.c``: shared with the hook."""

    _fields_ = [
        ("requested", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
        ("emu_stop", ctypes.c_void_p),
        ("stops", ctypes.c_uint64),
    ]


def library_path(rebuild: bool = False) -> Path:
    """Build the hook's shared library (cached) and return its path."""
    try:
        return cbuild.build_host_library("vcpu_stop", SOURCE, rebuild=rebuild)
    except BuildError as exc:
        raise MachineError(f"cannot build the vCPU stop hook: {exc}") from exc


@functools.lru_cache(maxsize=1)
def hook_address() -> int:
    """The address of the C hook, building and loading the library on first use."""
    lib = ctypes.CDLL(str(library_path()))
    _LOADED.append(lib)
    return ctypes.cast(getattr(lib, HOOK_SYMBOL), ctypes.c_void_p).value or 0
