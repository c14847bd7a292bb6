"""pulsyflux: a request/response router and pub/sub broker for Twisted.

from pulsyflux import Consumer, Provider, ServerFactory
"""

from .client import Consumer, Provider, Request
from .errors import (
    ConnectionLostError,
    NoProviderError,
    ProtocolError,
    PulsyfluxError,
    RemoteError,
    RequestTimeout,
    ServerOverloaded,
)
from .server import ServerFactory

__version__ = "0.1.0"

__all__ = [
    "ConnectionLostError",
    "Consumer",
    "NoProviderError",
    "ProtocolError",
    "Provider",
    "PulsyfluxError",
    "RemoteError",
    "Request",
    "RequestTimeout",
    "ServerFactory",
    "ServerOverloaded",
]
