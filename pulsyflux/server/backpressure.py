"""Backpressure for the router: push back on the slow reader alone.

Each server connection registers a :class:`Backpressure` as the streaming
producer of its transport. Twisted calls :meth:`~Backpressure.pauseProducing`
when the transport's send buffer passes its high-water mark (TCP:
``transport.bufferSize``, 64 KiB) and :meth:`~Backpressure.resumeProducing`
once that buffer has drained. While a destination is paused, every write the
router makes to it goes through :meth:`FlowControl.wrote`, which decides whom
to stop reading from (``transport.pauseProducing()``):

* the destination itself, when it serves nobody else's requests: a consumer
  that reads no answers may send no more requests;
* the connection whose frame is being routed there (``router.reading``),
  when pausing it hurts nobody but the slow one: a consumer feeding a slow
  provider, or a provider all of whose requests in hand belong to the slow
  consumer (it streams that consumer's big response). A provider that also
  serves anyone else keeps being read, and the first request it is given
  from another consumer frees it again;
* nobody else: a provider is never cut (its feeders are paused, so what
  waits for it is bounded by their reads); what cannot wait for a consumer
  is queued for it, counted
  (``unsent``), and bounded per connection (``max_unsent``) and across all
  of them (``max_unsent_total``). Past a bound the slow connection gets one
  ``server overloaded: slow consumer: ...`` ERROR, loses its requests, and
  is closed (aborted ``linger`` seconds later if it still reads nothing).

So one client that never reads its answers can never stall a provider other
clients share (the broker's included): it only stalls itself. Only the
public transport interface is used, so any transport with producer support
works. While nothing is paused the hot path pays one attribute test per
destination per read.

The state of a connection lives in its :class:`Backpressure`, which refers
back to the router's :class:`~pulsyflux.server.Peer` only weakly: a closed
connection is freed at once, not by the cycle collector.

    peer = router.connect(write, transport)  # peer.flow = flow_control.attach(peer)
    transport.registerProducer(peer.flow, True)
"""

from __future__ import annotations

import weakref
from operator import attrgetter
from typing import TYPE_CHECKING, Optional

from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from ..wire import codec, errors
from ..writer import hang_up

if TYPE_CHECKING:  # the router imports this module; the types only go the other way
    from .router import Peer, Router

__all__ = [
    "Backpressure",
    "FlowControl",
    "DEFAULT_MAX_UNSENT",
    "DEFAULT_MAX_UNSENT_TOTAL",
    "DEFAULT_SLOW_LINGER",
]

DEFAULT_MAX_UNSENT = 4 << 20  # bytes queued for one connection past its high-water mark
DEFAULT_MAX_UNSENT_TOTAL = 256 << 20  # the same, summed over every connection
DEFAULT_SLOW_LINGER = 2.0  # seconds a slow reader being closed may still read its ERROR
_RECHECK = 64 * 1024  # a source left running is reconsidered after this many more queued bytes


@implementer(IPushProducer)
class Backpressure:
    """The flow-control state of one server connection.

    ``held`` are the connections this one stopped reading from (possibly
    itself); ``blocked_by`` are the destinations keeping this one unread;
    ``unsent`` the bytes queued for it past the high-water mark; ``spared``
    the sources it chose not to pause (with ``unsent`` when it decided).
    """

    __slots__ = ("_conn", "control", "paused", "held", "blocked_by", "unsent", "spared", "cut", "_linger", "_gone")

    def __init__(self, conn: Peer, control: "FlowControl") -> None:
        self._conn = weakref.ref(conn)  # weak: the connection owns this record, not the reverse
        self.control = control
        self.paused = False
        self.held: set[Backpressure] = set()
        self.blocked_by: set[Backpressure] = set()
        self.unsent = 0
        self.spared: dict[Backpressure, int] = {}
        self.cut = False  # closed for reading too slowly
        self._linger: Optional[IDelayedCall] = None
        self._gone = False

    @property
    def conn(self) -> Optional[Peer]:
        """The connection, or None once it is gone."""
        return self._conn()

    @property
    def reading_paused(self) -> bool:
        """True while some slow destination keeps this connection unread."""
        return bool(self.blocked_by)

    # -- IPushProducer: called by this connection's transport -----------------

    def pauseProducing(self) -> None:
        """The send buffer is over the high-water mark: the next writes are counted."""
        if not self._gone:
            self.paused = True

    def resumeProducing(self) -> None:
        """The send buffer has drained: forget the count, resume what it held."""
        self.paused = False
        self.control._settle(self)
        self.spared.clear()
        self._release_all()
        conn = self._conn()
        transport = None if conn is None else conn.transport
        if transport is not None and getattr(transport, "disconnecting", False):
            # Twisted closes a connection only once its producer is gone.
            transport.unregisterProducer()

    def stopProducing(self) -> None:
        """The connection is gone: free everything it held or was held by."""
        if self._gone:
            return
        self._gone = True
        self.paused = False
        self.control._settle(self)
        self.spared.clear()
        if self._linger is not None:
            if self._linger.active():
                self._linger.cancel()
            self._linger = None
        self._release_all()
        for destination in self.blocked_by:
            destination.held.discard(self)
        self.blocked_by.clear()

    # -- holding and releasing ---------------------------------------------------

    def _hold(self, source: "Backpressure") -> None:
        """Stop reading from ``source`` until this connection drains."""
        if source._gone or source in self.held:
            return
        self.held.add(source)
        if not source.blocked_by:
            conn = source._conn()
            if conn is not None:
                conn.transport.pauseProducing()
        source.blocked_by.add(self)

    def _release(self, source: "Backpressure") -> None:
        self.held.discard(source)
        source.blocked_by.discard(self)
        if not source.blocked_by and not source._gone:
            conn = source._conn()
            if conn is not None:
                conn.transport.resumeProducing()

    def _release_all(self) -> None:
        held, self.held = self.held, set()
        for source in held:
            source.blocked_by.discard(self)
            if not source.blocked_by and not source._gone:
                conn = source._conn()
                if conn is not None:
                    conn.transport.resumeProducing()


