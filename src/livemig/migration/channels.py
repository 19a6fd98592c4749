"""QEMU 10.0's ``channels`` argument of ``migrate`` and ``migrate-incoming``, as a URI.

A ``MigrationChannel`` is ``{"channel-type": "main" | "cpr", "addr": MigrationAddress}``; the
address is a union on ``transport``: ``socket`` (a ``SocketAddress``, itself a union on
``type``: ``inet`` {host, port}, ``unix`` {path}, ``fd`` {str}, ``vsock``), ``exec``
{args}, ``file`` {filename, offset} or ``rdma``. livemig takes what it has a transport for and
turns it into the URI QEMU's ``migrate_uri_parse`` would have parsed to the same address
(``exec`` args ``["/bin/sh", "-c", CMD]`` are ``exec:CMD``; other args are quoted for the
shell). The checks and messages are QEMU's (its QAPI input visitor's, ``qmp_migrate``'s,
``qemu_start_incoming_migration``'s); ``vsock``, ``rdma`` and a ``cpr`` channel (migration
mode ``cpr-transfer``) are refused as livemig has none, and so are the address members that
would change what is reached (``abstract`` unix sockets, an inet port range ``to``, ``mptcp``).
"""

from __future__ import annotations

import shlex
from typing import Any

from livemig.errors import UsageError

_INET_OPTIONAL = {"numeric": bool, "to": int, "ipv4": bool, "ipv6": bool, "keep-alive": bool,
                  "keep-alive-count": int, "keep-alive-idle": int,
                  "keep-alive-interval": int, "mptcp": bool}  # fmt: skip
_MEMBERS: dict[str, dict[str, tuple[type, bool]]] = {
    "inet": {"host": (str, True), "port": (str, True),
             **{k: (t, False) for k, t in _INET_OPTIONAL.items()}},
    "unix": {"path": (str, True), "abstract": (bool, False), "tight": (bool, False)},
    "fd": {"str": (str, True)},
    "vsock": {"cid": (str, True), "port": (str, True)},
    "exec": {"args": (list, True)},
    "file": {"filename": (str, True), "offset": (int, True)},
    "rdma": {"host": (str, True), "port": (str, True),
             **{k: (t, False) for k, t in _INET_OPTIONAL.items()}},
}  # fmt: skip
_JSON = {str: "string", bool: "boolean", int: "integer", list: "array", dict: "object"}


def _object(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UsageError(f"Invalid parameter type for '{name}', expected: object")
    return value


def _members(obj: dict[str, Any], spec: dict[str, tuple[type, bool]], prefix: str,
             skip: tuple[str, ...]) -> None:  # fmt: skip
    for key, (typ, required) in spec.items():
        if key not in obj:
            if required:
                raise UsageError(f"Parameter '{prefix}.{key}' is missing")
            continue
        v = obj[key]
        # JSON has no int/bool confusion, Python does
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise UsageError(f"Invalid parameter type for '{prefix}.{key}', expected: "
                             f"{_JSON[typ]}")  # fmt: skip
    for key in obj:
        if key not in spec and key not in skip:
            raise UsageError(f"Parameter '{prefix}.{key}' is unexpected")


def _tag(obj: dict[str, Any], key: str, prefix: str, values: tuple[str, ...]) -> str:
    if key not in obj:
        raise UsageError(f"Parameter '{prefix}.{key}' is missing")
    v = obj[key]
    if not isinstance(v, str):
        raise UsageError(f"Invalid parameter type for '{prefix}.{key}', expected: string")
    if v not in values:
        raise UsageError(f"Parameter '{key}' does not accept value '{v}'")
    return v


def address_uri(addr: Any, prefix: str) -> str:
    """A ``MigrationAddress`` as a livemig URI."""
    addr = _object(addr, prefix)
    transport = _tag(addr, "transport", prefix, ("socket", "exec", "rdma", "file"))
    if transport == "socket":
        kind = _tag(addr, "type", prefix, ("inet", "unix", "vsock", "fd"))
        _members(addr, _MEMBERS[kind], prefix, ("transport", "type"))
        # members that would change what is reached are refused, not ignored (an abstract
        # socket taken as a file of that name in the current directory, a port range as its
        # first port); keep-alive, numeric and the families are taken as they come
        if kind == "inet":
            if "to" in addr:
                raise UsageError(f"'{prefix}.to' (a range of ports to listen on) is not "
                                 "supported by livemig: give one port")  # fmt: skip
            if addr.get("mptcp"):
                raise UsageError("MPTCP is not supported by livemig")
            host = addr["host"]
            return f"tcp:[{host}]:{addr['port']}" if ":" in host else f"tcp:{host}:{addr['port']}"
        if kind == "unix":
            if addr.get("abstract"):
                raise UsageError("abstract unix sockets are not supported by livemig: give a "
                                 "path in the file system")  # fmt: skip
            return f"unix:{addr['path']}"
        if kind == "fd":
            return f"fd:{addr['str']}"
        raise UsageError("vsock migration is not supported by livemig")
    _members(addr, _MEMBERS[transport], prefix, ("transport",))
    if transport == "exec":
        args = addr["args"]
        if not all(isinstance(a, str) for a in args):
            raise UsageError(f"Invalid parameter type for '{prefix}.args[0]', expected: string")
        if len(args) == 3 and args[:2] == ["/bin/sh", "-c"]:
            return f"exec:{args[2]}"
        return "exec:" + shlex.join(args)
    if transport == "file":
        offset = addr["offset"]
        return f"file:{addr['filename']}" + (f",offset={offset}" if offset else "")
    raise UsageError("RDMA migration is not supported by livemig")


def channels_uri(channels: list[Any], incoming: bool) -> str:
    """The URI of QEMU 10.0's ``channels`` list (``incoming``: migrate-incoming's rule)."""
    if incoming and len(channels) > 1:
        raise UsageError("Channel list must have only one entry, for type 'main'")
    seen: dict[str, Any] = {}
    for i, ch in enumerate(channels):
        prefix = f"channels[{i}]"
        ch = _object(ch, prefix)
        kind = _tag(ch, "channel-type", prefix, ("main", "cpr"))
        if "addr" not in ch:
            raise UsageError(f"Parameter '{prefix}.addr' is missing")
        for key in ch:
            if key not in ("channel-type", "addr"):
                raise UsageError(f"Parameter '{prefix}.{key}' is unexpected")
        if kind in seen:
            raise UsageError(f"Channel list has more than one {kind} entry")
        seen[kind] = (ch["addr"], f"{prefix}.addr")
    if "main" not in seen:
        raise UsageError("Channel list has no main entry")
    if "cpr" in seen:
        raise UsageError("a cpr channel is for migration mode cpr-transfer, which livemig "
                         "does not support (normal only)")  # fmt: skip
    return address_uri(*seen["main"])
