"""Types for the seams between pulsyflux and Twisted.

Twisted types ``Protocol.transport`` as ``ITransport | None``; a connected
pulsyflux protocol always has one, and uses a little more of it than
``ITransport`` says: ``abortConnection`` (``ITCPTransport``) and
``registerProducer`` (``IConsumer``). TCP, UNIX, TLS and in-process
transports all have both.
"""

from __future__ import annotations

from twisted.internet.interfaces import IConsumer, ITCPTransport

__all__ = ["IStreamTransport"]


class IStreamTransport(ITCPTransport, IConsumer):
    """What pulsyflux uses of a connection's transport (for type checking: never provided or adapted to)."""
