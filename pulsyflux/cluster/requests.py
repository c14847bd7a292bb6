"""Requests across servers: a consumer here reaches providers on other servers.

For every channel another server holds (registry.py), this server's router
has a *relay*: a provider record (a :class:`~pulsyflux.server.router.Peer`
marked ``relay``, with no connection and no client library behind it),
which the router takes in its round-robin beside the local providers (one
turn per other server holding the channel). The frames the router routes
to a relay are read here: a whole request goes to that server's inbox
channel on Redis (``<prefix>n:<node>``) in pieces of at most 512 KiB. There
an *inlet*, a consumer record in that server's router (one per channel,
also marked ``relay``), hands it to a local provider (never to a relay:
the router keeps relayed requests on their server), and the answer comes
back the same way, each piece handed to the asking router as a response
frame as it arrives. The deadline stays where the request entered: the
router there answers the consumer when it expires, and tells the relay,
which tells the other server.

Frames between the router and these records are plain function calls (no
in-process connection, no Deferred, no timer per request); what the Redis
reads of one reactor turn hand to the router is written out in one flush
at the end of that read (:meth:`ClusterRequests.settle`).

Memory is bounded on both sides: requests in flight per server, bytes
being forwarded out and bytes being reassembled in, and what one other
server may have here at once (requests and bytes: a faulty server cannot
starve the others); past any of these, a clear ``server overloaded`` error.
No body is larger than the server's ``--max-body``. A server that leaves
the registry (its lease expired, its link to Redis down) takes its relays
with it, and its requests in flight fail with ``peer disappeared``.
"""

from __future__ import annotations

import collections
import itertools
import os
from typing import TYPE_CHECKING, Any, Callable, Optional, cast

from twisted.internet.interfaces import IDelayedCall, IProducer, IReactorTime
from twisted.logger import Logger

from ..server.inproc import InProcessAddress
from ..wire import codec, errors
from ..wire.codec import (
    CHUNK,
    END,
    ERROR,
    MAX_ERROR_TEXT,
    MAX_PAYLOAD,
    RESPONSE,
    RESPONSE_CHUNK,
    RESPONSE_END,
    RESPONSE_START,
    ROLE_CONSUMER,
    ROLE_PROVIDER,
    ROUTING_SIZE,
    START,
    FrameDecoder,
    bound_error_text,
)
from ..wire.ratelimit import LogLimiter, summary_to

if TYPE_CHECKING:
    from .._types import IStreamTransport
    from ..server.protocol import ServerFactory
    from ..server.router import Peer
    from .link import RedisLink

__all__ = ["ClusterRequests"]

log = Logger()

CHUNK_BYTES = 512 * 1024  # bytes of a body per Redis message
MAX_IN_FLIGHT = 10_000  # requests this server forwards at once; and other servers' requests held here
MAX_OUT_BYTES = 256 << 20  # bytes of bodies being forwarded at once
MAX_IN_BYTES = (
    256 << 20
)  # bytes of other servers' requests being reassembled here, and of answers kept for slow readers
# What one other server may make this one hold: half of each bound, so a faulty (or hijacked)
# server cannot starve the others' requests.
MAX_FROM_ONE = MAX_IN_FLIGHT // 2
MAX_IN_BYTES_FROM_ONE = MAX_IN_BYTES // 2
RELAY_TIMEOUT = 300.0  # seconds a relayed request may wait for its answer (the real deadline is the consumer's)
INCOMPLETE_TIMEOUT = 30.0  # seconds the rest of a request in pieces may take to arrive before its pieces go
# What holding one piece costs beside its bytes (its tuple or list slot: about 115 bytes of CPython), charged
# in in_bytes with them: empty pieces (``more`` 1, no body) are not free, so another server cannot make this
# one hold millions of them under the byte bound.
PIECE_COST = 128

_VERSION = codec.VERSION
_pack_header = codec.HEADER.pack
_pack_start = codec.START_FRAME.pack
_METADATA_SIZE = codec.METADATA_SIZE
_HEADER = codec.HEADER_SIZE
_RELAY_TIMEOUT_MS = int(RELAY_TIMEOUT * 1000)


