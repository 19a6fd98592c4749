"""A small synchronous QMP client for the CLI and tests: a thin layer over ``qemu.qmp``.

All protocol work is done by the official client (``qemu.qmp.legacy.QEMUMonitorProtocol``, the
synchronous shim over ``QMPClient``); this module only adds livemig's URIs (``unix:PATH``,
``tcp:HOST:PORT``), time-outs on every blocking call, and errors that say which command failed
and what the server answered.
"""

from __future__ import annotations

import asyncio
from typing import Any

from livemig.errors import LivemigError

try:
    from qemu.qmp import ExecuteError
    from qemu.qmp.legacy import QEMUMonitorProtocol
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise LivemigError(
        "the QMP client needs the 'qemu.qmp' package (pip install 'qemu.qmp>=0.0.3')"
    ) from exc

from livemig.qmp.server import parse_qmp_address


class QMPClientError(LivemigError):
    """A QMP exchange failed: connecting, a command's error reply, or a time-out.

    For an error reply, ``command``, ``arguments``, ``error_class`` and ``desc`` are set.
    """

    def __init__(
        self,
        message: str,
        command: str | None = None,
        arguments: dict[str, Any] | None = None,
        error_class: str | None = None,
        desc: str | None = None,
    ) -> None:
        self.command = command
        self.arguments = arguments
        self.error_class = error_class
        self.desc = desc
        super().__init__(message)


class QMPConnection:
    """A negotiated connection to a QMP server (ours or QEMU's); use as a context manager."""

    def __init__(self, uri: str, timeout: float = 10.0) -> None:
        self.uri = uri
        self.timeout = timeout
        kind, where = parse_qmp_address(uri)
        self._mon = QEMUMonitorProtocol(where if kind == "unix" else tuple(where))
        self._mon.settimeout(timeout)
        self.greeting: dict[str, Any] | None = None

    def connect(self) -> QMPConnection:
        """Connect, read the greeting and negotiate capabilities."""
        try:
            # QEMUMonitorProtocol.connect has no time-out of its own.
            self._mon._sync(self._mon._qmp.connect(self._mon._address), self.timeout)
        except TimeoutError as exc:
            raise QMPClientError(f"QMP {self.uri}: no greeting within {self.timeout} s") from exc
        except Exception as exc:
            raise QMPClientError(f"cannot connect to QMP {self.uri}: {exc}") from exc
        self.greeting = self._mon._get_greeting()
        return self

    def command(self, name: str, **arguments: Any) -> Any:
        """Execute ``name`` (QMP argument names with ``-``: pass them via ``**{"a-b": 1}``)."""
        try:
            return self._mon.cmd(name, **arguments)
        except ExecuteError as exc:
            raise QMPClientError(
                f"QMP {name} failed: {exc.error_class}: {exc.error.error.desc}",
                command=name,
                arguments=arguments,
                error_class=exc.error_class,
                desc=exc.error.error.desc,
            ) from exc
        except TimeoutError as exc:
            raise QMPClientError(
                f"QMP {name}: no reply within {self.timeout} s", command=name, arguments=arguments
            ) from exc
        except Exception as exc:
            raise QMPClientError(f"QMP {name} on {self.uri}: {exc}", command=name) from exc

    def event(self, name: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
        """Wait for the next event (the next one called ``name`` if given)."""
        loop = asyncio.get_event_loop_policy().get_event_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise QMPClientError(f"QMP {self.uri}: no {name or 'event'} within {timeout} s")
            try:
                event = self._mon.pull_event(wait=float(left))
            except TimeoutError:
                continue
            if event is not None and (name is None or event.get("event") == name):
                return event

    def events(self) -> list[dict[str, Any]]:
        """Events received so far (without waiting), and forget them."""
        return self._mon.get_events(wait=False)

    def close(self) -> None:
        """Disconnect (idempotent)."""
        try:
            self._mon.close()
        except Exception:  # the server may already be gone; closing is best effort
            pass

    def __enter__(self) -> QMPConnection:
        return self.connect() if self.greeting is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()


def qmp_command(uri: str, name: str, timeout: float = 10.0, **arguments: Any) -> Any:
    """Connect, run one command, disconnect: ``qmp_command("unix:/tmp/a.sock", "stop")``."""
    with QMPConnection(uri, timeout) as conn:
        return conn.command(name, **arguments)
