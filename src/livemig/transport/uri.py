"""Migration URIs as QEMU spells them: ``tcp:HOST:PORT``, ``unix:PATH``, ``fd:N``,
``exec:CMDLINE`` and ``file:PATH[,offset=N]``.

Parsing is separate from opening so that a malformed URI is refused before anything starts,
with an error that quotes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from livemig.errors import UsageError

SCHEMES = ("tcp", "unix", "fd", "exec", "file")


@dataclass(frozen=True)
class MigrationURI:
    """A parsed URI. Only the fields of its scheme are set (``tcp:``'s ``host`` may be empty:
    every address when listening, unresolvable when connecting)."""

    scheme: str
    host: str = ""
    port: int = 0
    # a tcp: port given as a name (``tcp:HOST:ssh``), kept as written: QEMU hands it to
    # getaddrinfo when it connects or listens, so /etc/services decides, and a name it does
    # not know fails there ("Servname not supported for ai_socktype"), not at parsing
    service: str = ""
    path: str = ""
    fd: int = -1
    command: str = ""
    offset: int = 0

    @property
    def has_return_path(self) -> bool:
        """Sockets can be read in the other direction; pipes and files cannot."""
        return self.scheme in ("tcp", "unix", "fd")

    @property
    def port_spec(self) -> int | str:
        """The port to resolve: its number, or the service name as written."""
        return self.service or self.port

    @property
    def multi_channel(self) -> bool:
        """Whether further connections (multifd, post-copy preempt) can be made to it."""
        return self.scheme in ("tcp", "unix")

    def __str__(self) -> str:
        if self.scheme == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp:{host}:{self.port_spec}"
        if self.scheme == "unix":
            return f"unix:{self.path}"
        if self.scheme == "fd":
            return f"fd:{self.fd}"
        if self.scheme == "exec":
            return f"exec:{self.command}"
        return f"file:{self.path}" + (f",offset={self.offset}" if self.offset else "")


# the port, as QEMU's inet_parse reads it: anything up to a comma (a number or a service name)
_TCP_RE = re.compile(r"^(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[^:\[\]]*)):(?P<port>[^,]+)$")


def parse_uri(text: str) -> MigrationURI:
    """Parse a migration URI; ``UsageError`` says what is wrong with it."""
    if not isinstance(text, str) or ":" not in text:
        raise UsageError(
            f"invalid migration URI {text!r}: expected one of "
            + ", ".join(f"{s}:..." for s in SCHEMES)
        )
    scheme, _, rest = text.partition(":")
    if scheme not in SCHEMES:
        raise UsageError(
            f"invalid migration URI {text!r}: unknown scheme {scheme!r} "
            f"(supported: {', '.join(SCHEMES)})"
        )
    if scheme == "tcp":
        m = _TCP_RE.match(rest)
        if not m:
            raise UsageError(f"invalid migration URI {text!r}: expected tcp:HOST:PORT")
        given = m.group("port")
        service = "" if given.isascii() and given.isdigit() else given
        port = 0 if service else int(given)
        if port > 65535:
            raise UsageError(f"invalid migration URI {text!r}: port {port} out of range")
        # An empty host is kept empty, as QEMU keeps it: a listener takes it as every address
        # (IPv4 and IPv6), a connect cannot resolve it and fails ("address resolution failed
        # for :4444"), where taking it as 0.0.0.0 connected to whatever listened locally.
        host = m.group("v6") or m.group("host") or ""
        return MigrationURI("tcp", host="0.0.0.0" if host == "0" else host, port=port,
                            service=service)  # fmt: skip
    if scheme == "unix":
        if not rest:
            raise UsageError(f"invalid migration URI {text!r}: expected unix:PATH")
        return MigrationURI("unix", path=rest)
    if scheme == "fd":
        if not rest.isdigit():
            raise UsageError(
                f"invalid migration URI {text!r}: expected fd:N (a file descriptor "
                "number this process inherited)"
            )
        return MigrationURI("fd", fd=int(rest))
    if scheme == "exec":
        if not rest.strip():
            raise UsageError(f"invalid migration URI {text!r}: expected exec:COMMAND")
        return MigrationURI("exec", command=rest)
    path, _, opts = rest.partition(",")
    if not path:
        raise UsageError(f"invalid migration URI {text!r}: expected file:PATH[,offset=N]")
    offset = 0
    if opts:
        key, _, value = opts.partition("=")
        if key != "offset" or not value.isdigit():
            raise UsageError(
                f"invalid migration URI {text!r}: only ',offset=N' may follow the path"
            )
        offset = int(value)
    return MigrationURI("file", path=path, offset=offset)
