"""Types for the seams between pulsyflux and Twisted.

Twisted types ``Protocol.transport`` as ``ITransport | None``; a connected
pulsyflux protocol always has one, and uses a little more of it than
``ITransport`` says: ``abortConnection`` (``ITCPTransport``) and
``registerProducer`` (``IConsumer``), and the server pauses and resumes
its reading (``IPushProducer``). TCP, UNIX, TLS and in-process transports
have all three.
"""

from __future__ import annotations

from twisted.internet.interfaces import IConsumer, IPushProducer, ITCPTransport

__all__ = ["IStreamTransport"]


class IStreamTransport(ITCPTransport, IConsumer, IPushProducer):
    """What pulsyflux uses of a connection's transport (for type checking: never provided or adapted to)."""
