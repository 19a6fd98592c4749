"""``livemig migrate``'s Ctrl-C: a flag read between QMP exchanges, never an exception raised
inside one; a second Ctrl-C raises as usual; the old handler comes back after."""

from __future__ import annotations

import os
import signal
import time

import pytest

from livemig.cli.migrate import _ctrl_c_as_flag


def _sigint() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)  # the handler runs in the main thread at the next bytecode


def test_first_ctrl_c_sets_the_flag_second_raises() -> None:
    before = signal.getsignal(signal.SIGINT)
    with _ctrl_c_as_flag() as interrupted:
        assert not interrupted.is_set()
        _sigint()  # no KeyboardInterrupt here, mid-"exchange"
        assert interrupted.is_set()
        with pytest.raises(KeyboardInterrupt):
            _sigint()
    assert signal.getsignal(signal.SIGINT) is before
