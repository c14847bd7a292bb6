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
    from .broker.publisher import PublishUnconfirmed
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

__all__ = [
    "Broker",
    "BrokerClient",
    "BrokerService",
    "Message",
    "MessageError",
    "PublishUnconfirmed",
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


# Submodule -> the public names it defines.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "broker.broker": "Broker",
        "broker.client": "BrokerClient",
        "broker.publisher": "PublishUnconfirmed",
        "broker.subscription": "Subscription SubscriptionClosed",
        "client": "Consumer Provider Request",
        "wire.errors": "ConnectionLostError NoProviderError PermissionDenied ProtocolError PulsyfluxError RemoteError RequestTimeout ServerOverloaded",
        "wire.messages": "Message MessageError",
        "server.protocol": "ServerFactory",
        "service": "BrokerService",
    },
)
