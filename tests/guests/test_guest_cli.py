"""``livemig guests build | list`` through the real command-line entry point."""

from __future__ import annotations

from pathlib import Path

import pytest

from livemig.cli import main


def test_build_all_then_list(guest_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["guests", "build"]) == 0
    out = capsys.readouterr().out
    for name in ("memstress", "compute", "idle"):
        line = next(x for x in out.splitlines() if x.startswith(name))
        path = Path(line.split()[3])
        assert path.is_file() and path.parent == guest_cache / "guests", line
    assert main(["guests", "list"]) == 0
    listing = capsys.readouterr().out
    assert "memstress" in listing and "not built" not in listing


def test_build_user_file_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "mine.c"
    src.write_text(
        '#include "livemig.h"\nint main(int cpu, const struct boot_info *bi) { return 0; }\n'
    )
    assert main(["guests", "build", str(src)]) == 0
    assert capsys.readouterr().out.startswith("mine ")
    assert main(["guests", "build", "nosuch"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("livemig guests: error: unknown guest 'nosuch'") and "memstress" in err
    src.write_text("int main(void) { return syntax error; }\n")
    assert main(["guests", "build", str(src)]) == 1
    err = capsys.readouterr().err
    assert (
        "compiling guest 'mine'" in err
        and "mine.c" in err
        and "undeclared" in err
        and "syntax" in err
    )
