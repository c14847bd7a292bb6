"""Topic pub/sub made of ordinary Consumers and Providers (docs/protocol.md, Broker messages).

The broker owns a Provider and a publishing Consumer on the broker channel;
every subscription is a Provider on a fresh channel plus the broker's
forwarding Consumer on it: 2 + 2N persistent connections.

    broker = await Broker.connect("127.0.0.1:9090")
    sub = await broker.subscribe("orders")
    await broker.publish("orders", b"new order", {"priority": "high"})
    msg = await sub.get()

Other processes use :class:`~pulsyflux.broker.client.BrokerClient` with the same calls. Delivery,
flow control and the control messages are described in docs/broker.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Union

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..client import ChannelId, Consumer, Provider, Reconnect
from ..client.connection import Client
from ..endpoints import Address
from ..wire.errors import ConnectionLostError
from ..wire.messages import Position
from .fanout import (
    DEFAULT_BATCH,
    DEFAULT_MAX_SETUPS,
    DEFAULT_MAX_SETUPS_PER_CLIENT,
    DEFAULT_MAX_SUBSCRIPTIONS,
    DEFAULT_TOTAL_BACKLOG_BYTES,
    DEFAULT_WINDOW,
    Fanout,
)
from .history import DEFAULT_HISTORY_BYTES, DEFAULT_HISTORY_TOTAL_BYTES, History
from .link import (
    BROKER_CLOSED,
    DEFAULT_BROKER_CHANNEL,
    EMPTY_BATCH,
    PublishingSide,
    ignore,
    present_token,
    reads_binary,
    send_until_registered,
)
from .outlet import DEFAULT_BACKLOG, DEFAULT_BACKLOG_BYTES
from .publisher import Publisher
from .subscription import (
    DEFAULT_BUFFER,
    MESSAGES_INCOMPLETE,
    Subscription,
)

if TYPE_CHECKING:
    from ..cluster.pubsub import ClusterPubSub

__all__ = ["Broker", "DEFAULT_REJOIN_PATIENCE"]

log = Logger()


# After a reconnect, how long the broker waits for a subscriber to be back on
# its channel (its Provider retries with up to 5 s of backoff) before giving up on it.
DEFAULT_REJOIN_PATIENCE = 10.0


class Broker(PublishingSide):
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

    not_connected = "the broker is not connected"

    def __init__(
        self,
        address: Address,
        broker_channel_id: ChannelId = DEFAULT_BROKER_CHANNEL,
        reactor: Optional[IReactorTime] = None,
        buffer: int = DEFAULT_BUFFER,
        backlog: int = DEFAULT_BACKLOG,
        batch: int = DEFAULT_BATCH,
        window: int = DEFAULT_WINDOW,
        reconnect: Reconnect = False,
        rejoin_patience: float = DEFAULT_REJOIN_PATIENCE,
        backlog_bytes: int = DEFAULT_BACKLOG_BYTES,
        total_backlog_bytes: int = DEFAULT_TOTAL_BACKLOG_BYTES,
        max_subscriptions: int = DEFAULT_MAX_SUBSCRIPTIONS,
        max_setups: int = DEFAULT_MAX_SETUPS,
        max_setups_per_client: int = DEFAULT_MAX_SETUPS_PER_CLIENT,
        token: Optional[str] = None,
        history: Union[int, History] = 0,
        history_bytes: int = DEFAULT_HISTORY_BYTES,
        history_total_bytes: int = DEFAULT_HISTORY_TOTAL_BYTES,
    ) -> None:
        self.history: Optional[History]
        if isinstance(history, History):
            self.history = history  # kept across brokers by a BrokerService: the epochs stay
        elif type(history) is int and history >= 0:
            self.history = History(history, history_bytes, history_total_bytes) if history else None
        else:
            raise ValueError(f"history must be a whole number >= 0 (0: off) or a History, not {history!r}")
        if backlog < 0 or batch < 1 or window < 1:
            raise ValueError("backlog must be >= 0, batch and window >= 1")
        if backlog_bytes < 0 or total_backlog_bytes < 0 or max_subscriptions < 0:
            raise ValueError("backlog_bytes, total_backlog_bytes and max_subscriptions must be >= 0")
        if max_setups < 1 or max_setups_per_client < 1:
            raise ValueError("max_setups and max_setups_per_client must be >= 1")
        super().__init__(address, broker_channel_id, reactor, buffer, reconnect, token)
        self._fanout = Fanout(
            address,
            self.reactor,
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
            token=token,
            history=self.history,
        )
        self._provider: Optional[Provider] = None
        self._closing: Optional[Deferred[None]] = None
        self._closed_waiters: list[Deferred[None]] = []
        self.lost_link = False  # closed because a connection to the server dropped, not by close()

    @property
    def fanout(self) -> Fanout:
        """Its fan-out: topics, subscriber outlets and their state (to inspect; the broker drives it)."""
        return self._fanout

    @property
    def closed(self) -> bool:
        """True once the broker was closed or lost its connection for good."""
        return self._closed is not None

    async def _start(self) -> "Broker":
        # Made before it connects, so the fanout can ask whose announcement it handles from the first one.
        # It receives publishes: payloads of up to 64 MiB, in base64 (messages.wire_limit).
        provider = Provider(self.channel, self.reactor, handler=self._fanout.handle, max_incomplete=MESSAGES_INCOMPLETE)
        self._fanout.provider = provider
        self._provider = await provider.open(self.address, self.reconnect, self.token)
        try:
            consumer = await Consumer.connect(
                self.address, self.channel, reactor=self.reactor, reconnect=self.reconnect, token=self.token
            )
        except BaseException:
            await self._provider.close(timeout=0)
            raise
        self._publisher = Publisher(consumer)
        try:
            answer = await send_until_registered(consumer, EMPTY_BATCH, self.reactor)  # our Provider is in place
        except BaseException:
            await self.close()
            raise
        if reads_binary(answer):
            self._publisher.use_binary()
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

    def join_cluster(self, cluster: ClusterPubSub) -> None:
        """Share pub/sub with the other servers of a cluster (:class:`~pulsyflux.cluster.pubsub.ClusterPubSub`)."""
        self._fanout.cluster = cluster
        cluster.attach(self._fanout)
        self.when_closed().addCallback(lambda _: cluster.detach(self._fanout))

    async def _set_up(
        self, sub: Subscription, provider: Provider, since: Optional[Position], last: Optional[int]
    ) -> None:
        outlet = await self._fanout.setup(sub.topic, sub.channel, sub, group=sub.group, since=since, last=last)
        sub.started(outlet.recovered, outlet.start)
        provider.when_lost().addCallback(lambda _: self._fanout.remove(outlet, "connection to the server lost"))

    def refresh(self, token: str) -> "Deferred[Any]":
        """Present a new token on every connection of this broker before the old one expires.

        Its provider, its publishing consumer, each forwarding consumer and
        each local subscription's provider: a server that checks tokens
        ends a connection whose token expired. Fires once the server
        accepted it on all of them (and later connections present it);
        fails with PermissionDenied if it refused it (connections keep the
        token they had).
        """
        connections = self.connections()
        for outlet in self._fanout.outlets.values():
            if outlet.local is not None:
                connections += outlet.local.connections()

        def accepted() -> None:
            self.token = self._fanout.token = token  # what new subscriptions and outlets present

        return present_token(connections, token, accepted)

    def connections(self) -> list[Client]:
        """Every connection it holds itself: each forwarding Consumer (one per
        subscriber channel), the publishing Consumer, the Provider that takes publishes.

        Not its local subscriptions' (each :class:`Subscription` holds its own).
        """
        found: list[Client] = [outlet.consumer for outlet in self._fanout.outlets.values()]
        if self._publisher is not None:
            found.append(self._publisher.consumer)
        if self._provider is not None:
            found.append(self._provider)
        return found

    def unsubscribe(self, topic: str) -> "Deferred[Any]":
        """End every subscription of ``topic`` (here and remote); fires when their connections are closed."""
        return self._fanout.remove_topic(topic, "unsubscribed")

    def stop_publishing(self, error: Exception) -> None:
        """Take no new publish of its own: later ones fail at once with ``error``; those already
        waiting or in flight still go out and get their answers.

        What a stopping :class:`~pulsyflux.service.BrokerService` does first:
        an application that kept this broker from ``whenReady()`` starts no
        new work during the drain (the server refuses everyone else's).
        """
        if self._publisher is not None:
            self._publisher.stop(error)

    @property
    def idle(self) -> bool:
        """Nothing it accepted waits: no backlog, no forward and no publish of its own unanswered.

        What a server's shutdown waits for (within its grace period) before it closes the broker.
        """
        if self._publisher is not None and self._publisher.busy:
            return False
        return not any(outlet.backlog or outlet.requests for outlet in self._fanout.outlets.values())

    def close(self, error: Optional[Exception] = None) -> "Deferred[None]":
        """End every subscription and close every connection of the broker, at once.

        Its publishes not answered yet fail with ``error`` (by default
        ``ConnectionLostError("the broker is closed")``), as later ones do;
        what its subscribers' backlogs held is counted as ``lost``. A
        :class:`~pulsyflux.service.BrokerService` lets it drain first (its
        ``grace``), then closes it with ``the server is shutting down``.
        """
        if self._closing is None:
            self._closed = self._closed or error or ConnectionLostError("the broker is closed")
            self._fanout.closing = True
            if self._fanout.rights is not None:
                self._fanout.rights.stop()  # no longer told of token changes (a restarted broker has its own)
            waits = [self._fanout.remove_all(BROKER_CLOSED)]
            if self._publisher is not None:
                waits.append(self._publisher.close(self._closed))
            if self._provider is not None:
                waits.append(self._provider.close(timeout=0))  # at once: a server's shutdown drained it first
            self._closing = DeferredList(waits, consumeErrors=True).addCallback(self._all_closed)
        d: Deferred[None] = Deferred()

        def closed(result: object) -> object:
            d.callback(None)
            return result

        self._closing.addBoth(closed)
        return d

    def _all_closed(self, _: object) -> None:
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
            self.close().addErrback(ignore)
