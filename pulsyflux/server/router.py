"""The pulsyflux router: decides where every frame goes.

Three pieces, each with one job (compare Twisted's AMP):

* the codec (:mod:`pulsyflux.wire.codec`) turns bytes into frames;
* :class:`Router` (here) holds the registry and the requests in flight and
  decides where every frame goes (docs/protocol.md: a conversation, where we do better); it is
  driven through :class:`Peer` records, with no Protocol needed;
* :class:`~pulsyflux.server.protocol.ServerProtocol` is the thin adapter
  between a TCP connection and the router.
"""

from __future__ import annotations

import heapq
import time
import weakref
from bisect import bisect_left
from collections import Counter, deque
from typing import TYPE_CHECKING, Any, Callable, Iterable, NamedTuple, Optional, Sequence, TypedDict

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .._types import IStreamTransport
from ..endpoints import describe_address
from ..wire import codec, errors, messages
from ..wire.codec import (
    CHUNK,
    END,
    ERROR,
    FLAG_REGISTRATION,
    JOIN_LIMIT,
    RESPONSE,
    RESPONSE_CHUNK,
    RESPONSE_END,
    RESPONSE_START,
    ROLE_CONSUMER,
    ROLE_PROVIDER,
    ROUTING_SIZE,
    START,
    ZERO_ROUTING,
)
from ..wire.deadlines import Deadlines
from ..wire.errors import MSG_CHANNEL_RESERVED, MSG_CLIENT_MISMATCH, error_kind
from ..wire.printable import short_error_text
from ..wire.ratelimit import LogLimiter, summary_to
from ..writer import coalesce, hang_up
from .backpressure import DEFAULT_MAX_UNSENT, DEFAULT_MAX_UNSENT_TOTAL, Backpressure, FlowControl
from .guard import DEFAULT_FRAME_TIMEOUT, DEFAULT_MAX_PARTIAL_BYTES, DEFAULT_REGISTER_TIMEOUT, ConnectionGuard

if TYPE_CHECKING:  # the adapter and the token identity, for their types only (both import this module's side)
    from ..auth.gate import Gate
    from ..auth.tokens import Authority, Identity
    from .protocol import ServerProtocol

