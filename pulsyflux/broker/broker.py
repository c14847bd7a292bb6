"""Topic pub/sub made of ordinary Consumers and Providers (PROTOCOL.md 6, 7).

The broker owns a Provider and a publishing Consumer on the broker channel;
every subscription is a Provider on a fresh channel plus the broker's
forwarding Consumer on it: 2 + 2N persistent connections.

    broker = await Broker.connect("127.0.0.1:9090")
    sub = await broker.subscribe("orders")
    await broker.publish("orders", b"new order", {"priority": "high"})
    msg = await sub.get()

Other processes use :class:`BrokerClient` with the same calls. Delivery,
flow control and the control messages are described in docs/broker.md.
"""

from __future__ import annotations

import uuid
from collections import deque
from typing import Any, Callable, NoReturn, Optional, Union, cast

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredQueue,
    fail,
    succeed,
)
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..client import ChannelId, Consumer, Provider, Reconnect, channel_bytes
from ..endpoints import Address
from ..subjects import Interest, Sublist, matcher
from ..wire import messages
from ..wire.errors import ConnectionLostError, NoProviderError, PulsyfluxError, RequestTimeout
from ..wire.messages import (
    CONTROL_PREFIX,
    Message,
    MessageError,
    check_topic,
    excerpt,
    group_problem,
    is_control,
    is_pattern,
    topic_problem,
)
from ..wire.ratelimit import LogLimiter, summary_to

__all__ = [
    "Broker",
    "BrokerClient",
    "Subscription",
    "SubscriptionClosed",
    "DEFAULT_BROKER_CHANNEL",
]

# uuid5(NAMESPACE_DNS, "broker.pulsyflux"): the channel everyone assumes.
DEFAULT_BROKER_CHANNEL = uuid.UUID("4cf5ad4a-c843-56c7-921e-35cba21980e2")

DEFAULT_BUFFER = 100  # messages a Subscription queues before it holds answers
DEFAULT_BACKLOG = 10_000  # messages the broker keeps per slow subscriber
DEFAULT_BACKLOG_BYTES = 8 << 20  # and bytes (JSON characters) per slow subscriber
DEFAULT_TOTAL_BACKLOG_BYTES = 256 << 20  # and bytes in all backlogs together
DEFAULT_MAX_SUBSCRIPTIONS = 10_000  # subscriptions a broker keeps; more are refused
DEFAULT_MAX_SETUPS = 64  # remote subscriptions being set up at once; more are refused
DEFAULT_MAX_SETUPS_PER_CLIENT = 8  # of those, from one client (one connection: the server checks its id)
_SETUP_WAITERS = 16  # announcements of one channel waiting for its setup; more are refused
_ERROR_CHARS = 256  # the longest text of someone else's error the broker repeats
DEFAULT_BATCH = 256  # messages per forward request, at most
DEFAULT_WINDOW = 4  # forward requests in flight per subscriber
_BATCH_CHARS = 256 * 1024  # a forward stops growing past this much JSON
_PUBLISH_BATCH = 512
_PUBLISH_WINDOW = 4
_NEVER = float("inf")
_OK = b"ok"
_RESUMED = b"resumed"  # the answer to a re-announce of a subscription the broker still has
_PROBE = messages.control(messages.PROBE).encode("utf-8")
# After a reconnect, how long the broker waits for a subscriber to be back on
# its channel (its Provider retries with up to 5 s of backoff) before giving up on it.
_REJOIN_PATIENCE = 10.0
# A BrokerClient re-announces its subscriptions this often (seconds), so a
# broker that died while the server runs is noticed, and a restarted one
# learns them again; the broker is gone after this many missed beats in a row.
DEFAULT_HEARTBEAT = 5.0
_HEARTBEAT_MISSES = 2

log = Logger()


class SubscriptionClosed(PulsyfluxError):
    """The subscription ended: unsubscribed, broker closed, or connection lost."""


def _check_subscription(topic: str, group: Optional[str]) -> None:
    """The topic rule for subscribing, and the group's: TypeError/ValueError at once."""
    check_topic(topic, subscribing=True)
    if group is not None:
        problem = group_problem(group)
        if problem is not None:
            raise (TypeError if type(group) is not str else ValueError)(problem)


def _uuid(channel: ChannelId) -> uuid.UUID:
    return uuid.UUID(bytes=channel_bytes(channel))


def _ignore(failure: Failure) -> None:
    return None


def _clip(text: str, limit: int = _ERROR_CHARS) -> str:
    """Someone else's error text, safe to repeat: short and printable, or an escaped excerpt."""
    if len(text) <= limit and text.isprintable():
        return text
    return excerpt(text, limit)


def _nothing() -> None:
    return None


def _guard(address: Address, channel: uuid.UUID) -> Callable[[], None]:
    """Ask the server to let only the broker send on ``channel``, when the address can (in-process)."""
    guard = getattr(address, "guard_channel", None)
    return guard(channel.bytes) if guard is not None else _nothing


# -- the subscriber side ------------------------------------------------------


