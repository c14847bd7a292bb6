"""pulsyflux: a request/response router and pub/sub broker for Twisted.

from pulsyflux import Consumer, Provider, ServerFactory
"""

from .broker import Broker, BrokerClient, Subscription, SubscriptionClosed
from .client import Consumer, Provider, Request
from .errors import (
    ConnectionLostError,
    NoProviderError,
    PermissionDenied,
    ProtocolError,
    PulsyfluxError,
    RemoteError,
    RequestTimeout,
    ServerOverloaded,
)
from .messages import Message, MessageError
from .server import ServerFactory
from .service import BrokerService

__version__ = "0.1.0"

__all__ = [
    "Broker",
    "BrokerClient",
    "BrokerService",
    "Message",
    "MessageError",
    "Subscription",
    "SubscriptionClosed",
    "ConnectionLostError",
    "Consumer",
    "NoProviderError",
    "PermissionDenied",
    "ProtocolError",
    "Provider",
    "PulsyfluxError",
    "RemoteError",
    "Request",
    "RequestTimeout",
    "ServerFactory",
    "ServerOverloaded",
]
