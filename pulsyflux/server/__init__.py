"""The router: a Twisted server that routes requests to providers.

``router`` (:class:`Router`, :class:`Peer`, stats) decides where every frame
goes; ``protocol`` adapts a TCP connection to it; ``guard`` closes peers that
hold resources without using them; ``backpressure`` stops reading from those
that send faster than their peers read; ``inproc`` connects the server's own
broker without a socket; ``listening`` runs endpoints as a service.

The public names below are imported on first use (PEP 562).

    from pulsyflux.server import ServerFactory
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:  # the names for type checkers and IDEs; at run time, __getattr__
    from .protocol import ServerFactory, ServerProtocol
    from .router import (
        DEFAULT_FRAME_TIMEOUT,
        DEFAULT_GRACE,
        DEFAULT_MAX_BODY,
        DEFAULT_MAX_CONNECTIONS,
        DEFAULT_MAX_IN_FLIGHT,
        DEFAULT_MAX_PARTIAL_BYTES,
        DEFAULT_MAX_UNSENT,
        DEFAULT_MAX_UNSENT_TOTAL,
        DEFAULT_REGISTER_TIMEOUT,
        MSG_CHANNEL_RESERVED,
        MSG_CLIENT_MISMATCH,
        Peer,
        Router,
        ServerStats,
    )

# Public name -> the submodule that defines it.
_LAZY = {
    "Router": "router",
    "Peer": "router",
    "ServerStats": "router",
    "ServerProtocol": "protocol",
    "ServerFactory": "protocol",
    "DEFAULT_MAX_BODY": "router",
    "DEFAULT_MAX_IN_FLIGHT": "router",
    "DEFAULT_MAX_CONNECTIONS": "router",
    "DEFAULT_GRACE": "router",
    "DEFAULT_MAX_UNSENT": "router",
    "DEFAULT_MAX_UNSENT_TOTAL": "router",
    "MSG_CHANNEL_RESERVED": "router",
    "MSG_CLIENT_MISMATCH": "router",
    "DEFAULT_FRAME_TIMEOUT": "router",
    "DEFAULT_REGISTER_TIMEOUT": "router",
    "DEFAULT_MAX_PARTIAL_BYTES": "router",
}

__all__ = [
    "Router",
    "Peer",
    "ServerStats",
    "ServerProtocol",
    "ServerFactory",
    "DEFAULT_MAX_BODY",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_GRACE",
    "DEFAULT_MAX_UNSENT",
    "DEFAULT_MAX_UNSENT_TOTAL",
    "MSG_CHANNEL_RESERVED",
    "MSG_CLIENT_MISMATCH",
    "DEFAULT_FRAME_TIMEOUT",
    "DEFAULT_REGISTER_TIMEOUT",
    "DEFAULT_MAX_PARTIAL_BYTES",
]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
