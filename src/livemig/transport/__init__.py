"""Transports: migration URIs to byte channels, and the rate limiter.

``parse_uri`` checks a URI; ``connect`` opens the source side, ``Listener`` the destination
side; every ``Channel`` read or write has a time-out and can be woken by ``shutdown()``.
"""

from livemig.transport.channel import (
    Channel,
    ChannelClosed,
    ChannelError,
    ChannelTimeout,
)
from livemig.transport.open import Listener, connect, connect_retry
from livemig.transport.ratelimit import RateLimiter
from livemig.transport.uri import MigrationURI, parse_uri

__all__ = [
    "Channel",
    "ChannelClosed",
    "ChannelError",
    "ChannelTimeout",
    "Listener",
    "MigrationURI",
    "RateLimiter",
    "connect",
    "connect_retry",
    "parse_uri",
]
