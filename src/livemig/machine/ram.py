"""Guest RAM: named RAM blocks backed by shared host memory, a memfd each (QEMU: RAMBlock).

Each block is one ``mmap(MAP_SHARED)`` of a ``memfd_create`` file (shmem, like QEMU's
``memory-backend-memfd``), made with libc directly, so that its host address is known and
stable: unicorn maps it into every vCPU with ``mem_map_ptr`` (all vCPUs see the same bytes), the
dirty tracker registers it with userfaultfd / PAGEMAP_SCAN, and the host side reads and writes
it through a ``memoryview`` or a numpy array without copies. The file descriptor (``fd``) is the
second way in that userfaultfd's minor mode needs: post-copy writes a received page into the
page cache with ``pwrite`` while the guest's mapping of it is still unmapped, then maps it
(``migration/postcopy_dest.py``). A second *mapping* would do too, but every page written through
it would count twice in the process's RSS. Where ``memfd_create`` is refused, a block is an
anonymous shared mapping (the same shmem without a name) and ``fd`` is None.

Blocks are laid out in guest-physical space in the order given: the first at 0, each further
one at the next ``BLOCK_ALIGN`` boundary after the previous one (``abi.py``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from livemig.errors import MachineError, UsageError
from livemig.machine.abi import BLOCK_ALIGN, MAX_BLOCKS, MIN_RAM, PAGE_SIZE
from livemig.units import format_size, parse_size

DEFAULT_IDSTR = "pc.ram"
_IDSTR_RE = re.compile(r"^[A-Za-z0-9_.:/-]{1,255}$")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MADV_POPULATE_WRITE = 23  # <linux/mman.h>, Linux 5.14: what ``prefault`` uses instead
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_MAP_FIXED = 0x10
_MFD_NOEXEC_SEAL = 0x0008  # <linux/memfd.h>, Linux 6.3


def _memfd(idstr: str, size: int) -> int | None:
    """A memfd of ``size`` bytes named after the block, or None where the kernel refuses one.

    MFD_NOEXEC_SEAL: guest RAM is never executed by the host (unicorn translates it), and
    Linux 6.3+ warns about a memfd made without saying so."""
    name = f"livemig:{idstr}"[:249]
    for flags in (os.MFD_CLOEXEC | _MFD_NOEXEC_SEAL, os.MFD_CLOEXEC):
        try:
            fd = os.memfd_create(name, flags)
        except (OSError, AttributeError):
            continue
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            return None
        return fd
    return None


@dataclass(frozen=True)
class RAMBlockSpec:
    """What the user asked for: a block name (``idstr``) and its size in bytes."""

    idstr: str
    size: int


def parse_ram_blocks(
    memory: str | int | None = None, ram_blocks: Iterable[str] = ()
) -> list[RAMBlockSpec]:
    """Turn ``--memory SIZE`` and ``--ram-block NAME=SIZE`` flags into block specs.

    ``--memory`` names the first block ``pc.ram`` (as QEMU's PC machine does); ``--ram-block``
    adds further named blocks. Without either, one 64 MiB ``pc.ram`` block.
    """
    specs: list[RAMBlockSpec] = []
    if memory is not None:
        specs.append(RAMBlockSpec(DEFAULT_IDSTR, parse_size(memory, "--memory")))
    for item in ram_blocks:
        name, sep, size = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--ram-block {item!r}: expected NAME=SIZE, e.g. extra.ram=64M")
        specs.append(RAMBlockSpec(name.strip(), parse_size(size, f"--ram-block {name}")))
    if not specs:
        specs.append(RAMBlockSpec(DEFAULT_IDSTR, 64 << 20))
    check_ram_blocks(specs)
    return specs


def check_ram_blocks(specs: Sequence[RAMBlockSpec]) -> None:
    """Refuse names, sizes and totals this machine cannot have, saying which block is wrong."""
    if not specs:
        raise UsageError("the machine needs at least one RAM block")
    if len(specs) > MAX_BLOCKS:
        raise UsageError(f"{len(specs)} RAM blocks given, at most {MAX_BLOCKS} are supported")
    seen: set[str] = set()
    for spec in specs:
        if not _IDSTR_RE.match(spec.idstr):
            raise UsageError(
                f"RAM block name {spec.idstr!r}: use 1-255 letters, digits and . _ : / -"
            )
        if spec.idstr in seen:
            raise UsageError(f"RAM block name {spec.idstr!r} given twice")
        seen.add(spec.idstr)
        if spec.size <= 0 or spec.size % PAGE_SIZE:
            raise UsageError(
                f"RAM block {spec.idstr!r}: size {spec.size} is not a positive multiple of "
                f"the {PAGE_SIZE}-byte page size"
            )
    if specs[0].size < MIN_RAM:
        raise UsageError(
            f"RAM block {specs[0].idstr!r}: the first block holds the guest image and needs at "
            f"least {format_size(MIN_RAM)}, got {format_size(specs[0].size)}"
        )
    total = sum(s.size for s in specs)
    limit = host_memory_limit()
    if total > limit:
        raise UsageError(
            f"RAM of {format_size(total)} is more than this host can give "
            f"({format_size(limit)} of memory and swap)"
        )


def host_memory_limit() -> int:
    """Bytes of RAM plus swap on this host: the most guest RAM that could ever be backed."""
    fields: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return fields.get("MemTotal", 0) + fields.get("SwapTotal", 0)


def layout(specs: Sequence[RAMBlockSpec]) -> list[int]:
    """Guest-physical address of each block: 0, then each next ``BLOCK_ALIGN`` boundary."""
    gpas, next_gpa = [], 0
    for spec in specs:
        gpas.append(next_gpa)
        next_gpa = -(-(next_gpa + spec.size) // BLOCK_ALIGN) * BLOCK_ALIGN
    return gpas


class RAMBlock:
    """One named region of guest RAM (QEMU: ``RAMBlock`` with ``idstr``, ``used_length``).

    ``host_addr`` is the address of the mapping in this process; ``view`` a writable
    ``memoryview`` of it; ``array`` a flat uint8 numpy array and ``pages`` a ``(npages, 4096)``
    one over the same bytes. After ``close()`` they read zeros.
    """

    def __init__(self, idstr: str, size: int, gpa: int = 0, *, prefault: bool = False) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise UsageError(f"RAM block {idstr!r}: size {size} is not a multiple of {PAGE_SIZE}")
        self.idstr = idstr
        self.size = size
        self.gpa = gpa
        self.fd: int | None = _memfd(idstr, size)
        flags = mmap.MAP_SHARED | _MAP_NORESERVE
        if self.fd is None:
            flags |= mmap.MAP_ANONYMOUS
        fd = -1 if self.fd is None else self.fd
        addr = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            if self.fd is not None:
                os.close(self.fd)
            raise MachineError(
                f"RAM block {idstr!r}: cannot map {format_size(size)} of host memory: "
                f"{os.strerror(err)}"
            )
        self.host_addr: int = addr
        self._buf = (ctypes.c_ubyte * size).from_address(addr)
        self.view = memoryview(self._buf).cast("B")
        self._closed = False
        if prefault:
            self._populate()

    def _populate(self) -> None:
        """Back every page now, mapped writable and already dirty, as QEMU's -mem-prealloc does
        (``MADV_POPULATE_WRITE``, Linux 5.14; before it, a written byte per page).

        ``MAP_POPULATE`` maps a shared mapping's pages by read faults: present, but with the
        dirty bit clear, so the first write to each page (an incoming migration's copy into
        it) makes the CPU set the bit on a page walk, costly under a hypervisor's nested
        paging. A loopback TCP receiver writing 1 GiB into such memory spent 0.43 s of
        system time against 0.29 once the pages were populated for writing."""
        if _libc.madvise(self.host_addr, self.size, _MADV_POPULATE_WRITE) == 0:
            return
        err = ctypes.get_errno()
        if err != errno.EINVAL:  # EINVAL: a kernel without it; anything else is a failure
            self.close()
            raise MachineError(f"RAM block {self.idstr!r}: cannot populate "
                               f"{format_size(self.size)} of host memory: {os.strerror(err)}")  # fmt: skip
        np.frombuffer(self._buf, np.uint8)[::PAGE_SIZE] = 0  # new memory is all zero already

    @property
    def npages(self) -> int:
        return self.size // PAGE_SIZE

    @property
    def pages(self) -> np.ndarray:
        """The block as a ``(npages, PAGE_SIZE)`` uint8 numpy array (no copy)."""
        return np.frombuffer(self._buf, dtype=np.uint8).reshape(self.npages, PAGE_SIZE)

    @property
    def array(self) -> np.ndarray:
        """The whole block as a flat uint8 numpy array (no copy)."""
        return np.frombuffer(self._buf, dtype=np.uint8)

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return bytes(self.view[offset : offset + length])

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Host-side write (loader, restore). Callers must flush translated code afterwards."""
        self._check(offset, len(data))
        self.view[offset : offset + len(data)] = data

    def _check(self, offset: int, length: int) -> None:
        if self._closed:
            raise MachineError(f"RAM block {self.idstr!r} is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise MachineError(
                f"RAM block {self.idstr!r}: range {offset:#x}+{length:#x} is outside its "
                f"{self.size:#x} bytes"
            )

    def close(self) -> None:
        """Give the guest memory back to the host.

        Views and numpy arrays taken from the block may outlive it (in a migration thread, a
        test), and touching unmapped memory would kill the process. So the range is not
        unmapped: fresh private zero pages are mapped over it instead, which frees the shared
        memory at once; a stale view then reads zeros. Only address space is kept.
        """
        if self._closed:
            return
        self._closed = True
        self.view.release()
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED
        addr = _libc.mmap(self.host_addr, self.size, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
        if addr != self.host_addr:  # could not replace it: unmapping is the only way left
            _libc.munmap(self.host_addr, self.size)
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)  # the last reference: the memory goes back to the host

    def __repr__(self) -> str:
        return f"RAMBlock({self.idstr!r}, size={format_size(self.size)}, gpa={self.gpa:#x})"
