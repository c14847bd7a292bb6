"""pulsyflux: a request/response router and pub/sub broker for Twisted.

from pulsyflux import Consumer, Provider, ServerFactory

The public names below are imported on first use (PEP 562), not here: the
sans-I/O core (``pulsyflux.wire``: ``codec``, ``messages``, ``errors``,
``printable``, ``ratelimit``, ``deadlines``) imports without Twisted, and
importing one of them must not drag in the server, the clients and the
reactor with it. The packages show the layers: ``wire`` (bytes and rules),
``server``, ``client``, ``broker``, then ``service``, ``http`` and ``cli``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

if TYPE_CHECKING:  # the names for type checkers and IDEs; at run time, __getattr__
    from .broker.broker import Broker
    from .broker.client import BrokerClient
    from .broker.subscription import Subscription, SubscriptionClosed
    from .client import Consumer, Provider, Request
    from .server.protocol import ServerFactory
    from .service import BrokerService
    from .wire.errors import (
        ConnectionLostError,
        NoProviderError,
        PermissionDenied,
        ProtocolError,
        PulsyfluxError,
        RemoteError,
        RequestTimeout,
        ServerOverloaded,
    )
    from .wire.messages import Message, MessageError

__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_LAZY = {
    "Broker": "broker.broker",
    "BrokerClient": "broker.client",
    "Subscription": "broker.subscription",
    "SubscriptionClosed": "broker.subscription",
    "Consumer": "client",
    "Provider": "client",
    "Request": "client",
    "ConnectionLostError": "wire.errors",
    "NoProviderError": "wire.errors",
    "PermissionDenied": "wire.errors",
    "ProtocolError": "wire.errors",
    "PulsyfluxError": "wire.errors",
    "RemoteError": "wire.errors",
    "RequestTimeout": "wire.errors",
    "ServerOverloaded": "wire.errors",
    "Message": "wire.messages",
    "MessageError": "wire.messages",
    "ServerFactory": "server.protocol",
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


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