class _Transport:
    """What the router needs of a relay's or an inlet's connection: a name to show, a pause, a close.

    Flow control pauses a relay as it pauses a provider's connection, while a
    consumer it answers reads too slowly: the relay then keeps the answer's
    further pieces (Redis is read eagerly whatever happens: docs/cluster.md)
    until it is resumed. An inlet is never paused.
    """

    disconnecting = False

    def __init__(self, label: str, close: Callable[[], None], relay: Optional["_Relay"] = None) -> None:
        self._address = InProcessAddress(label)
        self._close = close
        self._relay = relay

    def getPeer(self) -> InProcessAddress:
        return self._address

    getHost = getPeer

    def pauseProducing(self) -> None:
        if self._relay is not None:
            self._relay.paused = True

    def resumeProducing(self) -> None:
        relay = self._relay
        if relay is not None and relay.paused:
            relay.paused = False
            relay.owner.resumed(relay)

    def stopProducing(self) -> None:
        pass

    unregisterProducer = stopProducing

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass

    def loseConnection(self) -> None:
        self._close()  # the router closing every connection (a shutdown): the record goes

    abortConnection = loseConnection


def _transport(label: str, close: Callable[[], None], relay: Optional[_Relay] = None) -> IStreamTransport:
    """A relay's or an inlet's stand-in transport, as the router's type for it: it has what the router calls."""
    return cast("IStreamTransport", _Transport(label, close, relay))


class _Relay:
    """A provider record in the router for a channel another server holds."""

    __slots__ = (
        "owner", "key", "node", "inbox", "head", "tail", "peer", "decoder", "starting", "sent", "live", "paused", "kept",
    )  # fmt: skip

    def __init__(self, owner: "ClusterRequests", node: str, channel: bytes) -> None:
        self.owner = owner
        self.key = (node, channel)
        self.node = node
        self.inbox = owner.inbox(node)
        # The header of a request to node, around its id (computed once, not per request).
        self.head = b"q " + owner.node.encode("utf-8") + b" "
        self.tail = b" " + channel.hex().encode("ascii")
        self.decoder = FrameDecoder()
        self.starting: dict[bytes, list[bytes]] = {}  # router request id -> [routing, body pieces...]
        self.sent: dict[bytes, bytes] = {}  # router request id -> Redis request id
        self.live = True
        self.paused = False  # flow control holds it: answers' pieces wait in kept
        self.kept: collections.deque[tuple[_Out, bytes, bool, bytes]] = collections.deque()
        router = owner.router
        self.peer = router.connect(self.write, _transport(f"cluster:{node}", self.close, self), trusted=True)
        self.peer.relay = True
        router.register(self.peer, ROLE_PROVIDER, channel, os.urandom(16))

    def write(self, data: bytes) -> None:
        """Frames the router routes to this provider: requests (START, CHUNK, END) and give-ups (ERROR)."""
        self.peer.bytes_out += len(data)  # what a connection's adapter counts, for /stats
        starting = self.starting
        for ftype, _flags, request_id, payload in self.decoder.frames(data):
            if ftype == CHUNK:
                held = starting.get(request_id)
                if held is not None and payload:  # an empty piece adds nothing to the body: not held
                    held.append(payload)
            elif ftype == END:
                held = starting.pop(request_id, None)
                if held is not None:
                    self.owner.forward(self, request_id, held)
            elif ftype == START:
                starting[request_id] = [payload]  # the routing the answer must carry
            elif ftype == ERROR:
                # The router gave up on a request (its consumer's deadline, the consumer left, too large).
                if starting.pop(request_id, None) is None:
                    self.owner.abandoned(self, request_id)

    def close(self) -> None:
        self.owner.drop_relay(self.key)


class _Serving:
    """Another server's request, handed to this server's router through an inlet."""

    __slots__ = ("origin", "rid", "parts", "size", "cancelled")

    def __init__(self, origin: str, rid: bytes) -> None:
        self.origin = origin
        self.rid = rid
        self.parts: list[bytes] = []
        self.size = 0  # bytes of parts and PIECE_COST a part, counted in the owner's in_bytes until answered()
        self.cancelled = False  # its server gave up: the answer is dropped when it comes


