"""Making room for a unix socket a listener is about to bind.

A socket file left by an earlier run is removed, as QEMU does; anything else at the path (a
regular file, a directory, a link) is left alone and refused: a mistyped ``unix:`` path must
not delete a user's file.
"""

from __future__ import annotations

import errno
import os
import stat


class NotASocket(FileExistsError):
    """Something other than a socket is where a listener would bind."""

    def __str__(self) -> str:
        return str(self.strerror)  # the reason alone, as callers print it after the address


def clear_socket_path(path: str) -> None:
    """Remove a stale socket at ``path``; ``NotASocket`` (an ``OSError``, EEXIST) if
    something that is not a socket is there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a socket"
        raise NotASocket(errno.EEXIST, f"{path} exists and is {kind}: not removed")
    os.unlink(path)
