"""A Redis client: a thin Twisted protocol over hiredis, the Redis project's own parser.

Why not a Redis library: measured on this kind of machine (docs/cluster.md),
a Protocol on ``hiredis.Reader`` and ``hiredis.pack_command`` costs about
21 µs a round trip and 4-5 µs per pub/sub message; txredisapi costs 2-4 times
that and has no sharded pub/sub; redis-py's asyncio client needs the asyncio
reactor, which slows every pulsyflux frame. What pulsyflux needs of Redis is
small (a few commands, SSUBSCRIBE), so the parser is borrowed and the rest,
a reply queue, is ours.

Two kinds of connection, as in RESP2: a command connection (one reply per
command, in order) and a subscriber connection (sharded pub/sub; every reply
is a push). A cancelled command keeps its place in the reply queue, so its
reply can never be handed to the next command (redis-py#2624).
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Optional

import hiredis
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from ..wire.ratelimit import shorten
from ..writer import coalesce, immediate_writer
from .url import RedisAddress, RedisError, parse_redis_url

__all__ = [
    "RedisAddress",
    "RedisCommands",
    "RedisError",
    "RedisLost",
    "RedisSubscriber",
    "parse_redis_url",
]

# The most bytes of replies the reader may hold before a complete one: a
# misbehaving or hostile server must not make us buffer without bound.
MAX_PENDING_BYTES = 64 << 20
# The same for a command connection, whose replies are all small (counts, OK,
# PONG, a lease key's first bytes, a page of an SSCAN): what another server
# wrote into Redis cannot make one reply cost more than this to read.
MAX_COMMAND_REPLY_BYTES = 4 << 20


class RedisLost(RedisError):
    """The connection to Redis ended before the command was answered."""


def login_commands(address: RedisAddress) -> list[tuple[Any, ...]]:
    """What a new connection sends first: AUTH if there is a password, SELECT if not db 0."""
    commands: list[tuple[Any, ...]] = []
    if address.password is not None:
        if address.username:
            commands.append((b"AUTH", address.username, address.password))
        else:
            commands.append((b"AUTH", address.password))
    if address.db:
        commands.append((b"SELECT", address.db))
    return commands


class _Base(Protocol):
    max_pending = MAX_PENDING_BYTES

    def __init__(self) -> None:
        self._reader = hiredis.Reader(replyError=RedisError)
        self._buffered = 0
        self.lost = Deferred[None]()
        self.connected = False
        # Called after each read's replies are handled: what they handed on is written out once per read.
        self.after_read: Optional[Callable[[], None]] = None

    def connectionMade(self) -> None:
        self.connected = True
        setter = getattr(self.transport, "setTcpNoDelay", None)
        if setter is not None:
            setter(True)  # a command or a message goes out at once, not after the last one's ACK (Nagle)

    def dataReceived(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        self._buffered += len(data)
        try:
            while True:
                try:
                    reply = reader.gets()
                except hiredis.ProtocolError as e:
                    self._fatal(f"Redis sent a malformed reply: {e}")
                    return
                if reply is False:
                    break
                self._buffered = 0
                self._reply(reply)
        finally:
            after_read = self.after_read
            if after_read is not None:
                after_read()
        if self._buffered > self.max_pending:
            self._fatal("Redis sent a reply larger than the client accepts")

    def _fatal(self, why: str) -> None:
        self._why = why
        transport: Any = self.transport  # a TCP or TLS transport: both can abort
        if transport is not None:
            transport.abortConnection()

    def _reply(self, reply: Any) -> None:
        raise NotImplementedError

    def connectionLost(self, reason: Failure = Failure(RedisLost("closed"))) -> None:
        self.connected = False
        if not self.lost.called:
            self.lost.callback(None)


class RedisCommands(_Base):
    """One command at a time or pipelined; each answer goes to its own Deferred, in order.

    With a ``reactor``, the first command of a reactor turn goes to the socket
    at once (a lone publish or request waits for nothing), and the rest of
    that turn's commands in one write at its end (a busy server relays many
    requests per turn: a write each would cost more than the command).
    A reply past ``MAX_COMMAND_REPLY_BYTES`` closes the connection.
    """

    max_pending = MAX_COMMAND_REPLY_BYTES

    def __init__(self, reactor: Optional[IReactorTime] = None) -> None:
        super().__init__()
        self._reactor = reactor
        self._unsent: Optional[list[bytes]] = None  # None: no command yet this turn
        self._send_now: Callable[[bytes], None] = self._no_transport
        self._waiting: collections.deque[Optional[Deferred[Any]]] = collections.deque()
        self._why = "the connection to Redis was lost"
        self.unanswered = 0  # commands sent with send() that Redis refused or the connection lost

    def connectionMade(self) -> None:
        super().connectionMade()
        transport: Any = self.transport  # TCP, or TLS (whose writes immediate_writer leaves to Twisted)
        # Straight to the socket when nothing waits (writer.py), else Twisted's buffered write.
        self._send_now = immediate_writer(transport)

    def _no_transport(self, data: bytes) -> None:
        pass  # never called: commands are refused until connected

    def execute(self, *args: Any) -> Deferred[Any]:
        """Send one command; the Deferred fires with its reply or fails with :class:`RedisError`."""
        if not self.connected or self.transport is None:
            return fail(RedisLost("not connected to Redis"))
        d: Deferred[Any] = Deferred()
        self._waiting.append(d)
        self._write(hiredis.pack_command(args))
        return d

    def _write(self, data: bytes) -> None:
        if self._reactor is None:
            self.transport.write(data)  # type: ignore[union-attr]
            return
        unsent = self._unsent
        if unsent is None:  # the turn's first: now, and the turn's others at its end
            self._unsent = []
            self._reactor.callLater(0, self._flush)
            self._send_now(data)
        else:
            unsent.append(data)

    def _flush(self) -> None:
        unsent, self._unsent = self._unsent, None
        if unsent and self.connected and self.transport is not None:
            for data in coalesce(unsent):
                self._send_now(data)

    def send(self, *args: Any) -> bool:
        """Send one command whose reply nobody waits for (no Deferred: the request relays' hot path).

        False if not connected; a refusal or a loss is counted in ``unanswered``.
        """
        if not self.connected or self.transport is None:
            return False
        self._waiting.append(None)
        self._write(hiredis.pack_command(args))
        return True

    @property
    def pending(self) -> int:
        """Commands sent and not yet answered (a hung Redis shows here)."""
        return len(self._waiting)

    def _reply(self, reply: Any) -> None:
        if not self._waiting:
            self._fatal("Redis sent a reply nobody asked for")
            return
        d = self._waiting.popleft()
        if d is None:  # sent with send(): nobody waits
            if isinstance(reply, RedisError):
                self.unanswered += 1
            return
        if d.called:  # cancelled: its reply is dropped here, in step with the queue
            return
        if isinstance(reply, RedisError):
            d.errback(reply)
        else:
            d.callback(reply)

    def connectionLost(self, reason: Failure = Failure(RedisLost("closed"))) -> None:
        waiting, self._waiting = self._waiting, collections.deque()
        for d in waiting:
            if d is None:
                self.unanswered += 1
            elif not d.called:
                d.errback(RedisLost(self._why))
        super().connectionLost(reason)


class RedisSubscriber(_Base):
    """A connection in sharded pub/sub mode: ``on_message(channel, data)`` per message.

    One connection's subscriptions: a new connection is subscribed afresh to
    every channel the link holds (link.py), because a subscription lost
    silently after a reconnect is the classic failure of pub/sub over Redis.
    """

    def __init__(self, on_message: Callable[[bytes, bytes], None]) -> None:
        super().__init__()
        self.on_message = on_message
        self.channels: set[bytes] = set()
        self.confirmed: set[bytes] = set()
        self._pings: collections.deque[Deferred[None]] = collections.deque()
        self._why = "the connection to Redis was lost"

    def _send(self, *args: Any) -> None:
        if self.connected and self.transport is not None:
            self.transport.write(hiredis.pack_command(args))

    def login(self, address: RedisAddress) -> None:
        """AUTH/SELECT before subscribing (their replies are plain, answered in order)."""
        for command in login_commands(address):
            self._pings.append(Deferred())  # their "OK" replies are consumed like pongs
            self._send(*command)

    def subscribe(self, channel: bytes) -> None:
        """SSUBSCRIBE one channel (one per command: channels in different slots must not share one)."""
        if channel not in self.channels:
            self.channels.add(channel)
            self._send(b"SSUBSCRIBE", channel)

    def unsubscribe(self, channel: bytes) -> None:
        if channel in self.channels:
            self.channels.discard(channel)
            self._send(b"SUNSUBSCRIBE", channel)

    def ping(self) -> Deferred[None]:
        """Fires when Redis has answered everything sent before it (a liveness probe)."""
        d: Deferred[None] = Deferred()
        if not self.connected:
            d.errback(RedisLost("not connected to Redis"))
            return d
        self._pings.append(d)
        self._send(b"PING")
        return d

    def _reply(self, reply: Any) -> None:
        if isinstance(reply, list) and len(reply) == 3:
            kind = reply[0]
            if kind == b"smessage":
                self.on_message(reply[1], reply[2])
                return
            if kind == b"ssubscribe":
                self.confirmed.add(reply[1])
                return
            if kind == b"sunsubscribe":
                self.confirmed.discard(reply[1])
                return
        # A pong (["pong", ""] in subscribed mode, "PONG" before), an AUTH/SELECT OK, or an error.
        if self._pings:
            d = self._pings.popleft()
            if d.called:
                return
            if isinstance(reply, RedisError):
                d.errback(reply)
            else:
                d.callback(None)
        elif isinstance(reply, RedisError):
            self._fatal(f"Redis refused a subscription: {shorten(reply)}")

    def connectionLost(self, reason: Failure = Failure(RedisLost("closed"))) -> None:
        self.confirmed.clear()
        pings, self._pings = self._pings, collections.deque()
        for d in pings:
            if not d.called:
                d.errback(RedisLost(self._why))
        super().connectionLost(reason)
