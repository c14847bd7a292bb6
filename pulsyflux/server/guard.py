"""Connections that hold the server's resources without using them are closed.

A peer costs the server a connection slot from its first byte and memory for
every incomplete frame it leaves in its decoder. Without bounds, peers that
connect and say nothing, or send half a header, or all but the last byte of
a 1 MiB frame, hold those for ever (issue #8, items 7 and 8). The
:class:`ConnectionGuard` of a server closes, with one ERROR frame:

* a connection that has not registered (sent a valid START) within
  ``register_timeout`` seconds;
* a connection whose incomplete frame has stayed incomplete for
  ``frame_timeout`` seconds (not counting time the server itself stopped
  reading it: flow control);
* while the bytes held in incomplete frames of all connections exceed
  ``max_partial_bytes``, the connection whose incomplete frame is the oldest;
* when ``max_connections`` are open, the oldest connection that has not
  registered yet if it has had ``EVICT_AFTER`` seconds to do so (or half the
  register timeout, if less), making room for the newcomer; otherwise the
  newcomer is refused. Honest clients register within a round trip, so idle
  peers can lock others out for about a second, not for good.

Trusted connections (the server's own broker, ``ServerProtocol.trusted``)
are exempt from all of it. The guard works on the router's :class:`~pulsyflux.server.router.Peer`
records, which keep its per-connection state (``held``, ``frame_serial``), so
a router driven with no Protocol is guarded too. One reactor timer serves every connection: the
connections waiting to register, and those holding an incomplete frame,
are kept oldest first, so each firing looks only at those due. The frame
path pays nothing while reads end on frame boundaries (the common case):
:meth:`holding` runs only while a connection holds bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from .._twisted_compat import tls_handshake_pending
from ..wire import codec, errors
from ..wire.codec import ERROR, FrameDecoder
from ..wire.ratelimit import LogLimiter, shorten
from ..writer import hang_up

if TYPE_CHECKING:  # the server imports this module
    from .router import Peer, ServerStats

__all__ = [
    "ConnectionGuard",
    "DEFAULT_FRAME_TIMEOUT",
    "DEFAULT_REGISTER_TIMEOUT",
    "DEFAULT_MAX_PARTIAL_BYTES",
]

DEFAULT_FRAME_TIMEOUT = 30.0  # seconds one frame may take to arrive whole
DEFAULT_REGISTER_TIMEOUT = 10.0  # seconds a new connection has to send its first valid START
DEFAULT_MAX_PARTIAL_BYTES = 256 << 20  # bytes held in incomplete frames, all connections together
EVICT_AFTER = 1.0  # seconds after which an unregistered connection may make room for a newcomer
LINGER = 5.0  # seconds a closed connection may take to flush its ERROR before it is aborted

log = Logger()


class ConnectionGuard:
    """The timeouts and the partial-frame budget of one server (see the module docstring)."""

    def __init__(
        self,
        clock: IReactorTime,
        stats: ServerStats,
        limiter: LogLimiter,
        frame_timeout: float = DEFAULT_FRAME_TIMEOUT,
        register_timeout: float = DEFAULT_REGISTER_TIMEOUT,
        max_partial_bytes: int = DEFAULT_MAX_PARTIAL_BYTES,
    ) -> None:
        self.clock = clock
        self.stats = stats
        self.limiter = limiter
        self.frame_timeout = frame_timeout
        self.register_timeout = register_timeout
        self.max_partial_bytes = max_partial_bytes
        self.partial_bytes = 0  # held in incomplete frames now, all connections together
        self.counted: set[Peer] = set()  # the untrusted connections, which max_connections counts
        self._unregistered: dict[Peer, float] = {}  # connection -> when it connected, oldest first
        self._partial: dict[Peer, float] = {}  # connection -> when its incomplete frame began, oldest first
        self._closing: dict[Peer, float] = {}  # closed here, not gone yet -> when
        self._timer: Optional[IDelayedCall] = None
        self._timer_at = float("inf")

    # -- called by the Router (admit, registered, disconnected) and ServerProtocol (holding) --

    def admit(self, conn: Peer, max_connections: int) -> bool:
        """A new untrusted connection: True if it may stay (room made if need be)."""
        if len(self.counted) >= max_connections:
            oldest = self._oldest_unregistered()
            grace = min(EVICT_AFTER, self.register_timeout / 2)
            if oldest is None or self._unregistered[oldest] + grace > self.clock.seconds():
                return False
            self.close(oldest, errors.overloaded(f"more than {max_connections} connections"))
        self.counted.add(conn)
        self._unregistered[conn] = self.clock.seconds()
        self._arm()
        return True

    def holding(self, conn: Peer, held: int, serial: int) -> None:
        """``conn``'s decoder holds ``held`` bytes of an incomplete frame (or none any more).

        ``serial`` is the decoder's ``partials``: a new value means a new frame.
        """
        if conn.trusted:
            conn.frame_serial = serial
            return
        self.partial_bytes += held - conn.held
        conn.held = held
        partial = self._partial
        if not held:
            if partial.pop(conn, None) is not None:
                self._cancel_if_idle()
            return
        if serial != conn.frame_serial:  # a new frame was cut: its clock starts now
            conn.frame_serial = serial
            partial.pop(conn, None)
            partial[conn] = self.clock.seconds()
            self._arm()
        if self.partial_bytes > self.max_partial_bytes:
            while self.partial_bytes > self.max_partial_bytes and partial:
                self.close(
                    next(iter(partial)),
                    errors.overloaded(f"incomplete frames hold more than {self.max_partial_bytes} bytes"),
                )

    def registered(self, conn: Peer) -> None:
        """``conn`` sent its first valid START: its register timeout is over."""
        if self._unregistered.pop(conn, None) is not None:
            self._cancel_if_idle()

    def disconnected(self, conn: Peer) -> None:
        self.counted.discard(conn)
        self.partial_bytes -= conn.held
        conn.held = 0
        self._unregistered.pop(conn, None)
        self._partial.pop(conn, None)
        self._closing.pop(conn, None)
        self._cancel_if_idle()

    def _cancel_if_idle(self) -> None:
        if not (self._unregistered or self._partial or self._closing):
            self._cancel()  # nothing to watch: no timer

    def close(self, conn: Peer, message: str) -> None:
        """Send ``conn`` one ERROR saying why, free what it held, and close it."""
        self.stats.error(message)
        self.partial_bytes -= conn.held
        conn.held = 0
        self._unregistered.pop(conn, None)
        self._partial.pop(conn, None)
        adapter = conn.conn
        if adapter is not None:
            adapter.stop_reading()  # nothing more is read, or held
            adapter.decoder = FrameDecoder(with_header=True)
        transport = conn.transport
        if self.limiter.allow("closing"):
            log.info("closing {peer}: {reason}", peer=transport.getPeer(), reason=shorten(message))
        if tls_handshake_pending(transport):
            # TLS that never finished its handshake (Twisted's TLSMemoryBIOProtocol):
            # no ERROR can reach the peer, and a clean close would wait for it.
            transport.abortConnection()
            return
        transport.write(codec.encode_frame(ERROR, bytes(16), codec.error_payload(message)))
        hang_up(transport)
        self._closing[conn] = self.clock.seconds()
        self._arm()

    @property
    def timer_due(self) -> Optional[float]:
        """When its one timer fires (the clock's time); None while it watches nothing (no timer at all)."""
        return self._timer_at if self._timer is not None else None

    def stop(self) -> None:
        self._cancel()

    # -- the one timer ----------------------------------------------------------------

    def _oldest_unregistered(self) -> Optional[Peer]:
        waiting = self._unregistered
        while waiting:
            conn = next(iter(waiting))
            if conn.key is None:
                return conn
            del waiting[conn]  # registered since: forgotten lazily
        return None

    def _due(self) -> Optional[float]:
        due = []
        if self._unregistered:
            due.append(next(iter(self._unregistered.values())) + self.register_timeout)
        if self._partial:
            due.append(next(iter(self._partial.values())) + self.frame_timeout)
        if self._closing:
            due.append(next(iter(self._closing.values())) + LINGER)
        return min(due) if due else None

    def _arm(self) -> None:
        """Have the timer fire when the earliest entry is due (entries only ever come due later)."""
        due = self._due()
        if due is None or due >= self._timer_at:
            return
        self._cancel()
        self._timer_at = due
        self._timer = self.clock.callLater(max(0.0, due - self.clock.seconds()), self._fire)

    def _cancel(self) -> None:
        timer, self._timer = self._timer, None
        self._timer_at = float("inf")
        if timer is not None and timer.active():
            timer.cancel()

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        now = self.clock.seconds()
        waiting = self._unregistered
        while waiting:
            conn, since = next(iter(waiting.items()))
            if conn.key is not None:
                del waiting[conn]
            elif since + self.register_timeout <= now:
                self.close(conn, errors.register_timeout(f"no START within {self.register_timeout:g} s of connecting"))
            else:
                break
        partial = self._partial
        while partial:
            conn, since = next(iter(partial.items()))
            if since + self.frame_timeout > now:
                break
            del partial[conn]
            flow = conn.flow
            if flow is not None and flow.reading_paused:
                partial[conn] = now  # the server stopped reading it (flow control): not the peer's delay
            else:
                self.close(conn, errors.frame_timeout(f"a frame stayed incomplete for {self.frame_timeout:g} s"))
        closing = self._closing
        while closing:
            conn, since = next(iter(closing.items()))
            if since + LINGER > now:
                break
            del closing[conn]
            conn.transport.abortConnection()  # it would not take its ERROR: gone anyway
        self._arm()
