"""What the QMP security tests read off a raw socket: one JSON object per line."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator


def json_lines(sock: socket.socket) -> Iterator[dict]:
    """The JSON objects ``sock`` receives, one per line, until it closes."""
    buf = b""
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield json.loads(line)
        data = sock.recv(65536)
        if not data:
            return
        buf += data