class _Inlet:
    """A consumer record in the router for one channel: other servers' requests enter through it."""

    __slots__ = ("owner", "channel", "channel_hex", "client", "peer", "decoder", "waiting")

    def __init__(self, owner: "ClusterRequests", channel: bytes, channel_hex: bytes) -> None:
        self.owner = owner
        self.channel = channel
        self.channel_hex = channel_hex
        self.client = os.urandom(16)
        self.decoder = FrameDecoder()
        self.waiting: dict[bytes, _Serving] = {}  # router request id -> the request, until the router answers
        router = owner.router
        self.peer = router.connect(self.write, _transport("cluster", self.close), trusted=True)
        self.peer.relay = True
        router.register(self.peer, ROLE_CONSUMER, channel, self.client)

    def write(self, data: bytes) -> None:
        """Frames the router routes to this consumer: answers from the providers here, or errors."""
        self.peer.bytes_out += len(data)  # what a connection's adapter counts, for /stats
        waiting = self.waiting
        owner = self.owner
        for ftype, _flags, request_id, payload in self.decoder.frames(data):
            if ftype == RESPONSE_CHUNK:
                serving = waiting.get(request_id)
                if serving is not None and not serving.cancelled:
                    # An answer is held whole until it goes to Redis: counted with what arrives from
                    # other servers, so providers here cannot make this server hold more than that bound.
                    size = len(payload) + PIECE_COST
                    if owner.in_bytes + size > MAX_IN_BYTES:
                        del waiting[request_id]
                        owner.answered(serving, False, errors.overloaded("too many bytes of answers to other servers"))
                    else:
                        owner.in_bytes += size
                        serving.size += size
                        serving.parts.append(payload)
            elif ftype == RESPONSE_END:
                serving = waiting.pop(request_id, None)
                if serving is not None:
                    parts = serving.parts
                    owner.answered(serving, True, parts[0] if len(parts) == 1 else b"".join(parts))
            elif ftype == ERROR:
                serving = waiting.pop(request_id, None)
                if serving is not None:
                    owner.answered(serving, False, codec.error_message(payload))
            elif ftype == RESPONSE:  # the legacy single frame, from an old provider
                serving = waiting.pop(request_id, None)
                if serving is not None:
                    owner.answered(serving, True, payload[ROUTING_SIZE:])

    def close(self) -> None:
        self.owner.release(self.channel)


class _Out:
    __slots__ = ("rid", "relay", "local", "routing", "size", "responding", "born")

    def __init__(self, rid: bytes, relay: _Relay, local: bytes, routing: bytes, size: int, born: int) -> None:
        self.rid = rid  # its id between the servers
        self.relay = relay
        self.local = local  # the router's request id
        self.routing = routing
        self.size = size
        self.responding = False  # its RESPONSE_START was handed to the router
        self.born = born  # the sweep it was sent in (one timer for all: see _sweep)


class _In:
    """A request from another server still arriving in pieces."""

    __slots__ = ("parts", "size", "cost", "timer")

    def __init__(self, timer: Optional[IDelayedCall]) -> None:
        self.parts: list[bytes] = []
        self.size = 0  # bytes of the body so far (bounded by max_body)
        self.cost = 0  # what is counted in in_bytes and bytes_from: size, and PIECE_COST a piece
        self.timer = timer


