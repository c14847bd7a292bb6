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
    from .router import Peer, Router, ServerStats

__all__ = ["Router", "Peer", "ServerStats", "ServerProtocol", "ServerFactory"]

# Submodule -> the public names it defines.
__getattr__, __dir__ = lazy_exports(
    __name__, {"router": "Router Peer ServerStats", "protocol": "ServerProtocol ServerFactory"}
)