class Subscription:
    """The messages of one topic or pattern, in publish order; ends when closed.

        sub = await broker.subscribe("orders.*")
        async for msg in sub:
            print(msg.topic, msg.payload, msg.headers)  # msg.topic: "orders.eu", the topic published to

    ``topic`` is what was subscribed to (a pattern, maybe); ``group`` the
    queue group, or None (docs/broker.md).

    ``get()`` fires with the next :class:`~pulsyflux.wire.messages.Message`, or
    fails with :class:`SubscriptionClosed` once the subscription has ended
    and every message received before that has been read. Up to ``buffer``
    messages wait here; past that the subscriber holds its answers, so the
    broker keeps the rest (and counts what it must drop: :attr:`dropped`).

    Only the broker should deliver here, so what it never sends is refused
    and counted in :attr:`rejected`: a message of a topic not matching ours, and a drop
    notice that is not followed by a message of this topic in the same
    delivery (the broker places it right before the first message after a
    gap) or that comes in a delivery holding a message of another topic.
    """

    def __init__(
        self, topic: str, channel: ChannelId, buffer: int = DEFAULT_BUFFER, group: Optional[str] = None
    ) -> None:
        if buffer < 1:
            raise ValueError("buffer must be at least 1")
        self.topic = topic
        self.group = group
        # Which other topics are ours: None for a plain topic (only itself, tested with ==).
        self._accepts: Optional[Callable[[str], bool]] = matcher(topic) if is_pattern(topic) else None
        self.channel = _uuid(channel)
        self.buffer = buffer
        self.closed_reason: Optional[str] = None
        self._queue: DeferredQueue[Message] = DeferredQueue()
        self._received = 0  # messages ever put in the queue
        self._held: deque[tuple[int, Deferred[bytes]]] = deque()  # (received mark, answer)
        self._dropped = 0
        self._rejected = 0
        self._closed: Optional[SubscriptionClosed] = None
        self._provider: Optional[Provider] = None
        self._on_remote_close: Optional[Callable[[str], None]] = None
        self._gaps = 0
        self._resume_hooks: list[Callable[["Subscription"], Any]] = []

    def __repr__(self) -> str:
        state = f"closed: {self.closed_reason}" if self._closed else f"{self.pending} pending"
        group = f" group={self.group!r}" if self.group is not None else ""
        return f"<Subscription topic={self.topic!r}{group} channel={self.channel} {state}>"

    @property
    def dropped(self) -> int:
        """Messages the broker dropped for this subscription (it read too slowly)."""
        return self._dropped

    @property
    def rejected(self) -> int:
        """Messages refused as not the broker's: another topic, or an implausible drop notice."""
        return self._rejected

    @property
    def pending(self) -> int:
        """Messages received and not read yet."""
        return len(self._queue.pending)

    @property
    def gaps(self) -> int:
        """Times the connection dropped and came back (reconnect=True); messages published meanwhile may be missing."""
        return self._gaps

    def on_resume(self, callback: Callable[["Subscription"], Any]) -> None:
        """Call ``callback(subscription)`` each time the broker forwards to it again after a gap.

        sub.on_resume(lambda s: log.info("{t} resumed after {n} gaps", t=s.topic, n=s.gaps))
        """
        self._resume_hooks.append(callback)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def get(self) -> "Deferred[Message]":
        """The next message; fails with :class:`SubscriptionClosed` at the end."""
        queue = self._queue
        if queue.pending:
            d = queue.get()
            if self._held:
                self._release()
            return d
        if self._closed is not None:
            return fail(self._closed)
        return queue.get()

    def __aiter__(self) -> "Subscription":
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.get()
        except SubscriptionClosed:
            raise StopAsyncIteration from None

    # -- the owner's side: Broker, BrokerClient and the fan-out call these, applications do not.
    # Each change another class makes to a subscription goes through one of them.

    def _attach(self, provider: Provider, reconnect: Reconnect) -> None:
        """``provider`` receives for this subscription: count its reconnects as gaps, end with it."""
        self._provider = provider
        if reconnect:
            provider.on_reconnect(lambda _: self._count_gap())  # first: later hooks see the count
        provider.when_lost().addCallback(lambda _: self._close("connection to the server lost"))

    def _count_gap(self) -> None:
        """Messages published from now until :meth:`_resumed` may be missing."""
        self._gaps += 1

    def _set_dropped(self, count: int) -> None:
        """The broker's count of messages dropped for us, told in process (no notice needed)."""
        self._dropped = count

    def _on_closed_by_broker(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` when the broker's closing notice arrives (a remote broker)."""
        self._on_remote_close = callback

    def _resumed(self) -> None:
        """The broker forwards to us again after a gap: tell the on_resume callbacks."""
        log.info("subscription to {topic!r} resumed", topic=self.topic)
        for hook in list(self._resume_hooks):
            try:
                hook(self)
            except Exception:
                log.failure("on_resume callback failed")

    def _close(self, reason: str) -> None:
        """End the stream; already received messages stay readable."""
        if self._closed is not None:
            return
        self.closed_reason = reason
        self._closed = SubscriptionClosed(f"subscription to {self.topic!r} closed: {reason}")
        held, self._held = self._held, deque()
        for _, answer in held:
            answer.callback(_OK)  # the connection is going; nobody waits for these
        waiting = list(self._queue.waiting)
        del self._queue.waiting[:]  # in place: _deliver may be walking this list
        for d in waiting:
            d.errback(self._closed)

    def _end(self, reason: str) -> "Deferred[None]":
        """End the stream and close its Provider; fires once the connection is gone."""
        self._close(reason)
        return self._provider.close() if self._provider is not None else succeed(None)

    def _connected(self) -> bool:
        """Our Provider's line is up (a reconnecting one may be down for a while)."""
        return self._provider is not None and self._provider.connected

    def _when_connected(self) -> "Deferred[Any]":
        """Fires once our Provider's line is up; fails if it closed for good."""
        assert self._provider is not None
        return self._provider.when_connected()

    # -- called by the Provider ----------------------------------------------

    def _deliver(self, body: bytes) -> Union[bytes, "Deferred[bytes]"]:
        """The Provider's handler: queue, answer ``ok`` once within the buffer."""
        if self._closed is not None:
            raise self._closed
        batch = messages.decode_body(body)
        queue = self._queue
        pending = queue.pending
        topic = self.topic
        accepts = self._accepts
        count = 0
        foreign = 0
        notices: Optional[list[tuple[int, Message]]] = None
        for msg in batch:
            if msg.topic == topic:
                pending.append(msg)
                count += 1
            elif is_control(msg.topic):  # before the pattern: ">" would match "$pulsyflux/dropped"
                if notices is None:
                    notices = []
                notices.append((count, msg))  # with how many of ours came before it
            elif accepts is not None and accepts(msg.topic):
                pending.append(msg)
                count += 1
            else:
                foreign += 1  # never sent by the broker: forged, by someone who knows the channel
        closing: Optional[Message] = None
        if foreign or notices is not None:
            self._rejected += foreign
            for before, msg in notices or ():
                if foreign or (msg.topic == messages.DROPPED and before == count):
                    self._rejected += 1  # not where the broker puts it
                elif msg.topic == messages.CLOSED:
                    closing = msg  # after the wake-up: the messages before it stay readable
                else:
                    self._control(msg)
        self._received += count
        # Queue the whole batch before waking a reader: its loop then reads
        # the rest without suspending once per message.
        waiting = queue.waiting
        while waiting and pending:
            waiting.pop(0).callback(pending.pop(0))
        if closing is not None:
            self._control(closing)
            if self._closed is not None:
                return _OK
        if not count or (not self._held and len(pending) <= self.buffer):
            return _OK  # a notice alone (a probe after a gap) is never held behind a full buffer
        answer: Deferred[bytes] = Deferred()
        self._held.append((self._received, answer))
        return answer

    def _control(self, msg: Message) -> None:
        if msg.topic == messages.DROPPED:
            try:
                self._dropped = max(self._dropped, int(msg.headers.get("dropped", "0")))
            except ValueError:
                self._rejected += 1
        elif msg.topic == messages.CLOSED and self._on_remote_close is not None:
            self._on_remote_close(msg.headers.get("reason", "closed by the broker"))
        # PROBE and anything unknown: answered, never queued.

    def _release(self) -> None:
        """Answer held batches whose last message is now within the buffer."""
        held = self._held
        pending = len(self._queue.pending)
        while held:
            mark, answer = held[0]
            if pending - (self._received - mark) > self.buffer:
                return
            held.popleft()
            answer.callback(_OK)


async def _open_subscription(
    address: Address, topic: str, buffer: int, reactor: Any, reconnect: Reconnect = False, group: Optional[str] = None
) -> tuple[Subscription, Provider]:
    channel = uuid.uuid4()
    sub = Subscription(topic, channel, buffer, group)
    provider = await Provider.connect(address, channel, handler=sub._deliver, reactor=reactor, reconnect=reconnect)
    sub._attach(provider, reconnect)
    return sub, provider


async def _send_until_registered(
    consumer: Consumer, body: bytes, reactor: Any, timeout: float = 5.0, patience: float = 1.0
) -> bytes:
    """Send ``body``, retrying for ``patience`` seconds while the server has no provider for it yet.

    Connections are independent, so a Provider that has just connected may
    not be registered by the time another connection's request arrives.
    """
    delay = 0.002
    waited = 0.0
    while True:
        try:
            return await consumer.send(body, timeout=timeout)
        except NoProviderError:
            if waited >= patience:
                raise
        await deferLater(reactor, delay, lambda: None)
        waited += delay
        delay = min(delay * 2, 0.1)


# -- the broker side -----------------------------------------------------------


class _Outlet:
    """One subscription as the broker sees it: forwarding Consumer, backlog, window.

    Forwards go in order over one connection, several in flight; what does
    not fit in the window waits in the backlog, whose oldest entries are
    dropped (and counted) past ``limit`` messages or ``limit_bytes`` (the
    newest message always stays), and when all backlogs together pass the
    fanout's ``total_backlog_bytes``. While a reconnecting Consumer is
    down the outlet is not ``ready``: the backlog waits until a probe has
    reached the subscriber again (:meth:`rejoin`).
    """

    def __init__(
        self,
        fanout: "_Fanout",
        topic: str,
        consumer: Consumer,
        local: Optional[Subscription],
        limit: int,
        limit_bytes: int = DEFAULT_BACKLOG_BYTES,
        label: str = "",
        group: Optional[str] = None,
    ) -> None:
        self.fanout = fanout
        self.topic = topic  # what was subscribed to: a topic or a pattern
        self.group = group  # the queue group, or None: gets a copy of every message
        self.consumer = consumer
        self.channel = consumer.channel_id  # a secret of the subscriber's: never in stats or logs
        self.label = label  # what stats and logs call it instead
        self.local = local
        self.limit = limit
        self.limit_bytes = limit_bytes
        self.backlog: deque[str] = deque()
        self.size = 0  # characters of JSON in the backlog
        self.requests = 0
        self.in_flight = 0
        self.delivered = 0
        self.dropped = 0
        self.notified = 0  # drop total last told to the subscriber
        self.lost = 0  # in forwards in flight when the line dropped
        self.gaps = 0
        self.open = True
        self.ready = True
        self._rejoining = False
        self._rejoin_waiters: list[Deferred[None]] = []
        self.unguard: Callable[[], None] = _nothing  # ends the server's guard on the channel (inproc)
        # The client that announced it (a client id names one connection): only it may end it.
        self.owner: Optional[uuid.UUID] = None

    def has_room(self) -> bool:
        """Whether a queue group should give this member the next message: up, and its backlog not full."""
        return self.ready and len(self.backlog) < self.limit and self.size < self.limit_bytes

    def push(self, text: str) -> None:
        """Queue one message; the caller adds it to the fanout's ``backlog_size`` (once per publish)."""
        backlog = self.backlog
        backlog.append(text)
        size = self.size + len(text)
        self.size = size
        if size > self.limit_bytes or len(backlog) > self.limit:
            self.trim(self.limit, self.limit_bytes)

    def trim(self, limit: int, limit_bytes: int) -> int:
        """Drop (and count) the oldest waiting messages down to the bounds; the newest stays."""
        backlog = self.backlog
        popleft = backlog.popleft
        freed = 0
        dropped = 0
        while len(backlog) > 1 and (len(backlog) > limit or self.size - freed > limit_bytes):
            freed += len(popleft())
            dropped += 1
        if len(backlog) > limit:  # limit 0: nothing waits, not even the newest
            freed += len(popleft())
            dropped += 1
        if dropped:
            self.size -= freed
            self.fanout.backlog_size -= freed
            self.dropped += dropped
            self.fanout.dropped += dropped
            if self.local is not None:
                self.local._set_dropped(self.dropped)
        return freed

    def flush(self) -> None:
        backlog = self.backlog
        fanout = self.fanout
        if self.consumer.reconnecting:
            self.ready = False  # the line is down: keep the backlog for rejoin()
        while backlog and self.open and self.ready and self.requests < fanout.window:
            texts: list[str] = []
            if self.dropped != self.notified:
                self.notified = self.dropped
                texts.append(messages.control(messages.DROPPED, dropped=str(self.dropped)))
            popleft = backlog.popleft
            size = 0
            count = 0
            limit = fanout.batch
            while backlog and count < limit and size < _BATCH_CHARS:
                text = popleft()
                texts.append(text)
                size += len(text)
                count += 1
            self.size -= size
            fanout.backlog_size -= size
            self.requests += 1
            self.in_flight += count
            d = self.consumer.send(messages.encode_batch(texts), timeout=0)
            d.addCallbacks(self._answered, self._failed, callbackArgs=(count,), errbackArgs=(count,))

    def _answered(self, result: bytes, count: int) -> None:
        self.requests -= 1
        self.in_flight -= count
        self.delivered += count
        self.fanout.delivered += count
        self.flush()

    def _failed(self, failure: Failure, count: int) -> None:
        self.requests -= 1
        self.in_flight -= count
        if not self.open:
            # Ended while these were on their way (unsubscribed, closed): a
            # subscriber holds its answer while its buffer is full, so they
            # are most likely readable there; they are not counted as lost.
            return
        error = failure.value
        if isinstance(error, ConnectionLostError) and self.consumer.reconnecting:
            # At most once: these may or may not have arrived; the rest waits for rejoin().
            self.lost += count
            self.fanout.lost += count
            self.ready = False
            return
        if isinstance(error, NoProviderError):
            reason = "subscriber disappeared"
        elif isinstance(error, ConnectionLostError):
            reason = "connection to the server lost"
        else:
            reason = f"subscriber refused a message: {_clip(str(error))}"
        if self.fanout.log_limiter.allow("dropping subscription"):
            log.info(
                "dropping subscription {label} to {topic!r}: {reason}",
                label=self.label,
                topic=self.topic,
                reason=reason,
            )
        self.lost += count
        self.fanout.lost += count  # the backlog is counted by close()
        self.fanout.remove(self, reason)

    def rejoin(self) -> "Deferred[None]":
        """Probe the subscriber once the Consumer is connected, then forward again.

        Fires when forwarding resumed; fails if the line is down again, or
        if the subscriber is not back within the patience (the subscription
        is then removed: ``subscriber did not come back``).
        """
        self.ready = False
        d: Deferred[None] = Deferred()
        self._rejoin_waiters.append(d)
        if not self._rejoining:
            self._rejoining = True
            Deferred.fromCoroutine(self._rejoin()).addBoth(self._rejoined)
        return d

    async def _rejoin(self) -> None:
        fanout = self.fanout
        await self.consumer.when_connected()
        try:
            await _send_until_registered(self.consumer, _PROBE, fanout.reactor, patience=fanout.rejoin_patience)
        except ConnectionLostError:
            raise  # down again: the next reconnect rejoins
        except PulsyfluxError as error:
            if self.open:
                reason = "subscriber did not come back" if isinstance(error, NoProviderError) else _clip(str(error))
                if fanout.log_limiter.allow("dropping subscription"):
                    log.info("dropping subscription {label} to {topic!r}: {reason}", label=self.label,
                             topic=self.topic, reason=reason)  # fmt: skip
                fanout.remove(self, reason)  # close() counts the backlog as lost
            raise
        if not self.open:
            raise ConnectionLostError("the subscription was closed")
        self.gaps += 1
        self.ready = True
        self.flush()
        if self.local is not None:
            self.local._resumed()

    def _rejoined(self, result: Any) -> None:
        self._rejoining = False
        waiters, self._rejoin_waiters = self._rejoin_waiters, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(None)

    def close(self, reason: str, notify: bool) -> "Deferred[None]":
        """Stop forwarding; tell a remote subscriber (``notify``), close the Consumer."""
        self.open = False
        self.lost += len(self.backlog)  # never forwarded: the subscription ended first
        self.fanout.lost += len(self.backlog)
        self.fanout.backlog_size -= self.size
        self.size = 0
        self.backlog.clear()
        if notify and self.consumer.connected:
            self.consumer.send(
                messages.control(messages.CLOSED, reason=reason).encode("utf-8"), timeout=1.0
            ).addErrback(_ignore)
        return self.consumer.close()

    def stats(self) -> dict[str, Any]:
        return {
            "id": self.label,  # not the channel: whoever knows that can write to the subscriber
            "topic": self.topic,
            "group": self.group,
            "remote": self.local is None,
            "backlog": len(self.backlog),
            "backlog_bytes": self.size,
            "in_flight": self.in_flight,
            "delivered": self.delivered,
            "dropped": self.dropped,
            "lost": self.lost,
            "gaps": self.gaps,
        }


class _Subscribers(Interest[_Outlet]):
    """The outlets of one topic or pattern (plain and in queue groups), and its counters
    (as long as it has a subscriber).

    ``published`` counts the messages fanned out to it, ``delivered_before``
    what subscribers that left had accepted: the topic's publish -> deliver
    numbers in the stats cost one attribute increment per message.
    """

    __slots__ = ("published", "delivered_before")

    def __init__(self) -> None:
        super().__init__()
        self.published = 0
        self.delivered_before = 0

    def delivered(self) -> int:
        members = self.plain + [member for group in self.groups.values() for member in group.members]
        return self.delivered_before + sum(outlet.delivered for outlet in members)


class _Setup:
    """A subscription being set up: its topic and group, and later announcements of its channel waiting for it."""

    __slots__ = ("topic", "group", "waiters")

    def __init__(self, topic: str, group: Optional[str] = None) -> None:
        self.topic = topic
        self.group = group
        self.waiters: list[Deferred[_Outlet]] = []


class _Fanout:
    """The broker Provider's handler: who subscribes to what, and fan-out.

    Not a router: the server's :class:`~pulsyflux.server.Router` routes frames
    between connections; this fans each published message out to the outlets
    of its topic.
    """

    def __init__(
        self,
        address: Address,
        reactor: Any,
        *,
        backlog: int,
        batch: int,
        window: int,
        reconnect: Reconnect,
        rejoin_patience: float,
        backlog_bytes: int,
        total_backlog_bytes: int,
        max_subscriptions: int,
        max_setups: int,
        max_setups_per_client: int,
    ) -> None:
        """Only :class:`Broker` makes one, by keyword: its arguments (and their defaults) are the Broker's."""
        self.address = address
        self.reactor = reactor
        self.log_limiter = LogLimiter(reactor, summary_to(log))  # subscribers decide how often these happen
        self.reconnect = reconnect
        self.rejoin_patience = rejoin_patience
        self.backlog = backlog
        self.backlog_bytes = backlog_bytes
        self.total_backlog_bytes = total_backlog_bytes
        self.max_subscriptions = max_subscriptions
        self.max_setups = max_setups
        self.max_setups_per_client = max_setups_per_client
        # Remote setups in progress per announcing client id; the broker's Provider tells who asks.
        self.setups_by_client: dict[uuid.UUID, int] = {}
        self.provider: Optional[Provider] = None
        self.batch = batch
        self.window = window
        # Who wants what: pattern (or topic) -> its plain subscribers and queue groups (subjects.py).
        self.index: Sublist[_Subscribers] = Sublist()
        self.outlets: dict[uuid.UUID, _Outlet] = {}
        # Channels being set up, recorded before the first await, so that two
        # announcements of one channel never open two forwarding Consumers.
        self.opening: dict[uuid.UUID, _Setup] = {}
        self.backlog_size = 0  # characters of JSON waiting in all backlogs
        self.published = 0
        self.delivered = 0
        self.dropped = 0
        self.lost = 0  # backlog and in-flight messages of subscribers that vanished
        self.rejected = 0
        self.refused = 0  # subscribe announcements refused by the caps
        self.closing = False
        self._serial = 0  # labels subscriptions in stats and logs: "sub-1", "sub-2", ...

    def handle(self, body: bytes) -> Union[bytes, "Deferred[bytes]"]:
        try:
            items = messages.split_body(body)
        except MessageError:
            self.rejected += 1
            raise
        for item in items:
            # is_control(), inline: this runs once per published message.
            if not item[0] or item[0].startswith(CONTROL_PREFIX):
                try:
                    if not item[0]:
                        raise MessageError(topic_problem(""))  # the topic rule: nobody can subscribe to it
                    if len(items) == 1:
                        return self._control(item[0], item[3] or {})
                    raise MessageError("control messages cannot be sent in a batch")
                except MessageError:
                    self.rejected += 1
                    raise
            problem = topic_problem(item[0])  # the rest of the rule (a Go publisher's "orders.*", "a..b")
            if problem is not None:
                self.rejected += 1
                raise MessageError(f"publish refused: {problem}")
        recipients = self.recipients
        self.published += len(items)
        if len(items) == 1:
            outlets = recipients(items[0][0])
            if outlets:
                text = items[0][1]
                for outlet in outlets:
                    outlet.push(text)
                self.backlog_size += len(text) * len(outlets)
                if self.backlog_size > self.total_backlog_bytes:
                    self.trim_backlogs()
                for outlet in list(outlets):
                    outlet.flush()
            return _OK
        touched: dict[_Outlet, None] = {}
        for topic, text, _, _ in items:
            outlets = recipients(topic)
            if outlets:
                for outlet in outlets:
                    outlet.push(text)
                    touched[outlet] = None
                self.backlog_size += len(text) * len(outlets)
                if self.backlog_size > self.total_backlog_bytes:
                    self.trim_backlogs()
        for outlet in touched:
            outlet.flush()
        return _OK

    def recipients(self, topic: str) -> Optional[list[_Outlet]]:
        """The outlets one message of ``topic`` goes to: each plain subscriber of every
        matching pattern, and one member of each queue group (the round-robin turns).

        Counts the message in each matching topic's ``published``. A plain
        topic without groups is one dict lookup, as before patterns existed;
        the list returned may be the index's own (not to be changed).
        """
        index = self.index
        if not index.patterns:
            interest = index.literal.get(topic)
            if interest is None:
                return None
        else:
            interests = index.match(topic)
            if not interests:
                return None
            if len(interests) > 1:
                out: list[_Outlet] = []
                for interest in interests:
                    interest.published += 1
                    interest.recipients(_Outlet.has_room, out)
                return out
            interest = interests[0]
        interest.published += 1
        if not interest.groups:
            return interest.plain
        out = []
        interest.recipients(_Outlet.has_room, out)
        return out

    def enlist(self, outlet: _Outlet) -> None:
        """Add a new subscription to the index: its pattern, and its queue group if any."""
        interest = self.index.get(outlet.topic)
        if interest is None:
            interest = _Subscribers()
            self.index.add(outlet.topic, interest)
        interest.add(outlet, outlet.group)

    def delist(self, outlet: _Outlet) -> None:
        """Take a subscription out of the index; a pattern nobody wants any more goes."""
        interest = self.index.get(outlet.topic)
        if interest is None:
            return
        interest.remove(outlet, outlet.group)
        interest.delivered_before += outlet.delivered
        if not interest.plain and not interest.groups:
            self.index.remove(outlet.topic)

    def subscribers(self, topic: str) -> list[_Outlet]:
        """Every subscription to exactly ``topic`` (a pattern is one topic here), in groups or not."""
        interest = self.index.get(topic)
        if interest is None:
            return []
        return interest.plain + [member for group in interest.groups.values() for member in group.members]

    def _control(self, kind: str, headers: dict[str, str]) -> Union[bytes, "Deferred[bytes]"]:
        if kind not in (messages.SUBSCRIBE, messages.UNSUBSCRIBE):
            raise MessageError(
                f"unknown control message {excerpt(kind)}; topics starting with {CONTROL_PREFIX!r} are reserved"
            )
        topic = headers.get("topic")
        if topic is None:
            raise MessageError(f"{kind} needs a 'topic' header")
        group = headers.get("group")  # absent: a plain subscription (what Go providers send)
        try:
            channel = uuid.UUID(headers.get("channel", ""))
        except ValueError:
            raise MessageError(f"{kind} needs a 'channel' header holding a UUID") from None
        if kind == messages.UNSUBSCRIBE:
            outlet = self.outlets.get(channel)
            if outlet is not None and outlet.topic == topic and self._may_end(outlet):
                self.remove(outlet, "unsubscribed", notify=False)
            return _OK  # also to a stranger: whether the subscription exists is not told
        outlet = self.outlets.get(channel)
        d: Deferred[Any]
        if outlet is not None:
            if outlet.topic != topic or outlet.group != group:
                raise MessageError(f"channel {channel} is already subscribed to another topic or group")
            # A subscriber back after a gap says so again: the subscription we kept resumes.
            if outlet.ready and outlet.consumer.connected:
                return _RESUMED  # also every heartbeat: a dict lookup, nothing else
            d = outlet.rejoin()
            answer = _RESUMED
        elif channel in self.opening:
            # Announced again while its first announcement is being set up: wait
            # for that one and answer as to a re-announce (never a second outlet).
            setup = self.opening[channel]
            if setup.topic != topic or setup.group != group:
                raise MessageError(f"channel {channel} is already being subscribed to another topic or group")
            if len(setup.waiters) >= _SETUP_WAITERS:
                self.refused += 1
                raise PulsyfluxError("subscribe refused: too many announcements of one channel being set up")
            d = Deferred()
            setup.waiters.append(d)
            answer = _RESUMED
        else:
            problem = topic_problem(topic, subscribing=True)
            if problem is None and group is not None:
                problem = group_problem(group)
            if problem is not None:
                raise MessageError(f"subscribe refused: {problem}")
            if len(self.outlets) + len(self.opening) >= self.max_subscriptions:
                self.refused += 1
                raise PulsyfluxError(
                    f"subscribe refused: the broker has its maximum of {self.max_subscriptions} subscriptions"
                )
            client = self.provider.current_client_id if self.provider is not None else None
            if client is not None and self.setups_by_client.get(client, 0) >= self.max_setups_per_client:
                self.refused += 1
                raise PulsyfluxError(
                    "subscribe refused: too many subscriptions being set up by this client"
                    f" (at most {self.max_setups_per_client} at once); try again"
                )
            if len(self.opening) >= self.max_setups:
                self.refused += 1
                raise PulsyfluxError(
                    f"subscribe refused: too many subscriptions being set up (at most {self.max_setups} at once); try again"
                )
            d = Deferred.fromCoroutine(self.setup(topic, channel, None, client, group))
            answer = _OK

        def failed(failure: Failure) -> NoReturn:
            # Said plainly, so the client does not take it for "no broker".
            if failure.check(NoProviderError):
                raise PulsyfluxError(f"subscribe failed: no subscriber answers on channel {channel}")
            # Never the whole text: it may be the (hostile) provider's on that channel.
            raise PulsyfluxError(f"subscribe failed: {_clip(failure.getErrorMessage())}")

        return d.addCallbacks(lambda _: answer, failed)

    async def setup(
        self,
        topic: str,
        channel: uuid.UUID,
        local: Optional[Subscription],
        client: Optional[uuid.UUID] = None,
        group: Optional[str] = None,
    ) -> _Outlet:
        """:meth:`open_outlet`, with ``channel`` marked as opening meanwhile (see :meth:`_control`).

        ``client``: the announcing client of a remote subscription, counted in
        ``setups_by_client`` while it is set up.
        """
        if channel in self.opening or channel in self.outlets:
            raise PulsyfluxError(f"channel {channel} is already subscribed")
        setup = _Setup(topic, group)
        self.opening[channel] = setup
        if client is not None:
            self.setups_by_client[client] = self.setups_by_client.get(client, 0) + 1
        try:
            outlet = await self.open_outlet(topic, channel, local, group)
        except BaseException:
            failure = Failure()
            self._setup_done(channel, client)
            for d in setup.waiters:
                d.errback(failure)
            raise
        self._setup_done(channel, client)
        outlet.owner = client
        for d in setup.waiters:
            d.callback(outlet)
        return outlet

    def _may_end(self, outlet: _Outlet) -> bool:
        """Only the client that announced a subscription may unsubscribe it (knowing its channel is not enough)."""
        if outlet.owner is None:
            return True
        if self.provider is None:
            return False
        return self.provider.current_client_id == outlet.owner

    def _setup_done(self, channel: uuid.UUID, client: Optional[uuid.UUID]) -> None:
        """Undo what :meth:`setup` recorded while ``channel`` was being set up, however that ended."""
        del self.opening[channel]
        if client is not None:
            left = self.setups_by_client.pop(client, 1) - 1
            if left > 0:
                self.setups_by_client[client] = left

    async def open_outlet(
        self, topic: str, channel: uuid.UUID, local: Optional[Subscription], group: Optional[str] = None
    ) -> _Outlet:
        """Connect a forwarding Consumer to ``channel``, check the subscriber answers, start forwarding."""
        if self.closing:
            raise ConnectionLostError("the broker is closing")
        # Beside the server (pulsyflux.server.inproc), only the broker may deliver on this channel.
        unguard = _guard(self.address, channel)
        consumer: Optional[Consumer] = None
        try:
            consumer = await Consumer.connect(self.address, channel, reactor=self.reactor, reconnect=self.reconnect)
            await _send_until_registered(consumer, _PROBE, self.reactor)
            if self.closing:
                raise ConnectionLostError("the broker is closing")
        except BaseException:
            unguard()
            if consumer is not None:
                await consumer.close()
            raise
        self._serial += 1
        outlet = _Outlet(self, topic, consumer, local, self.backlog, self.backlog_bytes, f"sub-{self._serial}", group)
        outlet.unguard = unguard
        self.enlist(outlet)
        self.outlets[channel] = outlet
        if self.reconnect:
            consumer.on_reconnect(lambda _: outlet.rejoin().addErrback(_ignore))
        consumer.when_lost().addCallback(lambda _: self.remove(outlet, "connection to the server lost"))
        return outlet

    def remove(self, outlet: _Outlet, reason: str, notify: bool = True) -> "Deferred[Any]":
        """Forget a subscription and close its connections (and a local stream)."""
        if self.outlets.get(outlet.channel) is not outlet:
            return succeed(None)
        del self.outlets[outlet.channel]
        outlet.unguard()
        self.delist(outlet)
        waits = [outlet.close(reason, notify=notify and outlet.local is None)]
        sub = outlet.local
        if sub is not None:
            waits.append(sub._end(reason))
        return DeferredList(waits, consumeErrors=True)

    def trim_backlogs(self) -> None:
        """All backlogs together are over the bound: drop the oldest messages of the largest.

        Down to 15/16 of the bound, so the sort is paid once per 1/16 of it.
        """
        excess = self.backlog_size - (self.total_backlog_bytes - self.total_backlog_bytes // 16)
        for outlet in sorted(self.outlets.values(), key=lambda o: o.size, reverse=True):
            if excess <= 0 or not outlet.size:
                return
            excess -= outlet.trim(outlet.limit, max(outlet.size - excess, 0))

    def remove_topic(self, topic: str, reason: str) -> "Deferred[Any]":
        return DeferredList([self.remove(o, reason) for o in self.subscribers(topic)], consumeErrors=True)

    def remove_all(self, reason: str) -> "Deferred[Any]":
        return DeferredList([self.remove(o, reason) for o in list(self.outlets.values())], consumeErrors=True)

    def stats(self) -> dict[str, Any]:
        return {
            "published": self.published,
            "delivered": self.delivered,
            "dropped": self.dropped,
            "lost": self.lost,
            "rejected": self.rejected,
            "refused": self.refused,
            "backlog_bytes": self.backlog_size,
            "topics": {topic: len(interest) for topic, interest in self.index.items()},
            # Per topic (or pattern) while it has subscribers: messages fanned out to it, and accepted by them.
            "topic_published": {topic: interest.published for topic, interest in self.index.items()},
            "topic_delivered": {topic: interest.delivered() for topic, interest in self.index.items()},
            "groups": [
                {"topic": topic, "group": group.name, "members": len(group)}
                for topic, interest in self.index.items()
                for group in interest.groups.values()
            ],
            "subscriptions": [outlet.stats() for outlet in self.outlets.values()],
        }


# -- publishing ------------------------------------------------------------------


class _Publisher:
    """Publishes over one Consumer, many requests in flight.

    A publish goes out at once while fewer than ``window`` requests are in
    flight; otherwise it waits and leaves with the others in one batch when
    an answer comes back, so a busy publisher sends few large requests and
    an idle one adds no delay. A publish's timeout counts from the call,
    also while it waits for its turn.
    """

    def __init__(self, consumer: Consumer, window: int = _PUBLISH_WINDOW, batch: int = _PUBLISH_BATCH) -> None:
        self.consumer = consumer
        self.window = window
        self.batch = batch
        self.requests = 0
        self._texts: list[str] = []
        self._waiters: list[Deferred[None]] = []
        self._deadlines: list[float] = []  # when each waiting publish times out
        self._closed: Optional[Exception] = None

    def publish(
        self, topic: str, payload: bytes, headers: Optional[dict[str, str]], timeout: float
    ) -> "Deferred[None]":
        if self._closed is not None:
            return fail(self._closed)
        text = messages.encode_text(topic, payload, headers)
        d: Deferred[None] = Deferred()
        self._deadlines.append(self.consumer.reactor.seconds() + timeout if timeout and timeout > 0 else _NEVER)
        self._texts.append(text)
        self._waiters.append(d)
        if self.requests < self.window:
            self._flush()
        return d

    def _flush(self) -> None:
        while self._texts and self.requests < self.window:
            batch = self.batch
            texts, waiters, deadline = self._texts[:batch], self._waiters[:batch], min(self._deadlines[:batch])
            del self._texts[:batch], self._waiters[:batch], self._deadlines[:batch]
            self.requests += 1
            timeout = 0.0  # the batch's request times out with its earliest publish
            if deadline != _NEVER:
                timeout = max(deadline - self.consumer.reactor.seconds(), 0.001)
            d = self.consumer.send(messages.encode_batch(texts), timeout=timeout)
            d.addCallbacks(self._answered, self._failed, callbackArgs=(waiters,), errbackArgs=(waiters,))

    def _answered(self, result: bytes, waiters: list[Deferred[None]]) -> None:
        self.requests -= 1
        for d in waiters:
            d.callback(None)
        self._flush()

    def _failed(self, failure: Failure, waiters: list[Deferred[None]]) -> None:
        self.requests -= 1
        for d in waiters:
            d.errback(failure.value)
        self._flush()

    def close(self, error: Exception) -> "Deferred[None]":
        self._closed = error
        waiters, self._waiters, self._texts, self._deadlines = self._waiters, [], [], []
        for d in waiters:
            d.errback(error)
        return self.consumer.close()


def _announcement(sub: Subscription) -> bytes:
    """The ``$pulsyflux/subscribe`` for ``sub``: its first, every re-announce, and every heartbeat.

    The ``group`` header only for a queue group: a plain one is byte for byte what Go providers send.
    """
    if sub.group is None:
        return messages.control(messages.SUBSCRIBE, topic=sub.topic, channel=str(sub.channel)).encode("utf-8")
    return messages.control(messages.SUBSCRIBE, topic=sub.topic, channel=str(sub.channel), group=sub.group).encode(
        "utf-8"
    )


# -- the public API -------------------------------------------------------------------


class Broker:
    """The pub/sub broker, running in this process on a server's broker channel.

        broker = await Broker.connect("127.0.0.1:9090")
        sub = await broker.subscribe("orders")
        await broker.publish("orders", b"new order")

    ``buffer`` is the default :class:`Subscription` buffer; ``backlog`` and
    ``backlog_bytes`` the messages and bytes kept per slow subscriber, and
    ``total_backlog_bytes`` the bytes kept for all of them, before the
    oldest are dropped; ``max_subscriptions`` and ``max_setups`` cap the
    subscriptions, and the remote ones being set up at once, and
    ``max_setups_per_client`` those of one announcing client;
    ``batch`` and ``window`` shape forwarding (messages per request,
    requests in flight per subscriber). ``reconnect`` (default False; True
    or a backoff policy, as for Consumers) keeps the broker and its
    subscriptions across a lost server connection; after it, a subscriber
    not back on its channel within ``rejoin_patience`` seconds is dropped
    (docs/broker.md).
    """

    def __init__(
        self,
        address: Address,
        broker_channel_id: ChannelId = DEFAULT_BROKER_CHANNEL,
        reactor: Any = None,
        buffer: int = DEFAULT_BUFFER,
        backlog: int = DEFAULT_BACKLOG,
        batch: int = DEFAULT_BATCH,
        window: int = DEFAULT_WINDOW,
        reconnect: Reconnect = False,
        rejoin_patience: float = _REJOIN_PATIENCE,
        backlog_bytes: int = DEFAULT_BACKLOG_BYTES,
        total_backlog_bytes: int = DEFAULT_TOTAL_BACKLOG_BYTES,
        max_subscriptions: int = DEFAULT_MAX_SUBSCRIPTIONS,
        max_setups: int = DEFAULT_MAX_SETUPS,
        max_setups_per_client: int = DEFAULT_MAX_SETUPS_PER_CLIENT,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        if backlog < 0 or batch < 1 or window < 1:
            raise ValueError("backlog must be >= 0, batch and window >= 1")
        if backlog_bytes < 0 or total_backlog_bytes < 0 or max_subscriptions < 0:
            raise ValueError("backlog_bytes, total_backlog_bytes and max_subscriptions must be >= 0")
        if max_setups < 1 or max_setups_per_client < 1:
            raise ValueError("max_setups and max_setups_per_client must be >= 1")
        self.address = address
        self.channel = _uuid(broker_channel_id)
        self.reactor = reactor
        self.buffer = buffer
        self.reconnect = reconnect
        self._fanout = _Fanout(
            address,
            reactor,
            backlog=backlog,
            batch=batch,
            window=window,
            reconnect=reconnect,
            rejoin_patience=rejoin_patience,
            backlog_bytes=backlog_bytes,
            total_backlog_bytes=total_backlog_bytes,
            max_subscriptions=max_subscriptions,
            max_setups=max_setups,
            max_setups_per_client=max_setups_per_client,
        )
        self._provider: Optional[Provider] = None
        self._publisher: Optional[_Publisher] = None
        self._closed: Optional[Exception] = None
        self._closing: Optional[Deferred[None]] = None
        self._closed_waiters: list[Deferred[None]] = []
        self.lost_link = False  # closed because a connection to the server dropped, not by close()

    @property
    def closed(self) -> bool:
        """True once the broker was closed or lost its connection for good."""
        return self._closed is not None

    @classmethod
    def connect(
        cls,
        address: Address,
        broker_channel_id: ChannelId = DEFAULT_BROKER_CHANNEL,
        reactor: Any = None,
        **options: Any,
    ) -> "Deferred[Broker]":
        """Open the broker's Provider and publishing Consumer; fires when both work.

        ``options``: ``buffer``, ``backlog``, ``backlog_bytes``,
        ``total_backlog_bytes``, ``max_subscriptions``, ``max_setups``, ``max_setups_per_client``,
        ``batch``, ``window``, ``reconnect`` (default False) and
        ``rejoin_patience`` as for the class.
        """
        broker = cls(address, broker_channel_id, reactor, **options)
        return Deferred.fromCoroutine(broker._start())

    async def _start(self) -> "Broker":
        # Made before it connects, so the fanout can ask whose announcement it handles from the first one.
        provider = Provider(self.channel, self.reactor, handler=self._fanout.handle)
        self._fanout.provider = provider
        self._provider = await Provider._connect(self.address, provider, self.reconnect)
        try:
            consumer = await Consumer.connect(
                self.address, self.channel, reactor=self.reactor, reconnect=self.reconnect
            )
        except BaseException:
            await self._provider.close()
            raise
        self._publisher = _Publisher(consumer)
        try:
            await _send_until_registered(consumer, b"[]", self.reactor)  # our Provider is in place
        except BaseException:
            await self.close()
            raise
        self._provider.when_lost().addCallback(lambda _: self._lost())
        consumer.when_lost().addCallback(lambda _: self._lost())  # publishing needs it too
        return self

    @property
    def published(self) -> int:
        """Messages accepted from any publisher (also Go ones)."""
        return self._fanout.published

    @property
    def delivered(self) -> int:
        """Messages subscribers have accepted (one per subscriber)."""
        return self._fanout.delivered

    @property
    def dropped(self) -> int:
        """Messages dropped because a subscriber's backlog was full."""
        return self._fanout.dropped

    def stats(self) -> dict[str, Any]:
        """Counters, topics with their subscriber counts, and per-subscription backlog/drops."""
        stats = self._fanout.stats()
        stats["channel"] = str(self.channel)
        stats["reconnects"] = self._provider.reconnects if self._provider is not None else 0
        return stats

    def publish(
        self, topic: str, payload: bytes = b"", headers: Optional[dict[str, str]] = None, timeout: float = 5.0
    ) -> "Deferred[None]":
        """Publish; fires once the broker accepted the message.

        Fails with NoProviderError (no broker), RequestTimeout,
        ConnectionLostError or RemoteError; raises TypeError/ValueError at
        once for a bad topic, payload or headers.
        """
        check_topic(topic)
        if self._publisher is None:
            return fail(self._closed or ConnectionLostError("the broker is not connected"))
        return self._publisher.publish(topic, payload, headers, timeout)

    def subscribe(
        self, topic: str, buffer: Optional[int] = None, group: Optional[str] = None
    ) -> "Deferred[Subscription]":
        """A new :class:`Subscription` to ``topic`` (2 more connections).

        ``topic`` may be a pattern: ``orders.*`` (one token), ``orders.>``
        (one or more). With ``group``, each message goes to one member of
        that queue group (per pattern), round-robin (docs/broker.md).
        """
        _check_subscription(topic, group)
        if self._closed is not None:
            return fail(self._closed)
        return Deferred.fromCoroutine(self._subscribe(topic, buffer or self.buffer, group))

    async def _subscribe(self, topic: str, buffer: int, group: Optional[str] = None) -> Subscription:
        sub, provider = await _open_subscription(self.address, topic, buffer, self.reactor, self.reconnect, group)
        try:
            outlet = await self._fanout.setup(topic, sub.channel, sub, group=group)
        except BaseException:
            sub._close("subscribe failed")
            await provider.close()
            raise
        provider.when_lost().addCallback(lambda _: self._fanout.remove(outlet, "connection to the server lost"))
        return sub

    def unsubscribe(self, topic: str) -> "Deferred[Any]":
        """End every subscription of ``topic`` (here and remote); fires when their connections are closed."""
        return self._fanout.remove_topic(topic, "unsubscribed")

    def close(self) -> "Deferred[None]":
        """End every subscription and close every connection of the broker."""
        if self._closing is None:
            self._closed = self._closed or ConnectionLostError("the broker is closed")
            self._fanout.closing = True
            waits = [self._fanout.remove_all("the broker closed")]
            if self._publisher is not None:
                waits.append(self._publisher.close(self._closed))
            if self._provider is not None:
                waits.append(self._provider.close())
            self._closing = DeferredList(waits, consumeErrors=True).addCallback(self._all_closed)
        d: Deferred[None] = Deferred()

        def closed(result: object) -> object:
            d.callback(None)
            return result

        self._closing.addBoth(closed)
        return d

    def _all_closed(self, _: Any) -> None:
        waiters, self._closed_waiters = self._closed_waiters, []
        for d in waiters:
            d.callback(None)

    def when_closed(self) -> "Deferred[None]":
        """Fires once the broker has closed: by :meth:`close`, or because it lost the server."""
        if self._closing is not None and self._closing.called:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._closed_waiters.append(d)
        return d

    def _lost(self) -> None:
        if self._closing is None:
            self.lost_link = True
            log.warn("broker lost its connection to the server; closing every subscription")
            self._closed = ConnectionLostError("the broker lost its connection to the server")
            self.close().addErrback(_ignore)


class BrokerClient:
    """Publish and subscribe through a broker running in another process.

        client = await BrokerClient.connect("127.0.0.1:9090")
        sub = await client.subscribe("orders")
        await client.publish("orders", b"new order")

    One publishing Consumer, plus one Provider per subscription; the
    broker opens the forwarding Consumer when asked (docs/broker.md).

    With ``reconnect`` (default False; True or a backoff policy, as for
    Consumers) its connections come back after a drop, and each
    subscription asks the broker again to forward to it, for up to
    ``resubscribe_patience`` seconds once its own line is back; past that
    it ends with ``resubscribe failed: ...``.

    Every ``heartbeat`` seconds (default 5; None or 0: never) it re-announces
    its subscriptions, which a live broker answers at once and a restarted
    one takes as new ones. A broker that misses two beats in a row is gone:
    its subscriptions end with ``the broker on channel ... disappeared``, or
    with ``reconnect`` wait for a broker to take them back, as above.
    """

    resubscribe_patience = 30.0

    def __init__(
        self,
        address: Address,
        broker_channel_id: ChannelId = DEFAULT_BROKER_CHANNEL,
        reactor: Any = None,
        buffer: int = DEFAULT_BUFFER,
        reconnect: Reconnect = False,
        heartbeat: Optional[float] = DEFAULT_HEARTBEAT,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        if heartbeat is not None and heartbeat < 0:
            raise ValueError("heartbeat must be >= 0 (0 or None: no heartbeat)")
        self.address = address
        self.channel = _uuid(broker_channel_id)
        self.reactor = reactor
        self.buffer = buffer
        self.reconnect = reconnect
        self.heartbeat = heartbeat or None
        self._beat: Any = None  # the next heartbeat's DelayedCall, while one is due
        self._beating = False
        self._misses = 0  # heartbeats in a row the broker did not answer
        self._consumer: Optional[Consumer] = None
        self._publisher: Optional[_Publisher] = None
        self._subscriptions: dict[uuid.UUID, Subscription] = {}
        self._resubscribing: set[uuid.UUID] = set()
        self._pauses: set[Deferred[None]] = set()  # resubscribe retries waiting; cancelled by close()
        self._closed: Optional[Exception] = None

    @classmethod
    def connect(
        cls,
        address: Address,
        broker_channel_id: ChannelId = DEFAULT_BROKER_CHANNEL,
        reactor: Any = None,
        **options: Any,
    ) -> "Deferred[BrokerClient]":
        """Connect and check a broker answers on the channel (NoProviderError if none).

        ``options``: ``buffer``, ``reconnect`` (default False) and ``heartbeat``
        (default 5 s) as for the class.
        """
        client = cls(address, broker_channel_id, reactor, **options)
        return Deferred.fromCoroutine(client._start())

    async def _start(self) -> "BrokerClient":
        self._consumer = await Consumer.connect(
            self.address, self.channel, reactor=self.reactor, reconnect=self.reconnect
        )
        self._publisher = _Publisher(self._consumer)
        try:
            await _send_until_registered(self._consumer, b"[]", self.reactor)
        except NoProviderError:
            await self._consumer.close()
            raise NoProviderError(f"no broker on channel {self.channel} at {self.address}") from None
        except BaseException:
            await self._consumer.close()
            raise
        self._consumer.when_lost().addCallback(lambda _: self._stop_heartbeat())
        return self

    @property
    def subscriptions(self) -> list[Subscription]:
        return list(self._subscriptions.values())

    def when_connected(self) -> "Deferred[BrokerClient]":
        """Fires with this client once its publishing connection is up (at once if it is)."""
        if self._consumer is None:
            return fail(self._closed or ConnectionLostError("not connected"))
        return self._consumer.when_connected().addCallback(lambda _: self)

    def publish(
        self, topic: str, payload: bytes = b"", headers: Optional[dict[str, str]] = None, timeout: float = 5.0
    ) -> "Deferred[None]":
        """Same as :meth:`Broker.publish`."""
        check_topic(topic)
        if self._publisher is None:
            return fail(self._closed or ConnectionLostError("not connected"))
        return self._publisher.publish(topic, payload, headers, timeout)

    def subscribe(
        self, topic: str, buffer: Optional[int] = None, group: Optional[str] = None
    ) -> "Deferred[Subscription]":
        """Same as :meth:`Broker.subscribe`, through the broker's control messages."""
        _check_subscription(topic, group)
        if self._closed is not None or self._consumer is None:
            return fail(self._closed or ConnectionLostError("not connected"))
        return Deferred.fromCoroutine(self._subscribe(topic, buffer or self.buffer, group))

    async def _subscribe(self, topic: str, buffer: int, group: Optional[str] = None) -> Subscription:
        assert self._consumer is not None
        sub, provider = await _open_subscription(self.address, topic, buffer, self.reactor, self.reconnect, group)
        if self.reconnect:
            provider.on_reconnect(lambda _: self._resubscribe(sub))

        def ended_by_broker(reason: str) -> None:
            sub._close(reason)
            self._forget(sub)
            self.reactor.callLater(0, provider.close)

        sub._on_closed_by_broker(ended_by_broker)
        provider.when_lost().addCallback(lambda _: self._forget(sub))
        try:
            await self._consumer.send(_announcement(sub), timeout=10.0)
        except BaseException:
            sub._close("subscribe failed")
            await provider.close()
            raise
        self._subscriptions[sub.channel] = sub
        self._schedule_heartbeat()
        return sub

    def _forget(self, sub: Subscription) -> None:
        if self._subscriptions.get(sub.channel) is sub:
            del self._subscriptions[sub.channel]
        if not self._subscriptions:
            self._stop_heartbeat()  # nothing to keep alive: no timer left behind

    # -- the heartbeat: one timer per client ----------------------------------

    def _schedule_heartbeat(self) -> None:
        if self.heartbeat and self._beat is None and not self._beating and self._closed is None and self._subscriptions:
            self._beat = self.reactor.callLater(self.heartbeat, self._heartbeat)

    def _stop_heartbeat(self) -> None:
        if self._beat is not None:
            if self._beat.active():
                self._beat.cancel()
            self._beat = None

    def _heartbeat(self) -> None:
        self._beat = None
        self._beating = True

        def done(_: Any) -> None:
            self._beating = False
            self._schedule_heartbeat()

        d = Deferred.fromCoroutine(self._check_broker())
        d.addErrback(lambda failure: log.failure("broker heartbeat failed", failure))
        d.addBoth(done)

    async def _check_broker(self) -> None:
        """Re-announce every steady subscription; act on a broker that stays silent."""
        consumer = self._consumer
        if consumer is None or self._closed is not None or not consumer.connected:
            return  # our own line is down: the reconnect path has this in hand
        subs = [s for s in self._subscriptions.values() if self._steady(s) and s._connected()]
        if not subs:
            return
        timeout = max(self.heartbeat or 0.0, 1.0)  # a busy broker is not a dead one
        results = await DeferredList(
            [consumer.send(_announcement(sub), timeout=timeout) for sub in subs], consumeErrors=True
        )
        if self._closed is not None:
            return
        answered = False
        silent: Optional[Exception] = None
        for sub, (ok, result) in zip(subs, results):
            if ok:
                answered = True
                if result == _OK and self._steady(sub):
                    # A broker that had forgotten it (restarted) took it as new: messages may be missing.
                    log.warn("the broker on channel {c} had lost the subscription to {t!r}; subscribed again",
                             c=self.channel, t=sub.topic)  # fmt: skip
                    sub._count_gap()
                    sub._resumed()
                continue
            failure = cast(Failure, result)  # not ok: DeferredList gives the Failure (its stub says bytes)
            if failure.check(NoProviderError, RequestTimeout):
                silent = failure.value
            elif not failure.check(ConnectionLostError):  # our line dropped: says nothing about the broker
                answered = True  # it refused, so it is there
                log.debug("heartbeat for {t!r} not accepted: {e}", t=sub.topic, e=failure.value)
        if answered:
            self._misses = 0
            return
        if silent is None:
            return
        self._misses += 1
        if self._misses < _HEARTBEAT_MISSES:
            return
        self._misses = 0
        self._broker_gone(subs, silent)

    def _steady(self, sub: Subscription) -> bool:
        """Still ours, open, and not being re-announced by the reconnect path."""
        return self._subscriptions.get(sub.channel) is sub and not sub.closed and sub.channel not in self._resubscribing

    def _broker_gone(self, subs: list[Subscription], error: Exception) -> None:
        reason = f"the broker on channel {self.channel} disappeared"
        for sub in subs:
            if not self._steady(sub):
                continue
            if self.reconnect:
                log.warn("{r} ({e}); waiting for a broker to take {t!r} back", r=reason, e=error, t=sub.topic)
                sub._count_gap()
                self._resubscribe(sub)
            else:
                log.warn("subscription to {t!r} ended: {r} ({e})", t=sub.topic, r=reason, e=error)
                self._forget(sub)
                sub._end(reason).addErrback(_ignore)

    def _resubscribe(self, sub: Subscription) -> None:
        """The subscription's Provider is back: ask the broker to forward to it again.

        A broker that kept running kept the subscription and just resumes it;
        a restarted one has forgotten it and subscribes the channel afresh.
        """
        if sub.channel in self._resubscribing:
            return  # the running attempt waits for the line and sends again
        self._resubscribing.add(sub.channel)
        d = Deferred.fromCoroutine(self._announce_again(sub))
        d.addErrback(lambda failure: log.failure("resubscribing to {t!r} failed", failure, t=sub.topic))
        d.addBoth(lambda _: self._resubscribing.discard(sub.channel))

    async def _announce_again(self, sub: Subscription) -> None:
        assert self._consumer is not None
        body = _announcement(sub)
        deadline = None
        delay = 0.05
        error: Exception = ConnectionLostError("not connected")
        while not sub.closed and self._closed is None and sub.channel in self._subscriptions:
            if not (sub._connected() and self._consumer.connected):
                deadline = None  # patience counts while both lines are up
                try:
                    await sub._when_connected()
                    await self._consumer.when_connected()
                except ConnectionLostError:
                    return  # closed for good
                continue
            if deadline is None:
                deadline = self.reactor.seconds() + self.resubscribe_patience
            try:
                await self._consumer.send(body, timeout=min(10.0, self.resubscribe_patience))
            except NoProviderError:
                error = NoProviderError(f"no broker on channel {self.channel}")
            except PulsyfluxError as failure:  # the broker could not reach our Provider yet, ...
                error = failure
                log.debug("resubscribe to {t!r} not accepted yet: {e}", t=sub.topic, e=failure)
            else:
                if not sub.closed:
                    sub._resumed()
                return
            if self.reactor.seconds() >= deadline:
                reason = f"resubscribe failed: {error}"
                log.warn("subscription to {t!r} ended: {r}", t=sub.topic, r=reason)
                self._forget(sub)
                await sub._end(reason)
                return
            pause = deferLater(self.reactor, delay, lambda: None)
            self._pauses.add(pause)
            try:
                await pause
            except CancelledError:
                return  # the client closed
            finally:
                self._pauses.discard(pause)
            delay = min(delay * 2, 1.0)

    def unsubscribe(self, topic: str) -> "Deferred[Any]":
        """End this client's subscriptions to ``topic``; fires when their connections are closed."""
        subs = [sub for sub in self._subscriptions.values() if sub.topic == topic]
        return DeferredList([Deferred.fromCoroutine(self._unsubscribe(sub, "unsubscribed")) for sub in subs])

    async def _unsubscribe(self, sub: Subscription, reason: str) -> None:
        self._forget(sub)
        sub._close(reason)
        if self._consumer is not None and self._consumer.connected:
            body = messages.control(messages.UNSUBSCRIBE, topic=sub.topic, channel=str(sub.channel)).encode("utf-8")
            try:
                await self._consumer.send(body, timeout=2.0)
            except (PulsyfluxError, CancelledError) as error:
                log.debug("unsubscribe not confirmed by the broker: {e}", e=error)
        await sub._end(reason)  # closed above: this closes its Provider

    def close(self) -> "Deferred[Any]":
        """Unsubscribe everything and close every connection."""
        if self._closed is None:
            self._closed = ConnectionLostError("the broker client is closed")
        error = self._closed
        self._stop_heartbeat()
        for pause in list(self._pauses):
            pause.cancel()
        subs = list(self._subscriptions.values())

        async def closing() -> None:
            await DeferredList([Deferred.fromCoroutine(self._unsubscribe(s, "the client closed")) for s in subs])
            if self._publisher is not None:
                await self._publisher.close(error)

        return Deferred.fromCoroutine(closing())
