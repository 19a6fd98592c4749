"""The run-state table: QEMU's names, legal moves, and refused ones."""

from __future__ import annotations

import pytest

from livemig.errors import MachineError
from livemig.machine.runstate import TRANSITIONS, RunState, check_transition, is_legal, to_dot


def test_names_are_qemus() -> None:
    names = {s.value for s in RunState}
    assert {"running", "paused", "inmigrate", "postmigrate", "finish-migrate", "shutdown"} <= names
    assert str(RunState.FINISH_MIGRATE) == "finish-migrate"


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("prelaunch", "running"),
        ("running", "paused"),
        ("paused", "running"),
        ("running", "finish-migrate"),
        ("finish-migrate", "postmigrate"),
        ("postmigrate", "running"),
        ("prelaunch", "inmigrate"),
        ("inmigrate", "running"),
        ("inmigrate", "paused"),
        ("running", "shutdown"),
        ("paused", "internal-error"),  # a paused post-copy destination whose migration failed
    ],
)
def test_legal_moves(old: str, new: str) -> None:
    assert is_legal(RunState(old), RunState(new))
    check_transition(RunState(old), RunState(new))


@pytest.mark.parametrize(
    ("old", "new"),
    [("shutdown", "running"), ("running", "inmigrate"), ("postmigrate", "paused"),
     ("inmigrate", "finish-migrate")],
)  # fmt: skip
def test_illegal_moves_say_what_is_allowed(old: str, new: str) -> None:
    with pytest.raises(MachineError, match=f"{old} -> {new}") as info:
        check_transition(RunState(old), RunState(new))
    allowed = sorted(str(b) for a, b in TRANSITIONS if a == RunState(old))
    assert ", ".join(allowed) in str(info.value)


def test_staying_put_is_always_legal() -> None:
    for s in RunState:
        assert is_legal(s, s)


def test_dot_lists_every_transition() -> None:
    dot = to_dot()
    assert dot.count("->") == len(TRANSITIONS)