__all__ = [
    "Router",
    "Limits",
    "Peer",
    "ServerStats",
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

# Limits a server enforces (docs/reliability.md); ServerFactory takes each as a keyword.
DEFAULT_MAX_BODY = 64 << 20  # bytes in one request body, and in one response body
DEFAULT_MAX_IN_FLIGHT = 10_000  # requests one connection may have in flight
DEFAULT_MAX_CONNECTIONS = 10_000  # client connections at once (the fd limit applies too)
DEFAULT_GRACE = 10.0  # seconds a shutdown waits for the requests in flight

# What a foreign provider registering on a reserved channel (the broker's) gets.

_encode_header = codec.HEADER.pack
_VERSION = codec.VERSION
_HEADER = codec.HEADER_SIZE
_START_SIZE = codec.START_FRAME_SIZE
_START_ROUTING = codec.START_ROUTING_OFFSET
_unpack_metadata_from = codec.METADATA.unpack_from

# A flush of at most _GATHER_PIECES pieces, one of them at least _GATHER_FROM bytes, is written with one
# gather write (Peer.write_pieces) instead of joined: joining a large piece costs PyPy more than the gather.
_GATHER_FROM = 2048
_GATHER_PIECES = 8

RegistryKey = tuple[int, bytes, bytes]  # (role, channel id, client id)

ROLE_NAMES = {ROLE_CONSUMER: "consumer", ROLE_PROVIDER: "provider"}
RELAY_ROLE = "cluster relay"  # the role stats give a cluster relay's record (see Peer.relay)


class Census(NamedTuple):
    """What :meth:`Router.census` counts: connections by role, channels, requests (never a channel id)."""

    open: int  # client connections open now (the server's own broker's and relays are not: see by_role)
    by_role: dict[str, int]  # "consumer", "provider", "unregistered", "broker", "cluster relay" -> connections
    channels: int  # channels some connection registered on
    with_providers: int  # of those, channels with a provider
    without_provider: int  # channels with consumers only
    in_flight: int  # requests between their START and the end of their response


# What ServerStats keeps of error texts: a few recent ones, each short.
RECENT_ERRORS = 20
RECENT_ERROR_CHARS = 200
PROVIDER_ERROR = "provider error"  # the kind every ERROR a provider sends is counted under
_PROVIDER_PREFIX = PROVIDER_ERROR + ": "

# Upper bounds (seconds) of the request latency histogram's buckets, START to the end of the response.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LatencyHistogram:
    """Request latencies in fixed buckets (Prometheus style): a few integers, whatever the traffic.

    ``counts[i]`` holds the requests that took at most ``LATENCY_BUCKETS[i]``
    seconds and more than the bucket before; the last count is the overflow.
    """

    __slots__ = ("counts", "sum", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, requests at most that long) per bucket, ending with (inf, all)."""
        total = 0
        out = []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.counts):
            total += count
            out.append((bound, total))
        return out


class ServerStats:
    """Counters an operator reads (``/stats``, ``/metrics``).

    ``errors`` counts ERROR frames by kind (:func:`pulsyflux.wire.errors.error_kind`
    of the server's own messages, ``"provider error"`` for any a provider
    sends): a small, fixed vocabulary whatever texts go by.
    ``recent_errors`` holds the last :data:`RECENT_ERRORS` texts, each cut to
    :data:`RECENT_ERROR_CHARS` printable characters.
    """

    def __init__(self) -> None:
        self.started = time.time()
        self.connections_total = 0  # client connections accepted (not the server's own broker's)
        self.requests_routed = 0  # requests from clients handed to a provider
        self.broker_requests_routed = 0  # the same, from the server's own broker (its forwards to subscribers)
        self.latency = LatencyHistogram()  # clients' requests, START to the end of the response
        self.frames_dropped = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.protocol_errors = 0
        self.slow_consumers = 0  # connections closed for leaving too much unread (backpressure.py)
        self.errors: Counter[str] = Counter()  # by kind
        self.recent_errors: deque[str] = deque(maxlen=RECENT_ERRORS)

    @property
    def responses_routed(self) -> int:
        """Clients' requests whose response was routed to the end: the latency histogram counts each once."""
        return self.latency.count

    def error(self, message: str) -> None:
        """Count one of the server's own error messages (by kind) and keep its text as a recent one."""
        self.errors[error_kind(message)] += 1
        self.recent_errors.append(
            message if len(message) <= RECENT_ERROR_CHARS else short_error_text(message, RECENT_ERROR_CHARS)
        )

    def provider_error(self, text: bytes) -> None:
        """Count an ERROR a provider sent (``text``: its message bytes, of any size)."""
        self.errors[PROVIDER_ERROR] += 1
        self.recent_errors.append(_PROVIDER_PREFIX + short_error_text(text, RECENT_ERROR_CHARS - len(_PROVIDER_PREFIX)))


class Peer:
    """What the router keeps of one connection, and owns: :meth:`Router.connect` makes it.

    ``key`` is the (role, channel id, client id) it registered with, or None;
    ``outbox`` the frames routed to it during the current read; ``started``
    the requests it sent as a consumer, ``assigned`` those given to it as a
    provider; ``flow`` its flow-control state. ``write`` and ``transport``
    are all the router needs of the I/O side (``transport`` for flow control
    and for closing), so a router can be driven with no Protocol at all:

        peer = router.connect(output.append, transport)
        router.frame_received(peer, ftype, flags, request_id, frame)
        router.flush()

    ``conn`` is the adapter (a :class:`ServerProtocol`), held weakly, or None.
    ``bytes_in``/``frames_in`` count what it sent (per read), ``bytes_out``/``frames_out``
    what was written to it (per flush), ``since`` when it connected (the router's clock).
    ``held`` and ``frame_serial`` are the :class:`ConnectionGuard`'s: the bytes of
    an incomplete frame its adapter's decoder holds, as the guard last saw them, and
    which frame that was (the decoder's ``partials``). A peer exists from admission:
    until it registers (``key`` None) the guard times its registration.
    """

    __slots__ = (
        "key",
        "bytes_in",
        "bytes_out",
        "frames_in",
        "frames_out",
        "since",
        "outbox",
        "started",
        "assigned",
        "flow",
        "held",
        "frame_serial",
        "trusted",
        "relay",
        "identity",
        "write",
        "write_pieces",
        "deliver",
        "transport",
        "_conn",
        "__weakref__",
    )

    def __init__(
        self,
        write: Callable[[bytes], None],
        transport: IStreamTransport,
        trusted: bool = False,
        conn: Optional[ServerProtocol] = None,
    ) -> None:
        self.write = write
        # ``write`` for a few pieces at once, without joining them (a socket's gather write), if the adapter has one.
        self.write_pieces: Optional[Callable[[list[bytes]], None]] = None
        # Hands a flush's whole frames (and their size) to the client end of an in-process link as they
        # are, not joined into bytes to decode again, when order allows (pulsyflux.server.inproc): True if taken.
        self.deliver: Optional[Callable[[list[bytes], int], bool]] = None
        self.transport = transport
        self.trusted = trusted
        # A cluster relay (pulsyflux.cluster.requests): a provider record for a channel another server
        # holds, or the consumer record other servers' requests enter through. Trusted too.
        self.relay = False
        self.identity: Optional[Identity] = None  # the verified token's Identity (pulsyflux.auth.gate); None: anonymous
        self.key: Optional[RegistryKey] = None
        self.bytes_in = self.bytes_out = self.frames_in = self.frames_out = 0
        self.since = 0.0
        self.outbox: list[bytes] = []
        self.started: set[bytes] = set()
        self.assigned: set[bytes] = set()
        self.flow: Backpressure  # set by Router.connect, before any frame is routed
        self.held = 0  # bytes of an incomplete frame in the adapter's decoder, as the guard last saw
        self.frame_serial = 0  # the decoder's ``partials`` for that frame
        self._conn = None if conn is None else weakref.ref(conn)

    @property
    def conn(self) -> Optional[ServerProtocol]:
        """The adapter this peer belongs to (a :class:`ServerProtocol`), or None."""
        ref = self._conn
        return None if ref is None else ref()


class _InFlight:
    """One request between its START and the end of its response."""

    __slots__ = (
        "request_id",
        "consumer",
        "provider",
        "routing",
        "responding",
        "request_size",
        "request_limit",
        "response_size",
        "started",
    )

    def __init__(self, request_id: bytes, consumer: Peer, provider: Peer, routing: bytes, started: float) -> None:
        self.request_id = request_id
        self.started = started  # the router's clock at its START: for the latency histogram
        self.consumer = consumer
        self.provider = provider
        self.routing = routing
        self.responding = False  # its RESPONSE_START has come: chunks and the end may follow
        self.request_size = 0
        self.request_limit = 0  # bytes its body may take (set by the router at its START)
        self.response_size = 0


class Limits(TypedDict, total=False):
    """The limits :class:`Router` takes as keywords, for those that pass them on (``ServerFactory``).

    The type of ``**limits`` only: the defaults and their meaning stay with :class:`Router`.
    """

    max_body: int
    max_in_flight: int
    max_connections: int
    max_unsent: int
    max_unsent_total: int
    frame_timeout: float
    register_timeout: float
    max_partial_bytes: int


def _any_outside(providers: "Iterable[Peer]") -> bool:
    """Whether any of ``providers`` came from outside the server (not its own in-process ones)."""
    return any(not peer.trusted for peer in providers)


class Router:
    """Registry of connections and the routing policy.

    Responses are routed by the request id the server remembers, never by
    trusting the routing bytes a provider sends: a response reaches only the
    connection that sent the request, and only from the provider that
    request was given to.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        *,
        max_body: int = DEFAULT_MAX_BODY,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_unsent: int = DEFAULT_MAX_UNSENT,
        max_unsent_total: int = DEFAULT_MAX_UNSENT_TOTAL,
        frame_timeout: float = DEFAULT_FRAME_TIMEOUT,
        register_timeout: float = DEFAULT_REGISTER_TIMEOUT,
        max_partial_bytes: int = DEFAULT_MAX_PARTIAL_BYTES,
    ) -> None:
        self.clock = clock
        self.registry: dict[RegistryKey, Peer] = {}
        self.providers: dict[bytes, list[Peer]] = {}
        self._next_provider: dict[bytes, int] = {}
        # Told when a channel gains its first provider from outside, or loses its last, and when
        # such a channel is guarded or no longer (a subscriber's: never advertised while guarded).
        # The cluster advertises the channels this server holds: pulsyflux.cluster.requests.
        self.on_channel: Optional[Callable[[bytes, bool], None]] = None
        self.requests: dict[bytes, _InFlight] = {}
        self.deadlines = Deadlines(clock, self.requests, self._expire)  # one timer, not one per request
        self._timers_due = False  # a read started or ended requests: flush arms or clears the timer
        self.peers: set[Peer] = set()  # every connected peer
        self.stats = ServerStats()
        self.reading: Optional[Peer] = None  # whose frames are being routed now (backpressure)
        self.flow_control = FlowControl(self, max_unsent, max_unsent_total)
        self._dirty: list[Peer] = []  # peers with frames queued during this read
        self.max_body = max_body
        self.max_message_body = messages.wire_limit(max_body)  # for requests of broker messages
        self.max_connections = max_connections
        self._max_in_flight = max_in_flight
        self._draining = False
        # What _start compares a connection's requests in flight with: max_in_flight, or 0 while
        # draining, so that one test on the START path covers both (draining is its own state).
        self._start_limit = max_in_flight
        self._idle_waiters: list[Deferred[None]] = []
        # Channels only trusted connections (the server's own broker) may provide on.
        self.reserved: set[bytes] = set()
        # Channels only trusted connections may send requests on (channel -> guards held).
        self.guarded: dict[bytes, int] = {}
        # Log lines a peer can trigger are rate-limited; idle and stalled peers are closed.
        self.log_limiter = LogLimiter(clock, summary_to(self.log))
        self.connection_guard = ConnectionGuard(
            clock, self.stats, self.log_limiter, frame_timeout, register_timeout, max_partial_bytes
        )
        # Tokens and grants (pulsyflux.auth.gate.Gate), set by enable_auth; None: everyone may do everything.
        self.gate: Optional[Gate] = None

    def enable_auth(self, authority: Authority) -> Gate:
        """Check tokens and grants from now on (``--auth``); returns the :class:`~pulsyflux.auth.gate.Gate`."""
        from ..auth.gate import Gate

        self.gate = Gate(authority, self)
        return self.gate

    @property
    def max_in_flight(self) -> int:
        """Requests one connection may have in flight; past it a START gets ``server overloaded: ...``."""
        return self._max_in_flight

    @max_in_flight.setter
    def max_in_flight(self, value: int) -> None:
        self._max_in_flight = value
        if not self._draining:
            self._start_limit = value

    @property
    def draining(self) -> bool:
        """Shutting down: every new request is refused with ``server overloaded: shutting down``
        (but the trusted broker's: it forwards what it accepted during the grace period).

        The in-process endpoint (:mod:`pulsyflux.server.inproc`) refuses new connections meanwhile.
        """
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = bool(value)
        self._start_limit = 0 if value else self._max_in_flight

    # -- the server's own channels ---------------------------------------------

    def reserve(self, channel: bytes) -> None:
        """Only trusted connections may register as providers on ``channel``.

        The server that runs the broker owns its channel: a foreign provider
        there would be handed a share of every publish. It is refused with
        :data:`MSG_CHANNEL_RESERVED` and its connection closed.
        """
        self.reserved.add(bytes(channel))

    def guard(self, channel: bytes) -> Callable[[], None]:
        """Only trusted connections may send requests on ``channel``; returns the call that ends it.

        The broker guards each subscriber's channel while it forwards there,
        so nobody else can inject messages into the subscription. Others
        get ``peer disappeared``, as if nobody served it (existence is not
        revealed). Providers may still register: the subscriber is one.
        """
        channel = bytes(channel)
        guarded = self.guarded
        count = guarded.get(channel, 0)
        guarded[channel] = count + 1
        if not count and self.on_channel is not None and _any_outside(self.providers.get(channel, ())):
            self.on_channel(channel, False)  # a subscriber's channel is not for other servers either
        released = False

        def unguard() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = guarded.get(channel, 0) - 1
            if left > 0:
                guarded[channel] = left
            else:
                guarded.pop(channel, None)
                if self.on_channel is not None and _any_outside(self.providers.get(channel, ())):
                    self.on_channel(channel, True)

        return unguard

    # -- registry -----------------------------------------------------------

    def register(self, conn: Peer, role: int, channel: bytes, client_id: bytes) -> None:
        if conn.key is not None:
            return  # a connection keeps the one role and channel it first named
        key = (role, channel, client_id)
        conn.key = key
        self.registry[key] = conn
        self.connection_guard.registered(conn)
        if role == ROLE_PROVIDER:
            providers = self.providers.setdefault(channel, [])
            if (
                self.on_channel is not None
                and not conn.trusted
                and not _any_outside(providers)
                and channel not in self.guarded
            ):
                self.on_channel(channel, True)
            providers.append(conn)

    def unregister(self, conn: Peer) -> None:
        key = conn.key
        if key is None:
            return
        conn.key = None
        if self.registry.get(key) is conn:
            del self.registry[key]
        role, channel, _ = key
        if role == ROLE_PROVIDER:
            providers = self.providers.get(channel)
            if providers is not None and conn in providers:
                providers.remove(conn)
                if not providers:
                    del self.providers[channel]
                    self._next_provider.pop(channel, None)
            if (
                self.on_channel is not None
                and not conn.trusted
                and not _any_outside(providers or ())
                and channel not in self.guarded
            ):
                self.on_channel(channel, False)

    def _pick_here(self, channel: bytes) -> Optional[Peer]:
        """The next provider of ``channel`` on this server (not a cluster relay to another)."""
        for _ in range(len(self.providers.get(channel, ()))):
            provider = self.pick_provider(channel)
            if provider is not None and not provider.relay:
                return provider
        return None

    def watch_channels(self, callback: Optional[Callable[[bytes, bool], None]]) -> list[bytes]:
        """Call ``callback(channel, held)`` when a channel gains its first provider from outside the
        server, or loses its last, and when such a channel is guarded (False) or no longer (True);
        returns the channels held now, guarded ones left out (None: stop)."""
        self.on_channel = callback
        guarded = self.guarded
        return [
            channel
            for channel, providers in self.providers.items()
            if channel not in guarded and _any_outside(providers)
        ]

    def pick_provider(self, channel: bytes) -> Optional[Peer]:
        providers = self.providers.get(channel)
        if not providers:
            return None
        index = self._next_provider.get(channel, 0)
        if index >= len(providers):
            index = 0
        self._next_provider[channel] = index + 1
        return providers[index]

    # -- connections ----------------------------------------------------------

    def connect(
        self,
        write: Callable[[bytes], None],
        transport: IStreamTransport,
        trusted: bool = False,
        conn: Optional[ServerProtocol] = None,
    ) -> Peer:
        """A new peer: its record, with its flow state (register ``peer.flow`` as the transport's producer).

        ``write`` sends bytes to it; ``transport`` is paused, resumed and
        closed by flow control and :meth:`close_all`; ``conn`` is its adapter, if any.
        An untrusted peer is admitted by the :class:`ConnectionGuard` first
        (``max_connections``): refused, it is sent one ERROR and closed, and
        :class:`Refused` is raised (its adapter reads nothing more).
        """
        peer = Peer(write, transport, trusted, conn)
        if not trusted and not self.connection_guard.admit(peer, self.max_connections):
            message = errors.overloaded(f"more than {self.max_connections} connections")
            self.stats.error(message)
            transport.write(codec.encode_frame(ERROR, bytes(16), codec.error_payload(message)))
            hang_up(transport)
            raise Refused(message)
        peer.since = self.clock.seconds()
        peer.flow = self.flow_control.attach(peer)
        self.peers.add(peer)
        if not trusted:
            self.stats.connections_total += 1
            if self.log_limiter.allow("client connected"):
                self.log.info("client {peer} connected", peer=_peer_address(transport))
        return peer

    def disconnected(self, conn: Peer) -> None:
        """``conn`` is gone: route nothing more to or from it, and free its flow state."""
        self.peers.discard(conn)
        conn.flow.stopProducing()
        if self.gate is not None:
            self.gate.disconnected(conn)
        if not conn.trusted and self.log_limiter.allow("client left"):
            # The role, never the channel: a subscriber's channel id is its only secret.
            self.log.info(
                "client {peer} ({role}) left after {age:.1f} s: {frames_in} frames in, {frames_out} out",
                peer=_peer_address(conn.transport),
                role=ROLE_NAMES.get(conn.key[0], "?") if conn.key is not None else "unregistered",
                age=self.clock.seconds() - conn.since,
                frames_in=conn.frames_in,
                frames_out=conn.frames_out,
            )
        self.forget(conn)
        self.connection_guard.disconnected(conn)

    @property
    def connections(self) -> set[ServerProtocol]:
        """The adapter (:class:`ServerProtocol`) of every connected peer that has one."""
        return {conn for conn in (peer.conn for peer in self.peers) if conn is not None}

    def forget(self, conn: Peer) -> None:
        """Route nothing more to or from ``conn``: unregister it, end its requests (a disconnect, a slow reader)."""
        self.unregister(conn)
        for request_id in list(conn.started):
            entry = self.requests.get(request_id)
            if entry is not None and entry.consumer is conn:
                self._finish(entry)
                if entry.provider is not conn:  # so it frees the partial body and may stop working
                    self._tell_provider(entry, errors.MSG_PEER_DISAPPEARED)
        for request_id in list(conn.assigned):
            entry = self.requests.get(request_id)
            if entry is not None and entry.provider is conn:
                self._finish(entry)
                self._server_error(entry.consumer, request_id, errors.MSG_PEER_DISAPPEARED, entry.routing)

    def census(self) -> Census:
        """Count the connections by role and the channels they use, for stats (no id leaves here)."""
        roles = {"consumer": 0, "provider": 0, "unregistered": 0, "broker": 0, RELAY_ROLE: 0}
        consumers: set[bytes] = set()
        providers: set[bytes] = set()
        for conn in self.peers:
            key = conn.key
            if conn.trusted:
                # The server's own broker, or a cluster relay: not clients, and their channels are not theirs.
                roles[RELAY_ROLE if conn.relay else "broker"] += 1
                continue
            if key is None:
                roles["unregistered"] += 1
                continue
            role, channel, _ = key
            name = ROLE_NAMES.get(role, "unknown")
            roles[name] = roles.get(name, 0) + 1
            (providers if role == ROLE_PROVIDER else consumers).add(channel)
        return Census(
            open=len(self.peers) - roles["broker"] - roles[RELAY_ROLE],
            by_role=roles,
            channels=len(consumers | providers),
            with_providers=len(providers),
            without_provider=len(consumers - providers),
            in_flight=len(self.requests),
        )

    def connection_list(self, limit: int) -> tuple[list[dict[str, Any]], int]:
        """The ``limit`` busiest connections (bytes in + out) as operators see them, and how many were left out.

        Like NATS's ``/connz``: remote address, role, bytes and frames each
        way, age. Never a channel or client id (a channel id is the
        capability to use the channel).
        """
        now = self.clock.seconds()
        peers = self.peers
        shown = peers if len(peers) <= limit else heapq.nlargest(limit, peers, key=_traffic)
        listed = []
        for peer in sorted(shown, key=_traffic, reverse=True):
            key = peer.key
            if peer.trusted:
                role = RELAY_ROLE if peer.relay else "broker"
            elif key is None:
                role = "unregistered"
            else:
                role = ROLE_NAMES.get(key[0], "unknown")
            transport = peer.transport
            try:
                remote = describe_address(transport.getPeer())
            except Exception:  # noqa: BLE001 - a transport closing meanwhile, or one without getPeer
                remote = "?"
            listed.append(
                {
                    "remote": remote,
                    "role": role,
                    "age_seconds": round(max(now - peer.since, 0.0), 3),
                    "bytes_in": peer.bytes_in,
                    "bytes_out": peer.bytes_out,
                    "frames_in": peer.frames_in,
                    "frames_out": peer.frames_out,
                    "requests_in_flight": len(peer.started) + len(peer.assigned),
                }
            )
        return listed, len(peers) - len(listed)

    def fail_all(self, message: str) -> None:
        """End every request in flight: its consumer gets ``message`` (a shutdown whose grace is over)."""
        for entry in list(self.requests.values()):
            self._finish(entry)
            self._server_error(entry.consumer, entry.request_id, message, entry.routing)

    def close_all(self, abort: bool = True) -> "Deferred[Any]":
        """Close every connection open now; fires once all of them are gone.

        ``abort`` resets them at once (a crash, a test's teardown); otherwise
        each is closed once it has written what it has queued (a shutdown,
        which aborts what is left later).
        """
        peers = list(self.peers)
        adapters = [conn for conn in (peer.conn for peer in peers) if conn is not None]
        gone = DeferredList([conn.closed() for conn in adapters], consumeErrors=True)
        for peer in peers:
            if abort:
                peer.transport.abortConnection()
            else:
                hang_up(peer.transport)
        return gone

    # -- frames ---------------------------------------------------------------

    def send(self, conn: Peer, data: bytes) -> None:
        """Write to ``conn``; while a read is being routed, queue it: one write per destination and read."""
        if self.reading is None:
            conn.frames_out += 1
            conn.write(data)  # a timer or a disconnect
            if conn.flow.paused:
                self.flow_control.wrote(conn, len(data))
            return
        outbox = conn.outbox
        if not outbox:
            self._dirty.append(conn)
        outbox.append(data)

    def flush(self) -> None:
        """Hand every queued frame to its connection's ``write``; tell flow control about slow ones."""
        dirty = self._dirty
        for conn in dirty:  # a slow reader's cut may add a connection: it is flushed too
            outbox = conn.outbox
            conn.frames_out += len(outbox)
            deliver = conn.deliver
            if deliver is not None and deliver(outbox, size := sum(map(len, outbox))):
                # An in-process client (the broker's consumers: its forwards' answers) took them as frames.
                self.stats.bytes_out += size
                conn.bytes_out += size
            elif len(outbox) == 1:  # the usual case (one frame routed there this read): no call, no list
                conn.write(outbox[0])
            elif (largest := max(map(len, outbox))) <= JOIN_LIMIT:  # small frames (a request, a response): one write
                if largest >= _GATHER_FROM and len(outbox) <= _GATHER_PIECES and conn.write_pieces is not None:
                    conn.write_pieces(outbox)  # a forward's body and its headers: sent as they are, not joined
                else:
                    conn.write(b"".join(outbox))
            else:
                for data in coalesce(outbox):  # large ones are written on their own, never copied
                    conn.write(data)
            if conn.flow.paused:  # its send buffer is over the high-water mark
                self.flow_control.wrote(conn, sum(map(len, outbox)))
            outbox.clear()
        dirty.clear()
        if self._timers_due:
            self._settle_timers()

    def _timers_changed(self) -> None:
        """Requests started or ended: the deadline timer is settled now, or after the read's frames have left."""
        if self.reading is None:
            self._settle_timers()
        else:
            self._timers_due = True

    def _settle_timers(self) -> None:
        """After a read's frames have left: the deadline timer of the requests it started or ended."""
        self._timers_due = False
        if self.requests:
            self.deadlines.arm()
        else:
            self.deadlines.clear()  # an idle router holds no timer

    def frame_received(self, conn: Peer, ftype: int, flags: int, request_id: bytes, frame: bytes) -> None:
        """Route one frame; ``frame`` is the whole frame as it came, header included."""
        if ftype == CHUNK or ftype == END:  # the request's body and end: _request_frame, inline (per frame)
            entry = self.requests.get(request_id)
            if entry is None or entry.consumer is not conn:
                return  # the registration END, or the tail of a request that already failed: its ERROR was sent
            size = entry.request_size + len(frame) - _HEADER
            if size > entry.request_limit:
                self._too_large(entry, "request")
                return
            entry.request_size = size
            self.send(entry.provider, frame)  # unchanged: forwarded as it came
        elif ftype == RESPONSE_CHUNK or ftype == RESPONSE_END or ftype == RESPONSE_START:
            self._response_frame(conn, ftype, request_id, frame)
        elif ftype == START:
            self._start(conn, flags, request_id, frame)
        elif ftype == ERROR or ftype == RESPONSE:
            self._response_frame(conn, ftype, request_id, frame)
        elif ftype == codec.PROBE and len(frame) == _HEADER:
            # A client's registration probe: the usual answer, not counted as an error.
            self.send(conn, codec.encode_frame(ERROR, request_id, codec.error_payload(errors.MSG_BAD_TYPE)))
        elif ftype == codec.AUTH and self.gate is not None:
            if not self.gate.authenticate(conn, request_id, frame[_HEADER:]):
                raise Refused(errors.PREFIX_PERMISSION_DENIED)
        else:
            self._server_error(conn, request_id, errors.MSG_BAD_TYPE)

    def _start(self, conn: Peer, flags: int, request_id: bytes, frame: bytes) -> None:
        if len(frame) != _START_SIZE:
            self._server_error(conn, request_id, errors.MSG_BAD_START_LENGTH)
            return
        role, timeout_ms, client_id, channel = _unpack_metadata_from(frame, _HEADER)
        routing = frame[_START_ROUTING:]  # the metadata's client id and channel id, as one slice
        self._begin(conn, flags, request_id, role, timeout_ms, client_id, channel, routing)

    def _begin(
        self,
        conn: Peer,
        flags: int,
        request_id: bytes,
        role: int,
        timeout_ms: int,
        client_id: bytes,
        channel: bytes,
        routing: bytes,
    ) -> Optional[_InFlight]:
        """A START's rules once its metadata is read (from a frame, or given by :meth:`request`):
        register, refuse, or route it; returns the request in flight, if routed."""
        if role != ROLE_CONSUMER and role != ROLE_PROVIDER:
            self._server_error(conn, request_id, errors.MSG_BAD_ROLE)
            return None
        key = conn.key  # read once: this path is per request
        if key is None:
            if role == ROLE_PROVIDER and channel in self.reserved and not conn.trusted:
                self._server_error(conn, request_id, MSG_CHANNEL_RESERVED)
                raise Refused(MSG_CHANNEL_RESERVED)
            gate = self.gate
            if gate is not None and not conn.trusted:
                verdict = gate.admit(conn, role, channel, client_id, request_id)
                if verdict is not None:
                    if verdict:
                        raise Refused(errors.PREFIX_PERMISSION_DENIED)
                    return None  # held until the broker claims the channel for a subscription (gate.py)
            self.register(conn, role, channel, client_id)
            key = conn.key
        if flags & FLAG_REGISTRATION or role != ROLE_CONSUMER:
            return None  # registration only: the server answers nothing
        if client_id != key[2]:  # type: ignore[index]  # registered just above if it was not
            self._server_error(conn, request_id, MSG_CLIENT_MISMATCH, routing)
            return None
        if request_id in self.requests:
            self._server_error(conn, request_id, errors.MSG_DUPLICATE_ID, routing)
            return None
        if len(conn.started) >= self._start_limit and not (  # max_in_flight, or 0 while draining
            # but the server's own broker, which forwards what it accepted during the grace period
            # (not a cluster inlet, also trusted: other servers' requests are new work)
            self._draining and conn.trusted and not conn.relay and len(conn.started) < self._max_in_flight
        ):
            if self._draining:
                message = errors.MSG_SHUTTING_DOWN
            else:
                message = errors.overloaded(f"more than {self._max_in_flight} requests in flight on one connection")
            self._server_error(conn, request_id, message, routing)
            return None
        provider = self.pick_provider(channel)
        if (
            provider is not None
            and provider.relay
            and (conn.relay or channel in self.reserved or channel in self.guarded)
        ):
            # Stays here: a request relayed from another server, and any on the broker's channel or a
            # subscriber's (no other server holds those; one that says so in Redis gets none of them).
            provider = self._pick_here(channel)
        if provider is None or (channel in self.guarded and not conn.trusted):
            self._server_error(conn, request_id, errors.MSG_PEER_DISAPPEARED, routing)
            return None
        now = self.clock.seconds()
        entry = _InFlight(request_id, conn, provider, routing, now)
        # Publishes to the broker and its forwards carry payloads in base64: their
        # limit is max_body bytes of payload, so the wire form may take more.
        entry.request_limit = self.max_message_body if conn.trusted or channel in self.reserved else self.max_body
        self.requests[request_id] = entry
        conn.started.add(request_id)
        provider.assigned.add(request_id)
        if provider.flow.blocked_by:  # a slow consumer keeps it unread
            self.flow_control.serving(provider, conn)
        if timeout_ms and self.deadlines.push(request_id, entry, now + timeout_ms / 1000.0):
            # It holds until the response is complete. The timer is armed after
            # the START has left (flush): one request at a time, its DelayedCall is made off the critical path.
            self._timers_changed()
        if not conn.trusted:
            self.stats.requests_routed += 1
        elif not conn.relay:  # other servers' requests (a cluster inlet) are the cluster's: requests_served
            self.stats.broker_requests_routed += 1
        self.send(provider, _encode_header(_VERSION, START, flags, request_id, ROUTING_SIZE) + routing)
        return entry

    def request(
        self,
        conn: Peer,
        request_id: bytes,
        timeout_ms: int,
        client_id: bytes,
        channel: bytes,
        parts: Sequence[bytes],
        size: int,
    ) -> None:
        """A consumer's whole request (its START, one CHUNK, its END) given as values, not frames.

        Routed as :meth:`frame_received` routes those three frames, but the
        provider's frames are written from the values: the payload (``parts``
        joined, ``size`` bytes, at most ``codec.MAX_PAYLOAD``) is copied once,
        into the provider's write, where frames carrying it are copied three
        times (framed by the client, sliced by the decoder, joined with their
        START here). For a registered connection in this process, while its
        read is routed (``ServerProtocol.request``, for :mod:`pulsyflux.server.inproc`:
        the broker's forwards).
        """
        assert self.reading is conn  # what is sent is queued, and flushed by the caller
        entry = self._begin(conn, 0, request_id, ROLE_CONSUMER, timeout_ms, client_id, channel, client_id + channel)
        if entry is None:
            return
        provider = entry.provider
        if size:
            if size > entry.request_limit:
                self._too_large(entry, "request")
                return
            entry.request_size = size
            self.send(provider, _encode_header(_VERSION, CHUNK, 0, request_id, size))
            provider.outbox += parts  # after the CHUNK's header (send queued it: the peer is due a flush)
            provider.frames_out -= len(parts)  # one frame, written as its header and its pieces (flush counts pieces)
        self.send(provider, _encode_header(_VERSION, END, 0, request_id, 0))

    def _response_frame(self, conn: Peer, ftype: int, request_id: bytes, frame: bytes) -> None:
        entry = self.requests.get(request_id)
        if entry is None or entry.provider is not conn:
            self.stats.frames_dropped += 1
            if ftype == ERROR:
                # No request of this provider's: an error with nowhere to go
                # goes back to its sender (docs/protocol.md, Errors).
                if self.log_limiter.allow("unroutable ERROR"):  # twistd writes debug lines too
                    self.log.debug("returning unroutable ERROR to its sender")
                self.send(conn, frame)
            return
        if ftype == RESPONSE_CHUNK:
            if not entry.responding:
                self._bad_response(entry, errors.bad_response("a response chunk came before its start"))
                return
            entry.response_size += len(frame) - _HEADER
            if entry.response_size > self.max_body:
                self._too_large(entry, "response")
                return
        elif ftype == RESPONSE_END:
            if not entry.responding:
                self._bad_response(entry, errors.bad_response("a response end came before its start"))
                return
        elif frame[_HEADER : _HEADER + ROUTING_SIZE] != entry.routing:
            # Frames that carry routing must name the consumer that asked. The
            # request fails: nothing of this response reaches the consumer.
            self._bad_response(entry, errors.bad_response("the provider's routing does not match the request"))
            return
        elif ftype == RESPONSE_START:
            entry.responding = True
        elif ftype == ERROR:
            self.stats.provider_error(frame[_HEADER + ROUTING_SIZE :])
        if ftype != RESPONSE_START and ftype != RESPONSE_CHUNK:
            self._finish(entry)
            if not entry.consumer.trusted:  # the broker's forwards are left out, as at their START
                self.stats.latency.observe(self.clock.seconds() - entry.started)  # counts responses_routed too
        self.send(entry.consumer, frame)

    def _finish(self, entry: _InFlight) -> None:
        request_id = entry.request_id
        del self.requests[request_id]
        entry.consumer.started.discard(request_id)
        entry.provider.assigned.discard(request_id)
        if not self.requests:
            self._timers_changed()  # an idle router holds no timer: cleared after the response has left
            if self._idle_waiters:
                waiters, self._idle_waiters = self._idle_waiters, []
                for d in waiters:
                    d.callback(None)

    def when_idle(self) -> "Deferred[None]":
        """Fires once no request is in flight (at once if none is)."""
        if not self.requests:
            return succeed(None)
        d: Deferred[None] = Deferred(self._idle_waiters.remove)  # cancelled: stop waiting
        self._idle_waiters.append(d)
        return d

    def _too_large(self, entry: _InFlight, which: str) -> None:
        """Fail a request whose body passed ``max_body``: both sides drop it, its later frames are ignored."""
        if which == "request" and entry.request_limit != self.max_body:
            why = (
                f"its body exceeds the server's {entry.request_limit}-byte limit for broker messages"
                f" (payloads of up to {self.max_body} bytes, in base64)"
            )
        else:
            why = f"its body exceeds the server's {self.max_body}-byte limit"
        self._fail(entry, errors.too_large(which, why))

    def _bad_response(self, entry: _InFlight, message: str) -> None:
        """Fail a request whose provider broke the protocol: none of the rest of its response is forwarded."""
        self.stats.frames_dropped += 1
        self._fail(entry, message)

    def _expire(self, request_id: bytes, entry: _InFlight) -> None:
        """The deadline passed before the response was complete, whatever was sent of it."""
        self._fail(entry, errors.MSG_TIMED_OUT)

    def _fail(self, entry: _InFlight, message: str) -> None:
        """End a request with ``message`` to both sides; its later frames are dropped."""
        self._finish(entry)
        self._server_error(entry.consumer, entry.request_id, message, entry.routing)
        if entry.provider is not entry.consumer:
            self._tell_provider(entry, message)

    def _tell_provider(self, entry: _InFlight, message: str) -> None:
        """An ERROR (routing + message, as Go providers tolerate) telling the provider a request is over.

        The provider frees what it holds of the request, and its answer, if
        any, will be dropped. Counted once, with the consumer's error.
        """
        self.send(
            entry.provider, codec.encode_frame(ERROR, entry.request_id, codec.error_payload(message, entry.routing))
        )

    def _server_error(self, conn: Peer, request_id: bytes, message: str, routing: bytes = ZERO_ROUTING) -> None:
        self.stats.error(message)
        self.send(conn, codec.encode_frame(ERROR, request_id, codec.error_payload(message, routing)))


def _traffic(peer: Peer) -> int:
    return peer.bytes_in + peer.bytes_out


class Refused(Exception):
    """Raised by the router to stop reading a connection it refused (the ERROR is queued)."""


def _peer_address(transport: object) -> str:
    """Where a connection comes from, as text (``host:port``, ``unix:...``), for a log line."""
    get_peer = getattr(transport, "getPeer", None)
    return describe_address(get_peer()) if get_peer is not None else "?"
