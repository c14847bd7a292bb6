"""pulsyflux: a request/response router and pub/sub broker for Twisted.

from pulsyflux import Consumer, Provider, ServerFactory

The public names below are imported on first use (PEP 562), not here: the
sans-I/O core (``pulsyflux.codec``, ``messages``, ``errors``, ``printable``,
``ratelimit``, ``deadlines``) imports without Twisted, and importing one of
them must not drag in the server, the clients and the reactor with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names for type checkers and IDEs; at run time, __getattr__
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

# Public name -> the submodule that defines it.
_LAZY = {
    "Broker": "broker",
    "BrokerClient": "broker",
    "Subscription": "broker",
    "SubscriptionClosed": "broker",
    "Consumer": "client",
    "Provider": "client",
    "Request": "client",
    "ConnectionLostError": "errors",
    "NoProviderError": "errors",
    "PermissionDenied": "errors",
    "ProtocolError": "errors",
    "PulsyfluxError": "errors",
    "RemoteError": "errors",
    "RequestTimeout": "errors",
    "ServerOverloaded": "errors",
    "Message": "messages",
    "MessageError": "messages",
    "ServerFactory": "server",
    "BrokerService": "service",
}

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


def __getattr__(name: str) -> Any:
    """Import the submodule that defines a public name on first use, then cache it here."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups are plain module attributes
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
