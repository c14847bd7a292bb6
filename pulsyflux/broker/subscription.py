"""The subscriber's end: a :class:`Subscription` queues the messages of one topic.

Only the broker should deliver to it; its owners (:class:`~pulsyflux.broker.broker.Broker`,
:class:`~pulsyflux.broker.client.BrokerClient` and the fan-out) change it
through the underscored methods of its "owner's side", never its attributes.
"""

from __future__ import annotations

import uuid
from collections import deque
from typing import Any, AsyncIterator, Callable, Optional, Union

from twisted.internet.defer import Deferred, DeferredQueue, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..client import ChannelId, Provider, Reconnect
from ..client.provider import DEFAULT_MAX_INCOMPLETE
from ..endpoints import Address
from ..wire import messages
from ..wire.errors import PulsyfluxError
from ..wire.messages import Message, Position, check_topic, group_problem, is_control, is_pattern
from ..wire.printable import printable
from .link import OK, OK_BINARY, channel_uuid
from .subjects import matcher

# What the broker's and each subscriber's Provider may hold of requests still
# arriving: messages whose payloads are up to 64 MiB, in base64 (4 bytes per 3).
MESSAGES_INCOMPLETE = messages.wire_limit(DEFAULT_MAX_INCOMPLETE)

__all__ = ["Subscription", "SubscriptionClosed", "DEFAULT_BUFFER", "check_subscription", "open_subscription"]

log = Logger()


DEFAULT_BUFFER = 100  # messages a Subscription queues before it holds answers
CLOSED_REASON_CHARS = 512  # of a closing notice's reason, kept (escaped) in closed_reason
_MATCHED_TOPICS = 1024  # topics a pattern Subscription remembers as matching (then it starts over)


class SubscriptionClosed(PulsyfluxError):
    """The subscription ended: unsubscribed, broker closed, or connection lost."""


