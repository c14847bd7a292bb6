"""Types for the seams between pulsyflux and Twisted.

Twisted types ``Protocol.transport`` as ``ITransport | None``; a connected
pulsyflux protocol always has one, and uses a little more of it than
``ITransport`` says: ``abortConnection`` (``ITCPTransport``) and
``registerProducer`` (``IConsumer``), and the server pauses and resumes
its reading (``IPushProducer``). TCP, UNIX, TLS and in-process transports
have all three.

A reactor is typed by what the code asks of it: most classes only keep time
(``IReactorTime``: a ``Clock`` will do in a test); the programs (the CLI,
twistd's services, the benchmarks) run, stop, listen and spawn: they take an
``IReactor``, the type Twisted gives its own global reactor (core, time,
TCP, processes, file descriptors), so that reactor needs no cast. A test's
``MemoryReactorClock`` lacks processes: a program it drives is cast to
``IReactor`` on purpose. These are for the type checker only: nothing checks
or adapts to them at run time (no cost on any path), and ``IReactor`` exists
only while type checking (import it under ``TYPE_CHECKING``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.interfaces import (
    IConsumer,
    IPushProducer,
    ITCPTransport,
)

__all__ = ["IStreamTransport", "IReactor"]


class IStreamTransport(ITCPTransport, IConsumer, IPushProducer):
    """What pulsyflux uses of a connection's transport (for type checking: never provided or adapted to)."""


if TYPE_CHECKING:
    # Twisted's own name for it (``twisted.internet.reactor`` is typed so);
    # if a release drops it, mypy fails here first.
    from twisted.internet import _IReactorCommon as IReactor