class ClusterRequests:
    """Relays for the channels other servers hold; this server's inbox for theirs."""

    def __init__(
        self, link: RedisLink, node: str, factory: ServerFactory, reactor: IReactorTime, *, prefix: str
    ) -> None:
        self.link = link
        self.node = node
        self.factory = factory
        self.router = factory.router
        self.reactor = reactor
        self.prefix = prefix
        self.max_body = getattr(self.router, "max_body", 64 << 20)
        self.relays: dict[tuple[str, bytes], _Relay] = {}
        self.inlets: dict[bytes, _Inlet] = {}  # by channel, opened on first use
        self.inlets_by_hex: dict[bytes, _Inlet] = {}  # the same, by the hex id requests name them by
        self.out: dict[bytes, _Out] = {}  # forwarded, by Redis request id
        self.out_bytes = 0
        self.incoming: dict[tuple[str, bytes], _In] = {}  # requests in pieces, (origin, rid)
        self.serving: dict[tuple[str, bytes], _Serving] = {}  # handed to the router here, (origin, rid)
        self.held_from: dict[str, int] = {}  # requests each other server has here (arriving or in the router)
        self.held = 0  # their sum: other servers' requests arriving, or in the router (given up on or not)
        # Bytes each other server makes this one hold: its requests being reassembled, and its answers kept
        # for slow consumers here (PIECE_COST a piece included); bounded by MAX_IN_BYTES_FROM_ONE.
        self.bytes_from: dict[str, int] = {}
        self.incomplete_timeout = INCOMPLETE_TIMEOUT
        self.in_bytes = 0
        self.forwarded = 0  # requests sent to other servers
        self.served = 0  # requests other servers sent here, answered
        self.failed = 0  # forwarded requests that failed here (link down, overloaded, server gone)
        self.bad = 0  # inbox messages that were not ours to read
        self.cancelled = 0  # forwarded requests whose consumer gave up (deadline, left): the other server told
        self.refused_from_one = 0  # requests refused because their server had MAX_FROM_ONE here already
        self._limiter = LogLimiter(reactor, summary_to(log))
        # Request ids: unique within this process's life (the registry tells a restart apart).
        self._rid_prefix = os.urandom(4).hex().encode("ascii")
        self._rids = itertools.count(1)
        self._local_prefix = os.urandom(8)  # the router's ids for requests entering through inlets
        self._locals = itertools.count(1)
        self._sweeps = 0
        self._sweeper: Optional[IDelayedCall] = None
        self._holding = False  # frames handed to the router wait for settle()
        self._refusals: list[tuple[_Relay, bytes, bytes, str]] = []
        self._refusing: Optional[IDelayedCall] = None

    def inbox(self, node: str) -> bytes:
        return f"{self.prefix}n:{node}".encode()

    # -- handing frames to the router -------------------------------------------

    def _begin(self, peer: Peer) -> Optional[Peer]:
        """Route frames from ``peer`` (a relay or an inlet) until :meth:`_end`: what they route leaves at
        :meth:`settle`, or with the read of another connection this is nested in (returned)."""
        router = self.router
        outer = router.reading
        if outer is None or self._holding:
            self._holding = True
            outer = None
        router.reading = peer
        return outer

    def _end(self, outer: Optional[Peer]) -> None:
        if outer is not None:
            self.router.reading = outer

    def _inject(self, peer: Peer, ftype: int, request_id: bytes, frame: bytes) -> None:
        """Route one frame from a relay or an inlet (see :meth:`_begin`)."""
        outer = self._begin(peer)
        peer.bytes_in += len(frame)
        peer.frames_in += 1
        self.router.frame_received(peer, ftype, 0, request_id, frame)
        self._end(outer)

    def settle(self) -> None:
        """Write what was handed to the router (the end of a Redis read, of a timer)."""
        if self._holding:
            self._holding = False
            router = self.router
            try:
                router.flush()
            finally:
                router.reading = None

    # -- relays (registry callbacks) ------------------------------------------

    def gain(self, node: str, channel: bytes) -> None:
        """``node`` holds ``channel``: relay to it from here."""
        key = (node, channel)
        if key in self.relays:
            return
        self.relays[key] = _Relay(self, node, channel)

    def lose(self, node: str, channel: bytes) -> None:
        """``node`` holds ``channel`` no more (or is gone): its relay goes, its requests fail."""
        if (node, channel) in self.relays:
            self.drop_relay((node, channel))
        self.settle()

    def gone(self, node: str) -> None:
        """``node`` left the cluster (or restarted): what it sent here and was not answered goes."""
        for key in [key for key in self.incoming if key[0] == node]:
            self._drop_incoming(key)
        for key in [key for key in self.serving if key[0] == node]:
            self.serving.pop(key).cancelled = True  # nobody there waits for the answer
        for rid in [rid for rid, entry in self.out.items() if entry.relay.node == node]:
            self._fail(rid, errors.MSG_PEER_DISAPPEARED)
        self.settle()

    def drop_relay(self, key: tuple[str, bytes]) -> None:
        """The relay goes: the router fails its requests in flight with ``peer disappeared``."""
        relay = self.relays.pop(key, None)
        if relay is None:
            return
        relay.live = False
        relay.starting.clear()
        self._drop_kept(relay)
        for rid in list(relay.sent.values()):
            if self._release(rid) is not None:
                self.failed += 1
        self.router.disconnected(relay.peer)

    # -- forwarding out -------------------------------------------------------

    def forward(self, relay: _Relay, local: bytes, held: list[bytes]) -> None:
        """A whole request the router gave ``relay`` (``held``: its routing, then its body's pieces): send it."""
        routing = held[0]
        body = held[1] if len(held) == 2 else b"".join(held[1:])
        if not self.link.up:  # the link is down: as if the server went
            self._refuse(relay, local, routing, errors.MSG_PEER_DISAPPEARED)
            return
        if len(self.out) >= MAX_IN_FLIGHT or self.out_bytes + len(body) > MAX_OUT_BYTES:
            self._refuse(relay, local, routing, errors.overloaded("too many requests in flight to other servers"))
            return
        rid = b"%s%x" % (self._rid_prefix, next(self._rids))
        self.out[rid] = _Out(rid, relay, local, routing, len(body), self._sweeps)
        relay.sent[local] = rid
        self.out_bytes += len(body)
        if self._sweeper is None:
            self._sweeper = self.reactor.callLater(RELAY_TIMEOUT / 2, self._sweep)
        self._send_chunks(relay.inbox, relay.head + rid + relay.tail, body)
        self.forwarded += 1

    def _refuse(self, relay: _Relay, local: bytes, routing: bytes, message: str) -> None:
        """Fail a request the router is handing over now: answered on the next turn, not inside its flush."""
        self.failed += 1
        self._refusals.append((relay, local, routing, message))
        if self._refusing is None:
            self._refusing = self.reactor.callLater(0, self._answer_refusals)

    def _answer_refusals(self) -> None:
        self._refusing = None
        refusals, self._refusals = self._refusals, []
        for relay, local, routing, message in refusals:
            if relay.live:
                self._inject(
                    relay.peer, ERROR, local, codec.encode_frame(ERROR, local, codec.error_payload(message, routing))
                )
        self.settle()

    def _sweep(self) -> None:
        """One timer for every request sent: an answer lost on the way fails within 1-1.5 x RELAY_TIMEOUT."""
        self._sweeper = None
        self._sweeps += 1
        oldest = self._sweeps - 3
        for rid in [rid for rid, entry in self.out.items() if entry.born <= oldest]:
            self._fail(rid, errors.MSG_TIMED_OUT)
        self.settle()
        if self.out:
            self._sweeper = self.reactor.callLater(RELAY_TIMEOUT / 2, self._sweep)

    def _send_chunks(self, inbox: bytes, head: bytes, body: bytes) -> None:
        send = self.link.send
        end = len(body)
        if end <= CHUNK_BYTES:  # the common case: one piece
            send(b"SPUBLISH", inbox, head + b" 0\n" + body)
            return
        view = memoryview(body)
        start = 0
        while True:
            stop = min(start + CHUNK_BYTES, end)
            more = b" 1\n" if stop < end else b" 0\n"
            send(b"SPUBLISH", inbox, head + more + view[start:stop])
            if stop >= end:
                return
            start = stop

    def _release(self, rid: bytes) -> Optional[_Out]:
        entry = self.out.pop(rid, None)
        if entry is None:
            return None
        self.out_bytes -= entry.size
        entry.relay.sent.pop(entry.local, None)
        return entry

    def abandoned(self, relay: _Relay, local: bytes) -> None:
        """The router gave up on a request (its consumer's deadline, it left): free it here and tell
        the other server, which stops waiting for its provider."""
        rid = relay.sent.get(local)
        if rid is None or self._release(rid) is None:
            return
        self.cancelled += 1
        if self.link.up:
            head = b"c " + self.node.encode("utf-8") + b" " + rid + b" -"
            self._send_chunks(relay.inbox, head, b"")

    def _fail(self, rid: bytes, message: str) -> None:
        entry = self._release(rid)
        if entry is None:
            return
        self.failed += 1
        if entry.relay.live:
            local = entry.local
            self._inject(
                entry.relay.peer,
                ERROR,
                local,
                codec.encode_frame(ERROR, local, codec.error_payload(message, entry.routing)),
            )

    # -- the inbox ------------------------------------------------------------

    def message(self, data: bytes) -> None:
        """One message on this server's inbox (the link's reader calls :meth:`settle` after each read)."""
        newline = data.find(b"\n", 0, 512)
        fields = data[:newline].split(b" ") if newline > 0 else []
        if len(fields) != 5 or fields[0] not in (b"q", b"r", b"c") or fields[4] not in (b"0", b"1"):
            self.bad += 1
            return
        kind, origin_bytes, rid, arg, more = fields
        origin = origin_bytes.decode("utf-8", "replace")
        chunk = data[newline + 1 :]
        if kind == b"r":
            self._answer_chunk(origin, rid, arg, more == b"1", chunk)
        elif kind == b"q":
            self._request_chunk(origin, rid, arg, more == b"1", chunk)
        else:
            self._cancelled(origin, rid)

    def _cancelled(self, origin: str, rid: bytes) -> None:
        """The asking server's consumer gave up: its pieces or its wait for a provider here go."""
        key = (origin, rid)
        self._drop_incoming(key)
        serving = self.serving.pop(key, None)
        if serving is not None:
            serving.cancelled = True  # the router here ends it by its deadline or the provider's answer

    def _answer_chunk(self, origin: str, rid: bytes, status: bytes, more: bool, chunk: bytes) -> None:
        entry = self.out.get(rid)
        if entry is None:
            return  # timed out, given up, or the server went: dropped
        relay = entry.relay
        if relay.node != origin:
            self.bad += 1  # only the server asked answers
            return
        if relay.paused or relay.kept:  # a consumer it answers reads slowly: in order, later
            size = len(chunk) + PIECE_COST
            if self.in_bytes + size > MAX_IN_BYTES or self.bytes_from.get(origin, 0) + size > MAX_IN_BYTES_FROM_ONE:
                self._fail(rid, errors.overloaded("too many bytes of answers waiting for slow consumers"))
                return
            self._hold(origin, size)
            relay.kept.append((entry, status, more, chunk))
            return
        self._answer(entry, status, more, chunk)

    def resumed(self, relay: _Relay) -> None:
        """Flow control resumed ``relay``: what it kept goes on, on the next turn (not inside flow control)."""
        if relay.kept:
            self.reactor.callLater(0, self._hand_kept, relay)

    def _hand_kept(self, relay: _Relay) -> None:
        kept = relay.kept
        while kept and not relay.paused and relay.live:
            entry, status, more, chunk = kept.popleft()
            self._let_go(relay.node, len(chunk) + PIECE_COST)
            if self.out.get(entry.rid) is entry:  # not given up on meanwhile
                self._answer(entry, status, more, chunk)
                self.settle()  # written now: a slow consumer pauses the relay again before the next
        if not relay.live:
            self._drop_kept(relay)

    def _drop_kept(self, relay: _Relay) -> None:
        for _, _, _, chunk in relay.kept:
            self._let_go(relay.node, len(chunk) + PIECE_COST)
        relay.kept.clear()

    def _hold(self, origin: str, cost: int) -> None:
        """``origin`` makes this server hold ``cost`` more bytes (a piece of a request or of an answer)."""
        self.in_bytes += cost
        self.bytes_from[origin] = self.bytes_from.get(origin, 0) + cost

    def _let_go(self, origin: str, cost: int) -> None:
        self.in_bytes -= cost
        left = self.bytes_from.get(origin, 0) - cost
        if left > 0:
            self.bytes_from[origin] = left
        else:
            self.bytes_from.pop(origin, None)

    def _answer(self, entry: _Out, status: bytes, more: bool, chunk: bytes) -> None:
        """Hand a piece of an answer to the router: a response frame for each, or the error."""
        rid = entry.rid
        peer = entry.relay.peer
        local = entry.local
        if status != b"ok":  # an error: its text, bounded as a provider's ERROR would be
            self._release(rid)
            text = chunk[:MAX_ERROR_TEXT].decode("utf-8", "replace")
            self._inject(peer, ERROR, local, codec.encode_frame(ERROR, local, codec.error_payload(text, entry.routing)))
            return
        outer = self._begin(peer)
        route = self.router.frame_received
        frames = 0
        if not entry.responding:
            entry.responding = True
            route(
                peer,
                RESPONSE_START,
                0,
                local,
                _pack_header(_VERSION, RESPONSE_START, 0, local, ROUTING_SIZE) + entry.routing,
            )
            frames += 1
        size = len(chunk)
        if size:  # each piece as it comes (no reassembly here); the router bounds the whole by --max-body
            if size <= MAX_PAYLOAD:
                route(peer, RESPONSE_CHUNK, 0, local, _pack_header(_VERSION, RESPONSE_CHUNK, 0, local, size) + chunk)
                frames += 1
            else:  # larger than a frame: not from a pulsyflux server, but still cut to frames
                for start in range(0, size, MAX_PAYLOAD):
                    piece = chunk[start : start + MAX_PAYLOAD]
                    route(
                        peer,
                        RESPONSE_CHUNK,
                        0,
                        local,
                        _pack_header(_VERSION, RESPONSE_CHUNK, 0, local, len(piece)) + piece,
                    )
                    frames += 1
        if not more and self._release(rid) is not None:
            route(peer, RESPONSE_END, 0, local, _pack_header(_VERSION, RESPONSE_END, 0, local, 0))
            frames += 1
        self._end(outer)
        peer.frames_in += frames
        peer.bytes_in += size + frames * _HEADER

    def _request_chunk(self, origin: str, rid: bytes, channel_hex: bytes, more: bool, chunk: bytes) -> None:
        key = (origin, rid)
        held = self.incoming.get(key)
        if held is None:
            if key in self.serving:
                self.bad += 1  # a second request under the same id
                return
            if self.held >= MAX_IN_FLIGHT:
                self._reply(origin, rid, False, errors.overloaded("too many requests from other servers"))
                return
            if self.held_from.get(origin, 0) >= MAX_FROM_ONE:
                self.refused_from_one += 1
                self._reply(origin, rid, False, self._too_many_from_one())
                return
            if not more:  # the common case: the whole request in one piece
                if len(chunk) > self.max_body or self.in_bytes + len(chunk) > MAX_IN_BYTES:
                    self._reply(origin, rid, False, errors.too_large("request", "larger than this server accepts"))
                    return
                self._serve(origin, rid, channel_hex, chunk)
                return
            # The rest must come within incomplete_timeout, or the pieces go.
            held = self.incoming[key] = _In(self.reactor.callLater(self.incomplete_timeout, self._stale, key))
            self._count(origin, 1)
        held.parts.append(chunk)
        held.size += len(chunk)
        cost = len(chunk) + PIECE_COST
        held.cost += cost
        self._hold(origin, cost)
        from_one = self.bytes_from[origin]
        if held.size > self.max_body or self.in_bytes > MAX_IN_BYTES or from_one > MAX_IN_BYTES_FROM_ONE:
            self._drop_incoming(key)
            if from_one > MAX_IN_BYTES_FROM_ONE and held.size <= self.max_body:
                self.refused_from_one += 1
                self._reply(origin, rid, False, self._too_many_from_one())
            else:
                self._reply(origin, rid, False, errors.too_large("request", "larger than this server accepts"))
            return
        if more:
            return
        body = b"".join(held.parts)
        self._drop_incoming(key)
        self._serve(origin, rid, channel_hex, body)

    def _too_many_from_one(self) -> str:
        return errors.overloaded(
            f"server {self.node} holds as many requests from this server as it takes from one"
            f" ({MAX_FROM_ONE} requests, {MAX_IN_BYTES_FROM_ONE >> 20} MiB arriving)"
        )

    def _count(self, origin: str, step: int) -> None:
        self.held += step
        left = self.held_from.get(origin, 0) + step
        if left > 0:
            self.held_from[origin] = left
        else:
            self.held_from.pop(origin, None)

    def _stale(self, key: tuple[str, bytes]) -> None:
        if self.incoming.get(key) is not None:
            self.incoming[key].timer = None
            self._drop_incoming(key)
            self._reply(key[0], key[1], False, errors.MSG_TIMED_OUT)

    def _inlet(self, channel_hex: bytes) -> Optional[_Inlet]:
        """The inlet for a channel a client's provider here holds, opened at its first request; None for any
        other channel (a channel nobody here provides, the broker's, a subscriber's: not for other servers)."""
        try:
            channel = bytes.fromhex(channel_hex.decode("ascii"))
        except ValueError:
            channel = b""
        if len(channel) != 16 or channel.hex().encode("ascii") != channel_hex:  # one spelling per channel
            self.bad += 1
            return None
        router = self.router
        if channel in router.guarded or not any(not provider.trusted for provider in router.providers.get(channel, ())):
            return None  # no inlet (and no record) for what no client here provides: their number stays bounded
        inlet = self.inlets[channel] = self.inlets_by_hex[channel_hex] = _Inlet(self, channel, channel_hex)
        return inlet

    def _serve(self, origin: str, rid: bytes, channel_hex: bytes, body: bytes) -> None:
        inlet = self.inlets_by_hex.get(channel_hex)
        if inlet is None:
            inlet = self._inlet(channel_hex)
            if inlet is None:
                self._reply(origin, rid, False, errors.MSG_PEER_DISAPPEARED)
                return
        channel = inlet.channel
        router = self.router
        if channel in router.guarded or channel in router.reserved:
            # A subscriber's channel while the broker forwards there, or the broker's own: only this
            # server's broker may send there (router.guard), and the inlet is trusted. As for any stranger.
            self._reply(origin, rid, False, errors.MSG_PEER_DISAPPEARED)
            return
        local = self._local_prefix + next(self._locals).to_bytes(8, "big")
        serving = _Serving(origin, rid)
        inlet.waiting[local] = serving
        self.serving[(origin, rid)] = serving
        self._count(origin, 1)
        peer = inlet.peer
        outer = self._begin(peer)
        route = router.frame_received
        route(peer, START, 0, local, _pack_start(
            _VERSION, START, 0, local, _METADATA_SIZE, ROLE_CONSUMER, _RELAY_TIMEOUT_MS, inlet.client, channel
        ))  # fmt: skip
        size = len(body)
        frames = 2
        if size <= MAX_PAYLOAD:
            if size:
                route(peer, CHUNK, 0, local, _pack_header(_VERSION, CHUNK, 0, local, size) + body)
                frames += 1
        else:
            view = memoryview(body)
            for offset in range(0, size, MAX_PAYLOAD):
                piece = view[offset : offset + MAX_PAYLOAD]
                route(peer, CHUNK, 0, local, _pack_header(_VERSION, CHUNK, 0, local, len(piece)) + piece)
                frames += 1
        route(peer, END, 0, local, _pack_header(_VERSION, END, 0, local, 0))
        self._end(outer)
        peer.frames_in += frames
        peer.bytes_in += size + frames * _HEADER + _METADATA_SIZE

    def answered(self, serving: _Serving, ok: bool, answer: Any) -> None:
        """The router here answered an inlet's request (a provider's answer, or an error)."""
        self.in_bytes -= serving.size
        serving.size = 0
        self._count(serving.origin, -1)
        if serving.cancelled:
            return  # nobody waits for it
        self.serving.pop((serving.origin, serving.rid), None)
        if ok:
            self.served += 1
        self._reply(serving.origin, serving.rid, ok, answer)

    def _drop_incoming(self, key: tuple[str, bytes]) -> None:
        held = self.incoming.pop(key, None)
        if held is not None:
            origin = key[0]
            self._let_go(origin, held.cost)
            self._count(origin, -1)
            if held.timer is not None and held.timer.active():
                held.timer.cancel()

    def _reply(self, origin: str, rid: bytes, ok: bool, answer: Any) -> None:
        if ok:
            body = bytes(answer)
        else:
            body = bound_error_text(str(answer))  # what a Provider would put in its ERROR frame
        if not self.link.up:
            return  # the asking server fails it by its own timer or when we leave its registry
        head = b"r " + self.node.encode("utf-8") + b" " + rid + (b" ok" if ok else b" err")
        self._send_chunks(self.inbox(origin), head, body)

    def release(self, channel: bytes) -> None:
        """No provider here holds ``channel`` any more: its inlet goes, and what waited there fails."""
        inlet = self.inlets.pop(channel, None)
        if inlet is None:
            return
        self.inlets_by_hex.pop(inlet.channel_hex, None)
        waiting, inlet.waiting = inlet.waiting, {}
        self.router.disconnected(inlet.peer)
        for serving in waiting.values():
            self.answered(serving, False, errors.MSG_PEER_DISAPPEARED)

    def stop(self) -> None:
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        if self._refusing is not None and self._refusing.active():
            self._refusing.cancel()
        self._refusing = None
        self._refusals.clear()
        for key in list(self.relays):
            self.drop_relay(key)  # the router fails what each had in flight
        for channel in list(self.inlets):
            self.release(channel)
        for key in list(self.incoming):
            self._drop_incoming(key)
        for serving in self.serving.values():
            serving.cancelled = True
        self.serving.clear()
        self.settle()

    def stats(self) -> dict[str, Any]:
        return {
            "relays": len(self.relays),
            "requests_forwarded": self.forwarded,
            "requests_served": self.served,
            "requests_failed": self.failed,
            "requests_in_flight": len(self.out),
            "requests_cancelled": self.cancelled,
            "requests_serving": len(self.serving),
            "requests_arriving": len(self.incoming),
            "requests_held": self.held,
            "requests_refused_from_one": self.refused_from_one,
            "bad_inbox": self.bad,
        }
