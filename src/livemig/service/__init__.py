"""Host side of guest services: ``livemig run --guest kvserver --serve tcp:HOST:PORT``.

``front`` bridges client connections to the machine's livemig-ring device and keeps them
alive across a live migration with no extra step: the destination's front dials the source's
follow listener (its address travels in the ring's device state) and the source forwards its
clients through that tunnel (``docs/service.md``); ``resp`` frames RESP requests and has a small
client. The guest end is ``guests/src/kvserver.c``.
"""

from livemig.service.front import ServiceFront, parse_serve_uri, start_service
from livemig.service.resp import RequestFramer, RespClient, RespError, encode_command

__all__ = [
    "RequestFramer",
    "RespClient",
    "RespError",
    "ServiceFront",
    "encode_command",
    "parse_serve_uri",
    "start_service",
]
