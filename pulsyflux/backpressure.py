"""Backpressure for the router: a connection that cannot keep up pauses the
connections that feed it, instead of letting the server buffer without bound.

Each server connection registers a :class:`Backpressure` as the streaming
producer of its transport. Twisted calls :meth:`~Backpressure.pauseProducing`
when the transport's user-space send buffer passes its high-water mark
(``transport.bufferSize``, 64 KiB) and :meth:`~Backpressure.resumeProducing`
once that buffer has drained (the low-water mark: empty, while the kernel's
socket buffer still holds data to send). While paused, the connection's
``write`` is swapped for one that also stops *reading* from the connection
whose frame is being routed (``router.reading``); every connection it held
is resumed when it drains. Nothing is dropped, and while nothing is paused
the hot path does no extra work at all.

A provider or consumer lives on one channel, so a slow peer pauses only
connections of its own channel; other channels never wait for it.

    flow = Backpressure(conn, router)
    conn.transport.registerProducer(flow, True)
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

__all__ = ["Backpressure"]


@implementer(IPushProducer)
class Backpressure:
    """The flow-control state of one server connection.

    ``held`` are the connections this one stopped reading from (it is their
    destination); ``blocked_by`` are the destinations keeping this one paused.
    """

    __slots__ = ("conn", "router", "paused", "held", "blocked_by", "_unpaused_write", "_gone")

    def __init__(self, conn: Any, router: Any) -> None:
        self.conn = conn
        self.router = router
        self.paused = False
        self.held: set[Backpressure] = set()
        self.blocked_by: set[Backpressure] = set()
        self._unpaused_write: Optional[Callable[[bytes], None]] = None
        self._gone = False

    # -- IPushProducer: called by this connection's transport -----------------

    def pauseProducing(self) -> None:
        """The send buffer is over the high-water mark."""
        if not self.paused and not self._gone:
            self.paused = True
            conn = self.conn
            self._unpaused_write = conn.write
            conn.write = self._paused_write
        self._hold_reading()

    def resumeProducing(self) -> None:
        """The send buffer has drained: restore the fast write, resume sources."""
        if self.paused:
            self.paused = False
            self.conn.write = self._unpaused_write
            self._unpaused_write = None
        self._release_all()
        transport = self.conn.transport
        if getattr(transport, "disconnecting", False):
            # Twisted closes a connection only once its producer is gone.
            transport.unregisterProducer()

    def stopProducing(self) -> None:
        """The connection is gone: free everything it held or was held by."""
        if self._gone:
            return
        self._gone = True
        if self.paused:
            self.paused = False
            self.conn.write = self._unpaused_write
            self._unpaused_write = None
        self._release_all()
        for destination in self.blocked_by:
            destination.held.discard(self)
        self.blocked_by.clear()

    # -- internals ------------------------------------------------------------------

    def _paused_write(self, data: bytes) -> None:
        self._unpaused_write(data)  # type: ignore[misc]
        self._hold_reading()

    def _hold_reading(self) -> None:
        """Stop reading from the connection whose frame is being routed here."""
        source_conn = self.router.reading
        if source_conn is None:
            return  # written by a timer or a disconnect, not forwarded
        source = source_conn.flow
        if source is None or source in self.held or source._gone:
            return
        self.held.add(source)
        if not source.blocked_by:
            source_conn.transport.pauseProducing()
        source.blocked_by.add(self)

    def _release_all(self) -> None:
        held, self.held = self.held, set()
        for source in held:
            source.blocked_by.discard(self)
            if not source.blocked_by and not source._gone:
                source.conn.transport.resumeProducing()

    @property
    def reading_paused(self) -> bool:
        """True while some slow destination keeps this connection unread."""
        return bool(self.blocked_by)
