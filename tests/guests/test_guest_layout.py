"""The C headers agree with abi.py (and memstress.h with memstress.py), checked by the compiler.

The structs' offsets are turned into ``_Static_assert``s generated from the Python
``struct.Struct`` formats, so a field added, removed or resized on either side fails the build.
"""

from __future__ import annotations

import re
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from guest_helpers import Boot

from livemig import guests
from livemig.guests import build_guest, memstress
from livemig.guests.build import SRC_DIR, find_compiler
from livemig.machine import abi

# (C field, struct format code) in declaration order; joined they must equal abi's format.
BOOT_INFO_FIELDS = [
    ("magic", "Q"),
    ("ram_size", "Q"),
    ("ncpus", "I"),
    ("nblocks", "I"),
    ("heap_start", "Q"),
    ("heap_end", "Q"),
    ("blocks", f"{2 * abi.MAX_BLOCKS}Q"),
    ("cmdline", f"{abi.CMDLINE_SIZE}s"),
]
GUEST_REPORT_FIELDS = [
    ("magic", "Q"),
    ("kind", "Q"),
    ("ws_start", "Q"),
    ("ws_pages", "Q"),
    ("nslices", "Q"),
    ("passes", f"{abi.MAX_CPUS}Q"),
]
MEMSTRESS_INFO_FIELDS = [
    ("magic", "Q"),
    ("seed", "Q"),
    ("rate", "Q"),
    ("filled", f"{abi.MAX_CPUS}Q"),
    ("comp", "Q"),
]


def _defines(header: str) -> dict[str, int]:
    out = {}
    for name, value in re.findall(
        r"^#define\s+(\w+)\s+\(?([0-9A-Fa-fx]+)U?L?\)?\s*(?:/\*.*)?$",
        (SRC_DIR / header).read_text(),
        re.M,
    ):
        out[name] = int(value, 0)
    return out


def test_header_constants_match_abi() -> None:
    defines = _defines("livemig.h")
    abi_ints = {k: v for k, v in vars(abi).items() if k.isupper() and isinstance(v, int)}
    assert set(abi_ints) <= set(defines), f"missing in livemig.h: {set(abi_ints) - set(defines)}"
    for name, value in abi_ints.items():
        assert defines[name] == value, f"{name}: livemig.h has {defines[name]:#x}, abi {value:#x}"
    assert defines["REPORT_KIND_COMPUTE"] == guests.REPORT_KIND_COMPUTE
    assert defines["REPORT_KIND_IDLE"] == guests.REPORT_KIND_IDLE


def test_memstress_header_matches_checker() -> None:
    defines = _defines("memstress.h")
    assert defines["MEMSTRESS_INFO_MAGIC"] == memstress.MEMSTRESS_INFO_MAGIC
    assert defines["PATTERN_STEP"] == memstress.PATTERN_STEP
    assert defines["SEED_MULT"] == memstress.SEED_MULT
    assert "(GUEST_REPORT_ADDR + 0x200)" in (SRC_DIR / "memstress.h").read_text()
    assert memstress.MEMSTRESS_INFO_ADDR == abi.GUEST_REPORT_ADDR + 0x200


def _asserts(c_struct: str, fields: list[tuple[str, str]], layout: struct.Struct) -> list[str]:
    assert "<" + "".join(code for _, code in fields) == layout.format, c_struct
    lines, fmt = [], "<"
    for name, code in fields:
        off = struct.calcsize(fmt)
        lines.append(
            f"_Static_assert(offsetof(struct {c_struct}, {name}) == {off},"
            f' "{c_struct}.{name} is not at offset {off} as in Python");'
        )
        fmt += code
    lines.append(
        f"_Static_assert(sizeof(struct {c_struct}) == {layout.size},"
        f' "struct {c_struct} is not {layout.size} bytes as in Python");'
    )
    return lines


def _compile_asserts(tmp_path: Path, lines: list[str]) -> subprocess.CompletedProcess[str]:
    src = tmp_path / "layout.c"
    src.write_text(
        '#include <stddef.h>\n#include "livemig.h"\n#include "memstress.h"\n' + "\n".join(lines)
    )
    return subprocess.run(
        [find_compiler(), "-fsyntax-only", "-ffreestanding", f"-I{SRC_DIR}", str(src)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_struct_offsets_match_abi(tmp_path: Path) -> None:
    lines = _asserts("boot_info", BOOT_INFO_FIELDS, abi.BOOT_INFO)
    lines += _asserts("guest_report", GUEST_REPORT_FIELDS, abi.GUEST_REPORT)
    lines += _asserts("memstress_info", MEMSTRESS_INFO_FIELDS, memstress.MEMSTRESS_INFO)
    proc = _compile_asserts(tmp_path, lines)
    assert proc.returncode == 0, proc.stderr


def test_offset_check_can_fail(tmp_path: Path) -> None:
    """The generated asserts really catch a mismatch (a wrong offset must not compile)."""
    proc = _compile_asserts(
        tmp_path, ['_Static_assert(offsetof(struct boot_info, heap_start) == 20, "bad");']
    )
    assert proc.returncode != 0 and "bad" in proc.stderr


PATTERN_PROG = r"""
#include "livemig.h"
#include "memstress.h"

int main(int cpu, const struct boot_info *bi)
{
    static const u64 seeds[] = {0, 1, 12345, 0xffffffffffffffffUL};
    static const u64 pages[] = {0, 1, 4095, 1UL << 40};
    for (int s = 0; s < 4; s++)
        for (int p = 0; p < 4; p++)
            printf("%lx\n", page_hash(seeds[s], pages[p]));
    return 0;
}
"""


@pytest.mark.timeout(60)
def test_page_hash_same_in_c_and_python(tmp_path: Path, boot: Boot) -> None:
    src = tmp_path / "hash.c"
    src.write_text(PATTERN_PROG)
    m = boot(build_guest(src))
    assert m.wait_for_end(10) and m.exit_status == 0, m.chardev.data
    got = [int(line, 16) for line in m.chardev.data.split()]
    want = [
        int(memstress.page_hash(seed, np.array([p], dtype=np.uint64))[0])
        for seed in (0, 1, 12345, 2**64 - 1)
        for p in (0, 1, 4095, 1 << 40)
    ]
    assert got == want
