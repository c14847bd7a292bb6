"""Topic pub/sub made of ordinary Consumers and Providers (docs/protocol.md, Broker messages).

    broker = await Broker.connect("127.0.0.1:9090")
    sub = await broker.subscribe("orders")

One idea per module: ``subscription`` (the subscriber's queue), ``outlet``
(one subscription as the broker forwards to it), ``fanout`` (the broker
Provider's handler: who subscribes to what), ``publisher`` (batched
publishing), ``broker`` (:class:`Broker`, in this process), ``client``
(:class:`BrokerClient`, through a broker elsewhere), ``link`` (what they
share about talking through a server), ``subjects`` (patterns and queue
groups, Twisted-free) and ``rights`` (who may publish and subscribe).

The public names below are imported on first use (PEP 562), so a
Twisted-free module of this package imports without Twisted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:  # the names for type checkers and IDEs; at run time, __getattr__
    from .broker import Broker
    from .client import BrokerClient
    from .link import DEFAULT_BROKER_CHANNEL
    from .publisher import PublishUnconfirmed
    from .subscription import Subscription, SubscriptionClosed

__all__ = [
    "Broker",
    "BrokerClient",
    "PublishUnconfirmed",
    "Subscription",
    "SubscriptionClosed",
    "DEFAULT_BROKER_CHANNEL",
]

# Submodule -> the public names it defines.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "broker": "Broker",
        "client": "BrokerClient",
        "subscription": "Subscription SubscriptionClosed",
        "link": "DEFAULT_BROKER_CHANNEL",
        "publisher": "PublishUnconfirmed",
    },
)