class FlowControl:
    """The policy and the bounds, shared by the connections of one router.

    The router calls :meth:`wrote` after writing to a connection whose
    ``flow.paused`` is set, and :meth:`serving` when it gives a request to
    a provider that some destination keeps unread.
    """

    log = Logger()

    def __init__(
        self,
        router: Router,
        max_unsent: int = DEFAULT_MAX_UNSENT,
        max_unsent_total: int = DEFAULT_MAX_UNSENT_TOTAL,
        linger: float = DEFAULT_SLOW_LINGER,
    ) -> None:
        self.router = router
        self.max_unsent = max_unsent
        self.max_unsent_total = max_unsent_total
        self.linger = linger
        self.unsent_total = 0
        self.backlogged: set[Backpressure] = set()  # flows with unsent bytes, for the global bound

    def attach(self, conn: Peer) -> Backpressure:
        """A new connection's flow state (register it as the transport's producer)."""
        return Backpressure(conn, self)

    def wrote(self, conn: Peer, size: int) -> None:
        """``size`` bytes were just written to ``conn``, whose send buffer is over the high-water mark."""
        flow: Backpressure = conn.flow
        if flow.cut or flow._gone:
            return
        key = conn.key
        source = self.router.reading
        provider = key is not None and key[0] == codec.ROLE_PROVIDER
        if conn.trusted or (provider and source is not conn):
            # A provider is sent requests, and whoever sends them is paused below, so
            # what waits for it is bounded by its feeders' reads: it is never closed
            # as a slow reader (a burst from a few dozen consumers would then end any
            # service). The server's own broker (pulsyflux.server.inproc) also takes all it
            # is sent on the next reactor turn.
            if source is not None and source is not conn:
                self._consider(flow, conn, source)
            return
        flow.unsent += size
        self.unsent_total += size
        self.backlogged.add(flow)
        if provider:
            # Answers to a provider's own frames (its unroutable ERRORs, bad types)
            # that it does not read: it stops being read, and is counted and cut
            # like any slow reader, whoever else it serves.
            flow._hold(flow)
        else:
            self._consider(flow, conn, conn)  # a consumer that reads nothing may send nothing
        if source is not None and source is not conn:
            self._consider(flow, conn, source)
        if flow.unsent > self.max_unsent:
            self._cut(flow, conn, f"more than {self.max_unsent} bytes waiting for it to read")
        elif self.unsent_total > self.max_unsent_total:
            victim = max(self.backlogged, key=_by_unsent)  # the slowest pays, not the last to write
            victim_conn = victim.conn
            if victim_conn is not None:
                self._cut(victim, victim_conn, f"the server holds more than {self.max_unsent_total} unread bytes")

    def serving(self, provider: Peer, consumer: Peer) -> None:
        """``provider`` was given ``consumer``'s request: pausing it for anyone else now hurts."""
        pflow: Backpressure = provider.flow
        cflow = consumer.flow
        for destination in list(pflow.blocked_by):
            if destination is not cflow:
                destination._release(pflow)

    # -- internals ------------------------------------------------------------------

    def _consider(self, dest: Backpressure, dest_conn: Peer, source_conn: Peer) -> None:
        """Hold ``source_conn`` for ``dest`` if that keeps every other client going."""
        source: Backpressure = source_conn.flow
        if source in dest.held:
            return
        checked = dest.spared.get(source)
        if checked is not None and dest.unsent - checked < _RECHECK:
            return  # decided lately: not rescanned for every frame
        if self._harmless(source_conn, dest_conn):
            dest.spared.pop(source, None)
            dest._hold(source)
        else:
            dest.spared[source] = dest.unsent

    def _harmless(self, source_conn: Peer, dest_conn: Peer) -> bool:
        """True if every request ``source_conn`` serves comes from ``dest_conn`` (or itself)."""
        requests = self.router.requests
        for request_id in source_conn.assigned:
            entry = requests.get(request_id)
            if entry is not None:
                consumer = entry.consumer
                if consumer is not dest_conn and consumer is not source_conn:
                    return False
        return True

    def _settle(self, flow: Backpressure) -> None:
        """``flow``'s queued bytes are sent (or dropped): take them off the total."""
        self.unsent_total -= flow.unsent
        flow.unsent = 0
        self.backlogged.discard(flow)

    def _cut(self, flow: Backpressure, conn: Peer, why: str) -> None:
        """Close a connection that reads too slowly: one ERROR, its requests dropped."""
        router = self.router
        message = errors.overloaded(f"slow consumer: {why}")
        flow.cut = True
        self._settle(flow)  # freed within ``linger`` seconds at most
        flow.spared.clear()
        flow._release_all()
        stats = router.stats
        stats.slow_consumers += 1
        stats.error(message)  # counted by kind: "server overloaded"
        transport = conn.transport
        if router.log_limiter.allow("closing"):  # peers decide how often: rate-limited
            self.log.info("closing {peer}: {message}", peer=transport.getPeer(), message=message)
        router.forget(conn)  # as if gone: its requests fail or end, nothing more is routed to it
        adapter = conn.conn
        if adapter is not None:
            adapter.stop_reading()  # nor from it: its ERROR is the last thing it gets (TLS reads on until closed)
        conn.write(codec.encode_frame(codec.ERROR, bytes(16), codec.error_payload(message)))
        hang_up(transport)
        flow._linger = router.clock.callLater(self.linger, transport.abortConnection)


_by_unsent = attrgetter("unsent")
