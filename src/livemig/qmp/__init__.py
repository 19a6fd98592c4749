"""QMP, QEMU's JSON control protocol: the server, its command registry, and a thin client.

``QMPServer`` speaks the protocol exactly as QEMU 10.0 does (greeting, capabilities negotiation,
``execute``/``exec-oob``, ``return``/``error``, timestamped events, CRLF after every message),
so ``qemu.qmp`` and libvirt-style tools drive livemig unchanged. Commands live in a
``CommandRegistry``; the machine's are added by ``machine_commands.register_machine_commands``,
migration's by the migration layer. Layout: ``codec`` (sans-IO stream parsing), ``commands``
(registry and argument checking), ``schema`` (query-qmp-schema from the registry), ``server``
(asyncio driver), ``client`` (sync client for the CLI and tests, over ``qemu.qmp``).
"""

from livemig.qmp.codec import QMPDecoder, encode_message
from livemig.qmp.commands import ANY, EMPTY, Arg, Command, CommandRegistry, QMPError
from livemig.qmp.server import QMPServer, call_after_reply, parse_qmp_address

__all__ = [
    "ANY",
    "EMPTY",
    "Arg",
    "Command",
    "CommandRegistry",
    "QMPDecoder",
    "QMPError",
    "QMPServer",
    "call_after_reply",
    "encode_message",
    "parse_qmp_address",
]
