"""The exception hierarchy shared by every layer.

Errors say who broke what: ``UsageError`` is bad input from the user (a CLI flag, a QMP
argument, a URI); ``StreamError`` is a peer that broke the stream format, and carries the byte
offset where it happened; the rest name the layer that failed. Every livemig error derives from
``LivemigError`` so the CLI can print any of them as one clean line instead of a traceback.
"""

from __future__ import annotations


class LivemigError(Exception):
    """Base of every error livemig raises on purpose."""


class UsageError(LivemigError):
    """The user asked for something malformed or impossible (flag, size, URI, argument)."""


class StreamError(LivemigError):
    """The incoming migration stream is malformed: the peer broke the protocol.

    ``offset`` is the absolute byte offset in the stream where the problem was found.
    """

    def __init__(self, message: str, offset: int | None = None) -> None:
        self.offset = offset
        self.reason = message
        where = f" at stream offset {offset} (0x{offset:x})" if offset is not None else ""
        super().__init__(f"{message}{where}")


class VMStateError(StreamError):
    """A device payload does not match its declared field list."""


class MachineError(LivemigError):
    """The emulated machine could not be built, run or restored."""


class BuildError(LivemigError):
    """C code livemig builds with the machine's compiler did not build (with its message)."""


class GuestBuildError(BuildError):
    """A guest program could not be compiled or linked (carries the compiler's message)."""


class MigrationError(LivemigError):
    """A migration failed; ``phase`` names the phase it failed in (setup, active, ...)."""

    def __init__(self, message: str, phase: str | None = None) -> None:
        self.phase = phase
        super().__init__(message)
