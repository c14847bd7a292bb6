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
    from .connection import Reconnect as Reconnect
    from .connection import channel_bytes as channel_bytes
    from .consumer import Consumer
    from .provider import DEFAULT_INCOMPLETE_TIMEOUT, DEFAULT_MAX_INCOMPLETE, Provider, Request
    from .provider import Handler as Handler

__all__ = [
    "Consumer",
    "Provider",
    "Request",
    "ChannelId",
    "DEFAULT_BACKOFF",
    "DEFAULT_MAX_INCOMPLETE",
    "DEFAULT_INCOMPLETE_TIMEOUT",
]

# Submodule -> the public names it defines.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "connection": "ChannelId Reconnect DEFAULT_BACKOFF channel_bytes",
        "consumer": "Consumer",
        "provider": "Provider Request Handler DEFAULT_MAX_INCOMPLETE DEFAULT_INCOMPLETE_TIMEOUT",
    },
)
