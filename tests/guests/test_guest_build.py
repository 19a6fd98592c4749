"""Building guests: built-ins, user files, the cache, and every way a build can fail."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from guest_helpers import Boot, Images

from livemig.errors import GuestBuildError, UsageError
from livemig.guests import build, build_guest, builtin_guests, cache_dir

ENTRY_BYTES = bytes.fromhex("4989fc")  # mov %rdi, %r12: the first instruction of entry.S


def test_builtin_list() -> None:
    assert builtin_guests() == ["compute", "idle", "kvserver", "memstress"]


@pytest.mark.parametrize("name", ["memstress", "compute", "idle"])
def test_builtin_builds_into_cache(name: str, images: Images, guest_cache: Path) -> None:
    img = images[name]
    assert img.name == name
    assert img.data.startswith(ENTRY_BYTES)
    assert img.path.is_file() and img.path.read_bytes() == img.data
    assert img.path.parent == guest_cache / "guests"
    assert img.load_addr == 0x100000


def test_cache_dir_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEMIG_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path / "guests"
    monkeypatch.delenv("LIVEMIG_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "livemig" / "guests"


def test_cached_build_does_not_recompile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = build_guest("idle", cache=tmp_path)

    def no_compile(*args: object) -> bytes:
        raise AssertionError("recompiled although the image was cached")

    monkeypatch.setattr(build, "_compile", no_compile)
    again = build_guest("idle", cache=tmp_path)
    assert again.path == first.path and again.data == first.data


def test_source_change_changes_key(tmp_path: Path) -> None:
    src = tmp_path / "prog.c"
    src.write_text(
        '#include "livemig.h"\nint main(int cpu, const struct boot_info *bi) { return 1; }\n'
    )
    a = build_guest(src, cache=tmp_path / "cache")
    src.write_text(
        '#include "livemig.h"\nint main(int cpu, const struct boot_info *bi) { return 2; }\n'
    )
    b = build_guest(src, cache=tmp_path / "cache")
    assert a.path != b.path and a.name == b.name == "prog"


USER_PROG = r"""
#include "livemig.h"

int main(int cpu, const struct boot_info *bi)
{
    printf("hello %s cpu%d of %u\n", "user", cpu, bi->ncpus);
    printf("fmt [%d] [%5d] [%05d] [%u] [%x] [%X] [%lu] [%llu] [%c] [%%] [%-]\n",
           -42, 42, -42, 4000000000u, 0xbeefu, 0xbeefu, 1UL << 40, 18446744073709551615ULL, 'z');
    printf("args ws=%lu big=%lu hex=%lu missing=%lu flag=%d noflag=%d\n",
           arg_size("ws", 0), arg_size("big", 0), arg_u64("hex", 0), arg_u64("missing", 77),
           arg_flag("verbose"), arg_flag("quiet"));
    char buf[8];
    int n = snprintf(buf, sizeof(buf), "%s", "truncated text");
    printf("snprintf %d [%s]\n", n, buf);
    return 7;
}
"""


def test_user_program_runs_with_runtime(tmp_path: Path, boot: Boot) -> None:
    src = tmp_path / "hello.c"
    src.write_text(USER_PROG)
    img = build_guest(str(src))
    assert img.name == "hello" and img.source == src.resolve()
    m = boot(img, "ws=64K big=3G hex=0x1F verbose quiet=0")
    assert m.wait_for_end(10)
    text = m.chardev.data.decode()
    assert m.exit_status == 7, text
    assert "hello user cpu0 of 1\n" in text
    assert (
        "fmt [-42] [   42] [-0042] [4000000000] [beef] [BEEF] [1099511627776]"
        " [18446744073709551615] [z] [%] [%-]\n"
    ) in text
    assert f"args ws={64 << 10} big={3 << 30} hex=31 missing=77 flag=1 noflag=0\n" in text
    assert "snprintf 14 [truncat]\n" in text


def test_compile_error_shows_compiler_message(tmp_path: Path) -> None:
    src = tmp_path / "broken.c"
    src.write_text(
        '#include "livemig.h"\nint main(int cpu, const struct boot_info *bi)\n'
        "{ return undeclared_thing; }\n"
    )
    with pytest.raises(GuestBuildError) as exc:
        build_guest(src, cache=tmp_path)
    text = str(exc.value)
    assert "broken.c" in text and "undeclared_thing" in text and "compiling guest" in text
    assert not list(tmp_path.glob("broken-*.bin"))


def test_unknown_guest_lists_builtins() -> None:
    with pytest.raises(UsageError) as exc:
        build_guest("memstres")
    assert "memstres" in str(exc.value)
    for name in builtin_guests():
        assert name in str(exc.value)


def test_missing_or_non_c_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        build_guest(tmp_path / "nope.c")
    other = tmp_path / "prog.txt"
    other.write_text("int main;")
    with pytest.raises(UsageError, match="not a C file"):
        build_guest(other)


def test_no_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no gcc, no cc
    with pytest.raises(GuestBuildError) as exc:
        build_guest("idle", cache=tmp_path)
    assert "no C compiler" in str(exc.value) and "apt-get install gcc" in str(exc.value)


def test_cc_env_is_honoured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CC", os.fspath(tmp_path / "not-a-compiler"))
    with pytest.raises(GuestBuildError, match="not-a-compiler"):
        build_guest("idle", cache=tmp_path)
