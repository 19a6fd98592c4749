"""RAM blocks: parsing the user's sizes, layout, host memory shared with the vCPUs."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from livemig.errors import UsageError
from livemig.machine.abi import BLOCK_ALIGN, PAGE_SIZE
from livemig.machine.ram import RAMBlock, RAMBlockSpec, host_memory_limit, layout, parse_ram_blocks


def test_memory_flag_names_pc_ram() -> None:
    assert parse_ram_blocks("512M") == [RAMBlockSpec("pc.ram", 512 << 20)]


def test_several_blocks() -> None:
    specs = parse_ram_blocks("16M", ["extra=8M", "vga.vram=4K"])
    assert [s.idstr for s in specs] == ["pc.ram", "extra", "vga.vram"]
    assert [s.size for s in specs] == [16 << 20, 8 << 20, 4096]
    gpas = layout(specs)
    assert gpas[0] == 0 and gpas[1] == 16 << 20
    assert gpas[2] == gpas[1] + max(8 << 20, BLOCK_ALIGN)
    assert all(g % BLOCK_ALIGN == 0 for g in gpas)


@pytest.mark.parametrize(
    ("memory", "blocks", "message"),
    [
        ("8M+1", (), "cannot parse"),
        (8 * 1024 * 1024 + 512, (), "multiple of the 4096-byte page size"),
        ("1M", (), "at least 4.0 MiB"),
        ("8M", ("extra",), "expected NAME=SIZE"),
        ("8M", ("pc.ram=4M",), "given twice"),
        ("8M", ("bad name=4M",), "letters, digits"),
        ("8M", ("x=6000",), "multiple of the 4096-byte page size"),
    ],
)
def test_bad_sizes_are_refused(memory: object, blocks: tuple[str, ...], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_ram_blocks(memory, blocks)  # type: ignore[arg-type]


def test_more_than_the_host_has_is_refused() -> None:
    too_big = (host_memory_limit() // PAGE_SIZE + 1) * PAGE_SIZE
    with pytest.raises(UsageError, match="more than this host can give"):
        parse_ram_blocks(too_big)


def test_block_views_share_host_memory() -> None:
    block = RAMBlock("test.ram", 4 * PAGE_SIZE, prefault=True)
    try:
        assert block.host_addr % PAGE_SIZE == 0 and block.npages == 4
        block.write(PAGE_SIZE + 8, b"\x11\x22")
        assert block.pages[1, 8] == 0x11 and block.array[PAGE_SIZE + 9] == 0x22
        block.array[0:4] = np.frombuffer(b"abcd", np.uint8)
        assert bytes(block.view[0:4]) == b"abcd" == block.read(0, 4)
        with pytest.raises(Exception, match="outside"):
            block.read(4 * PAGE_SIZE - 1, 2)
    finally:
        block.close()


def _present(block: RAMBlock) -> int:
    """How many of ``block``'s pages are backed (``/proc/self/pagemap`` bit 63)."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(block.host_addr // PAGE_SIZE * 8)
        entries = np.frombuffer(f.read(block.npages * 8), np.uint64)
    return int(np.count_nonzero(entries >> np.uint64(63)))


@pytest.mark.parametrize("advice", [True, False])
def test_prefault_backs_every_page(advice: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``prefault`` backs all of a block at once, populated for writing (as QEMU's
    -mem-prealloc); on a kernel without MADV_POPULATE_WRITE by writing a zero per page."""
    from livemig.machine import ram

    if not advice:
        monkeypatch.setattr(ram, "_MADV_POPULATE_WRITE", -1)  # refused with EINVAL
    block = RAMBlock("test.ram", 64 * PAGE_SIZE, prefault=True)
    lazy = RAMBlock("lazy.ram", 64 * PAGE_SIZE)
    try:
        assert _present(block) == 64
        assert _present(lazy) == 0
        assert not block.array.any()
    finally:
        block.close()
        lazy.close()


def test_a_block_is_a_memfd_or_anonymous_shared_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    # A memfd gives post-copy its second way into the page cache (minor faults); where
    # memfd_create is refused the block is anonymous shared memory, fd None, and works the same.
    b = RAMBlock("pc.ram", 64 * PAGE_SIZE)
    assert b.fd is not None and os.fstat(b.fd).st_size == 64 * PAGE_SIZE
    b.write(PAGE_SIZE, b"abc")
    assert os.pread(b.fd, 3, PAGE_SIZE) == b"abc"  # the same pages through the file
    fd = b.fd
    b.close()
    with pytest.raises(OSError):
        os.fstat(fd)

    def refused(*_args: object) -> int:
        raise OSError(errno.ENOSYS, "no memfd here")

    monkeypatch.setattr(os, "memfd_create", refused)
    a = RAMBlock("pc.ram", 64 * PAGE_SIZE, prefault=True)
    assert a.fd is None
    a.write(PAGE_SIZE, b"xyz")
    assert a.read(PAGE_SIZE, 3) == b"xyz" and not a.array[:PAGE_SIZE].any()
    a.close()
