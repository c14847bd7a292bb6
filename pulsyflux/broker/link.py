"""What the broker's pieces share about talking through a server.

The broker channel everyone assumes, the answers (``ok``, ``resumed``) and
the probe that the fan-out and the subscribers agree on, how to send to
a Provider that may not be registered yet, and what a :class:`Broker` and
a :class:`BrokerClient` share as publishers (:class:`PublishingSide`).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, TypeVar, Union

from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from .._reactor import default_reactor
from ..client import ChannelId, Consumer, Reconnect, channel_bytes
from ..client.connection import Client
from ..endpoints import Address
from ..wire import messages
from ..wire.errors import ConnectionLostError, NoProviderError
from ..wire.messages import Message, Position, check_topic, is_pattern
from .publisher import Publisher

if TYPE_CHECKING:  # subscription.py imports this module
    from ..client import Provider
    from .subscription import Subscription

__all__ = [
    "BROKER_CLOSED",
    "DEFAULT_BROKER_CHANNEL",
    "OK",
    "OK_BINARY",
    "EMPTY_BATCH",
    "reads_binary",
    "RESUMED",
    "PROBE",
    "PublishingSide",
    "channel_uuid",
    "ignore",
    "send_until_registered",
    "present_token",
]


# uuid5(NAMESPACE_DNS, "broker.pulsyflux"): the channel everyone assumes.
DEFAULT_BROKER_CHANNEL = uuid.UUID("4cf5ad4a-c843-56c7-921e-35cba21980e2")
OK = b"ok"
# Our publishers' first request, an empty batch: the Go broker refuses it (see GO_ARRAY_ERROR), a
# pulsyflux broker answers "ok" followed by the encodings it reads besides JSON (docs/protocol.md).
EMPTY_BATCH = b"[]"
OK_BINARY = OK + b" " + messages.BINARY.encode("ascii")
# The reason a broker gives its subscribers when it shuts down (a restart, most
# often): a reconnecting BrokerClient waits for a broker to take them back.
BROKER_CLOSED = "the broker closed"
RESUMED = b"resumed"  # the answer to a re-announce of a subscription the broker still has
# With history, a new subscription that asked for a replay (since / last) is
# answered "recovered START" (the replay is complete) or "ok START" (it is
# not); START is the position right before the first message it gets.
RECOVERED = b"recovered"
# What the Go broker answers to a JSON array (our first request): it takes
# one plain message per request and has no remote subscriptions.
GO_ARRAY_ERROR = "cannot unmarshal array into Go value of type broker.Message"
PROBE = messages.control(messages.PROBE).encode("utf-8")


def present_token(connections: Iterable[Client], token: str, accepted: Callable[[], None]) -> "Deferred[None]":
    """Present ``token`` on each connection; ``accepted()`` once the server took it on all.

    Fails with the first refusal (PermissionDenied): the connections keep the
    token they had. What a Broker's and a BrokerClient's ``refresh`` share.
    """
    waits = [connection.refresh(token) for connection in connections]

    def done(_: object) -> None:
        accepted()

    return DeferredList(waits, fireOnOneErrback=True, consumeErrors=True).addCallbacks(
        done, lambda failure: failure.value.subFailure
    )


def channel_uuid(channel: ChannelId) -> uuid.UUID:
    return uuid.UUID(bytes=channel_bytes(channel))


def ignore(failure: Failure) -> None:
    return None


async def send_until_registered(
    consumer: Consumer, body: bytes, reactor: IReactorTime, timeout: float = 5.0, patience: float = 1.0
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


def reads_binary(answer: bytes) -> bool:
    """Whether a broker's answer to :data:`EMPTY_BATCH` says it reads the binary encoding
    (an older pulsyflux broker answers ``ok``, a Go broker an error)."""
    word, _, rest = answer.partition(b" ")
    return word == OK and messages.BINARY.encode("ascii") in rest.split(b",")


_Side = TypeVar("_Side", bound="PublishingSide")
_CHECKED_TOPICS = 1024  # topics a publisher remembers as passing the rule (then it starts over)


class PublishingSide:
    """What :class:`~pulsyflux.broker.Broker` and :class:`~pulsyflux.broker.BrokerClient` share.

    The server address and broker channel, the options every connection of
    theirs takes, :meth:`connect` and :meth:`publish` (through a
    :class:`~pulsyflux.broker.publisher.Publisher` that ``_start`` sets up):
    one owner, so the two cannot drift apart.
    """

    # What publish() fails with before the publishing connection is up.
    not_connected = "not connected"

    def __init__(
        self,
        address: Address,
        broker_channel_id: ChannelId,
        reactor: Optional[IReactorTime],
        buffer: int,
        reconnect: Reconnect,
        token: Optional[str],
    ) -> None:
        self.address = address
        self.channel = channel_uuid(broker_channel_id)
        self.reactor: IReactorTime = default_reactor(reactor)
        self.buffer = buffer
        self.reconnect = reconnect
        self.token = token  # presented by each of its connections (a server that checks tokens)
        self._publisher: Optional[Publisher] = None
        self._closed: Optional[Exception] = None
        # Topics published to lately that passed the topic rule: a set lookup per publish instead of the rule.
        self._checked_topics: set[str] = set()

    @classmethod
    def connect(
        cls: type[_Side],
        address: Address,
        broker_channel_id: ChannelId = DEFAULT_BROKER_CHANNEL,
        reactor: Optional[IReactorTime] = None,
        **options: Any,
    ) -> "Deferred[_Side]":
        """A new one, connected: fires once it works (``options`` as for the class)."""
        side = cls(address, broker_channel_id, reactor, **options)
        return Deferred.fromCoroutine(side._start())

    async def _start(self: _Side) -> _Side:
        raise NotImplementedError

    def subscribe(
        self,
        topic: str,
        buffer: Optional[int] = None,
        group: Optional[str] = None,
        since: Union[None, str, Position] = None,
        last: Optional[int] = None,
    ) -> "Deferred[Subscription]":
        """A new :class:`Subscription` to ``topic`` (2 more connections).

        ``topic`` may be a pattern: ``orders.*`` (one token), ``orders.>``
        (one or more). With ``group``, each message goes to one member of
        that queue group (per pattern), round-robin (docs/broker.md).

        With history (a plain topic, no group): ``since`` (a :class:`Position`
        or ``"EPOCH:SEQ"``) starts with the retained messages after it,
        ``last`` with the last ``last`` retained; then the live ones, with no
        gap and no duplicate between them. ``Subscription.recovered`` says
        whether the replay was complete.
        """
        from .subscription import check_subscription

        check_subscription(topic, group)
        since, last = replay_arguments(since, last, topic, group)
        refused = self._refusal()
        if refused is not None:
            return fail(refused)
        return Deferred.fromCoroutine(self._subscribe(topic, buffer or self.buffer, group, since, last))

    def _refusal(self) -> Optional[Exception]:
        """Why no subscription can start now (closed...), or None."""
        return self._closed

    async def _subscribe(
        self, topic: str, buffer: int, group: Optional[str], since: Optional[Position], last: Optional[int]
    ) -> Subscription:
        """A Provider on a fresh channel for the messages, then :meth:`_set_up` (closed again if that fails)."""
        from .subscription import open_subscription

        sub, provider = await open_subscription(
            self.address, topic, buffer, self.reactor, self.reconnect, group, self.token
        )
        try:
            await self._set_up(sub, provider, since, last)
        except BaseException:
            sub.mark_closed("subscribe failed")
            await provider.close(timeout=0)
            raise
        return sub

    async def _set_up(
        self, sub: Subscription, provider: Provider, since: Optional[Position], last: Optional[int]
    ) -> None:
        """Have the broker deliver ``topic``'s messages to ``sub`` (the fan-out here, or announced to one)."""
        raise NotImplementedError

    def publish(
        self, topic: str, payload: bytes = b"", headers: Optional[dict[str, str]] = None, timeout: float = 5.0
    ) -> "Deferred[Optional[Position]]":
        """Publish; fires once the broker accepted the message, with its :class:`Position`
        (None when the broker keeps no history, or is a Go broker).

        Fails with NoProviderError (no broker), RequestTimeout,
        ConnectionLostError or RemoteError; raises TypeError/ValueError at
        once for a bad topic, payload or headers.
        """
        self._check(topic)
        if self._publisher is None:
            return fail(self._closed or ConnectionLostError(self.not_connected))
        return self._publisher.publish(topic, payload, headers, timeout)

    def publish_many(self, msgs: Iterable[Message], timeout: float = 5.0) -> "Deferred[list[Optional[Position]]]":
        """Publish several :class:`Message` s, in order; one Deferred for them all.

        Fires with their positions (each None when the broker keeps no
        history) once the broker accepted every one; fails with the first
        error (as for :meth:`publish`; others of the same call may have been
        accepted). Raises TypeError/ValueError at once, publishing none, if
        any message is bad. Cheaper than a :meth:`publish` per message: one
        Deferred per call instead of one per message.
        """
        items = []
        for msg in msgs:
            if not isinstance(msg, Message):
                raise TypeError(f"publish_many takes Message objects, not {type(msg).__name__}")
            self._check(msg.topic)
            items.append((msg.topic, msg.payload, msg.headers or None))
        if self._publisher is None:
            return fail(self._closed or ConnectionLostError(self.not_connected))
        return self._publisher.publish_many(items, timeout)

    def _check(self, topic: str) -> None:
        """The topic rule, asked once per topic published to lately (a bounded set of those that passed)."""
        checked = self._checked_topics
        if type(topic) is not str or topic not in checked:
            check_topic(topic)
            if len(checked) >= _CHECKED_TOPICS:
                checked.clear()  # many topics: start over rather than grow
            checked.add(topic)


_MAX_LAST = 10**9


def replay_arguments(
    since: Union[None, str, Position], last: Optional[int], topic: str = "", group: Optional[str] = None
) -> tuple[Optional[Position], Optional[int]]:
    """``subscribe()``'s ``since`` (a Position or "EPOCH:SEQ") and ``last`` (N >= 0), checked; not both,
    and only for a plain topic without a group (positions count per topic)."""
    if since is None and last is None:
        return None, None
    if since is not None and last is not None:
        raise ValueError("give since or last, not both")
    if group is not None or is_pattern(topic):
        raise ValueError("since and last need a plain topic without a group (positions count per topic)")
    if isinstance(since, str):
        since = Position.parse(since)
    elif since is not None and not isinstance(since, Position):
        raise TypeError(f"since must be a Position or 'EPOCH:SEQ', not {type(since).__name__}")
    if last is not None and (type(last) is not int or not 0 <= last < _MAX_LAST):
        raise ValueError(f"last must be a whole number >= 0, not {last!r}")
    return since, last