def check_subscription(topic: str, group: Optional[str]) -> None:
    """The topic rule for subscribing, and the group's: TypeError/ValueError at once."""
    check_topic(topic, subscribing=True)
    if group is not None:
        problem = group_problem(group)
        if problem is not None:
            raise (TypeError if type(group) is not str else ValueError)(problem)


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
        # Topics the pattern matched lately: a set lookup per message instead of a regex (bounded).
        self._matched: set[str] = set()
        self.channel = channel_uuid(channel)
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
        self._lost_hooks: list[Callable[["Subscription", str], Any]] = []
        # After a gap: True if the broker kept the subscription (messages meanwhile
        # waited in its backlog), False if a broker took it as new (they are missing).
        self.kept = True
        self._position: Optional[Position] = None
        # What the first announcement asks to replay (since / last); see _announcement.
        self._since: Optional[Position] = None
        self._last: Optional[int] = None
        self.recovered = True
        """False when the broker could not replay everything asked: the last
        (re)subscription's ``since`` was of another epoch or older than the
        retained history, or the broker keeps no history. Resync then."""

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

    @property
    def position(self) -> Optional[Position]:
        """Where the stream stands: the last received message's position (or where it started).

        A reconnecting :class:`BrokerClient` resumes from here. None while
        the broker gives no positions (it keeps no history), and for a
        pattern or a queue group (positions count per topic, and a group
        member sees only some of them).
        """
        return self._position

    def on_resume(self, callback: Callable[["Subscription"], Any]) -> None:
        """Call ``callback(subscription)`` each time the broker forwards to it again after a gap.

        sub.on_resume(lambda s: log.info("{t} resumed after {n} gaps", t=s.topic, n=s.gaps))
        """
        self._resume_hooks.append(callback)

    def on_lost(self, callback: Callable[["Subscription", str], Any]) -> None:
        """Call ``callback(subscription, why)`` each time a reconnecting subscription loses the broker.

        Its connection dropped, or the broker shut down (a restart); messages
        published from then until the :meth:`on_resume` callbacks run may be missing.
        """
        self._lost_hooks.append(callback)

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

    def take(self, limit: Optional[int] = None) -> list[Message]:
        """Every message that has arrived and not been read (at most ``limit``), at once; maybe none.

        Never waits and never fails: after the end it returns what is left, then ``[]``.
        """
        pending = self._queue.pending
        if limit is None or limit >= len(pending):
            taken = pending[:]
            del pending[:]  # in place: the queue keeps this list
        else:
            taken = pending[:limit]
            del pending[:limit]
        if taken and self._held:
            self._release()
        return taken

    def batches(self, limit: Optional[int] = None) -> AsyncIterator[list[Message]]:
        """Iterate over what has arrived, as lists of at most ``limit`` messages, in order; ends when closed.

            async for msgs in sub.batches():
                for msg in msgs:
                    handle(msg)

        One wake-up per delivery the broker sent (up to 256 messages)
        instead of one per message: the cheapest way to read a busy topic.
        """
        if limit is not None and limit < 1:
            raise ValueError("limit must be at least 1")
        return self._batches(limit)

    async def _batches(self, limit: Optional[int]) -> AsyncIterator[list[Message]]:
        while True:
            msgs = self.take(limit)
            if not msgs:
                try:
                    first = await self.get()
                except SubscriptionClosed:
                    return
                msgs = [first]
                if limit != 1:
                    msgs += self.take(None if limit is None else limit - 1)
            yield msgs

    def __aiter__(self) -> "Subscription":
        return self

    async def __anext__(self) -> Message:
        pending = self._queue.pending
        if pending:  # no Deferred for a message that is already here
            msg = pending.pop(0)
            if self._held:
                self._release()
            return msg
        try:
            return await self.get()
        except SubscriptionClosed:
            raise StopAsyncIteration from None

    # -- the owner's side: Broker, BrokerClient and the fan-out call these, applications do not
    # (public names because other modules of the package call them, not for application code).
    # Each change another class makes to a subscription goes through one of them.

    def _attach(self, provider: Provider, reconnect: Reconnect) -> None:
        """``provider`` receives for this subscription: count its reconnects as gaps, end with it."""
        self._provider = provider
        if reconnect:
            provider.on_reconnect(lambda _: self.count_gap())  # first: later hooks see the count
            provider.on_disconnect(self._lost)
        provider.when_lost().addCallback(lambda _: self.mark_closed("connection to the server lost"))

    def started(self, recovered: bool, start: Optional[Position]) -> None:
        """The broker (re)started the stream after ``start``, complete or not (``recovered``).

        ``start`` never moves the position back: replayed messages may
        arrive before the broker's answer that tells it.
        """
        self.recovered = recovered
        if start is not None and self._resumable():
            position = self._position
            if position is None or position.epoch != start.epoch or position.seq < start.seq:
                self._position = start

    def _resumable(self) -> bool:
        """A plain topic without a group: one stream of positions, all of them ours."""
        return self._accepts is None and self.group is None

    def _note_position(self, batch: list[Message]) -> None:
        """Remember the position of the last message of our topic in a delivery."""
        topic = self.topic
        for msg in reversed(batch):
            if msg.topic == topic:
                position = msg.position
                if position is not None and self.group is None:
                    self._position = position
                return

    def count_gap(self) -> None:
        """Messages published from now until :meth:`resumed` may be missing."""
        self._gaps += 1

    def _lost(self, why: str) -> None:
        """The broker is out of reach for now (reconnect=True): tell the on_lost callbacks."""
        for hook in list(self._lost_hooks):
            try:
                hook(self, why)
            except Exception:
                log.failure("on_lost callback failed")

    def set_dropped(self, count: int) -> None:
        """The broker's count of messages dropped for us, told in process (no notice needed)."""
        self._dropped = count

    def on_closed_by_broker(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` when the broker's closing notice arrives (a remote broker)."""
        self._on_remote_close = callback

    def resumed(self, kept: bool = True) -> None:
        """The broker forwards to us again after a gap: tell the on_resume callbacks.

        ``kept``: the broker had kept the subscription (and its backlog) through
        the gap; False when a broker took it as new (it had restarted).
        """
        self.kept = kept
        log.info("subscription to {topic!r} resumed", topic=self.topic)
        for hook in list(self._resume_hooks):
            try:
                hook(self)
            except Exception:
                log.failure("on_resume callback failed")

    def mark_closed(self, reason: str) -> None:
        """End the stream; already received messages stay readable."""
        if self._closed is not None:
            return
        self.closed_reason = reason
        self._closed = SubscriptionClosed(f"subscription to {self.topic!r} closed: {reason}")
        held, self._held = self._held, deque()
        for _, answer in held:
            answer.callback(OK)  # the connection is going; nobody waits for these
        waiting = list(self._queue.waiting)
        del self._queue.waiting[:]  # in place: _deliver may be walking this list
        for d in waiting:
            d.errback(self._closed)

    def end(self, reason: str) -> "Deferred[None]":
        """End the stream and close its Provider; fires once the connection is gone."""
        self.mark_closed(reason)
        # At once: what it holds stays readable here; what the broker still sends it is its to count.
        return self._provider.close(timeout=0) if self._provider is not None else succeed(None)

    @property
    def provider(self) -> Optional[Provider]:
        """The connection its messages arrive on (a :class:`~pulsyflux.client.Provider`), once attached."""
        return self._provider

    def connections(self) -> list[Provider]:
        """Its open-or-reconnecting connection, if any (what a token refresh or a test's reset reaches)."""
        return [self._provider] if self._provider is not None else []

    def provider_connected(self) -> bool:
        """Our Provider's line is up (a reconnecting one may be down for a while)."""
        return self._provider is not None and self._provider.connected

    def when_provider_connected(self) -> "Deferred[Any]":
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
        matched = self._matched
        count = 0
        foreign = 0
        notices: Optional[list[tuple[int, Message]]] = None
        for msg in batch:
            if msg.topic == topic or msg.topic in matched:
                pending.append(msg)
                count += 1
            elif is_control(msg.topic):  # before the pattern: ">" would match "$pulsyflux/dropped"
                if notices is None:
                    notices = []
                notices.append((count, msg))  # with how many of ours came before it
            elif accepts is not None and accepts(msg.topic):
                if len(matched) >= _MATCHED_TOPICS:
                    matched.clear()  # many topics: start over rather than grow
                matched.add(msg.topic)
                pending.append(msg)
                count += 1
            else:
                foreign += 1  # never sent by the broker: forged, by someone who knows the channel
        closing: Optional[Message] = None
        reply = OK
        if foreign or notices is not None:
            self._rejected += foreign
            for before, msg in notices or ():
                if foreign or (msg.topic == messages.DROPPED and before == count):
                    self._rejected += 1  # not where the broker puts it
                elif msg.topic == messages.CLOSED:
                    closing = msg  # after the wake-up: the messages before it stay readable
                elif msg.topic == messages.PROBE:
                    reply = OK_BINARY  # forward to us in the binary encoding too (docs/protocol.md)
                else:
                    self._control(msg)
        self._received += count
        if count:
            self._note_position(batch)
        # Queue the whole batch before waking a reader: its loop then reads
        # the rest without suspending once per message.
        waiting = queue.waiting
        while waiting and pending:
            waiting.pop(0).callback(pending.pop(0))
        if closing is not None:
            self._control(closing)
            if self._closed is not None:
                return OK
        if not count or (not self._held and len(pending) <= self.buffer):
            return reply  # a notice alone (a probe after a gap) is never held behind a full buffer
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
            # Whoever sent it chose the text: it is kept, raised and logged, so one bounded line.
            self._on_remote_close(printable(msg.headers.get("reason", "closed by the broker"), CLOSED_REASON_CHARS))
        elif msg.topic == messages.START:
            try:
                self.started(self.recovered, Position.parse(msg.headers.get("position", "")))
            except ValueError:
                self._rejected += 1
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
            answer.callback(OK)


async def open_subscription(
    address: Address,
    topic: str,
    buffer: int,
    reactor: IReactorTime,
    reconnect: Reconnect = False,
    group: Optional[str] = None,
    token: Optional[str] = None,
) -> tuple[Subscription, Provider]:
    channel = uuid.uuid4()
    sub = Subscription(topic, channel, buffer, group)
    provider = await Provider.connect(
        address,
        channel,
        handler=sub._deliver,
        reactor=reactor,
        reconnect=reconnect,
        token=token,
        max_incomplete=MESSAGES_INCOMPLETE,  # forwards: payloads of up to 64 MiB, in base64
    )
    sub._attach(provider, reconnect)
    return sub, provider
