"""Consumers (callers) and Providers (callees) over one server connection each.

Both return Deferreds, so they work with callbacks, ``inlineCallbacks`` and
``await`` (inside ``Deferred.fromCoroutine`` or pytest-twisted):

    consumer = await Consumer.connect("127.0.0.1:9090", channel)
    reply = await consumer.send(b"hello", timeout=2.0)

    provider = await Provider.connect("127.0.0.1:9090", channel, handler=lambda data: data.upper())

``connection`` holds what both share (the connection's lifecycle, its
registration and reconnecting), ``consumer`` and ``provider`` the rest.
The names below are imported on first use (PEP 562).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:  # the names for type checkers and IDEs; at run time, __getattr__
    from .connection import DEFAULT_BACKOFF, ChannelId
    from .connection import Client as Client
    from .connection import Reconnect as Reconnect
    from .connection import channel_bytes as channel_bytes
    from .connection import worth_logging as worth_logging
    from .consumer import Consumer
    from .provider import DEFAULT_INCOMPLETE_TIMEOUT, DEFAULT_MAX_INCOMPLETE, Provider, Request
    from .provider import Handler as Handler
    from .provider import log as log

# Public name -> the submodule that defines it.
_LAZY = {
    "log": "provider",
    "ChannelId": "connection",
    "Reconnect": "connection",
    "DEFAULT_BACKOFF": "connection",
    "worth_logging": "connection",
    "channel_bytes": "connection",
    "Client": "connection",
    "Consumer": "consumer",
    "Handler": "provider",
    "DEFAULT_MAX_INCOMPLETE": "provider",
    "DEFAULT_INCOMPLETE_TIMEOUT": "provider",
    "Request": "provider",
    "Provider": "provider",
}

__all__ = [
    "Consumer",
    "Provider",
    "Request",
    "ChannelId",
    "DEFAULT_BACKOFF",
    "DEFAULT_MAX_INCOMPLETE",
    "DEFAULT_INCOMPLETE_TIMEOUT",
]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
