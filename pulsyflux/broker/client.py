"""Publish and subscribe through a broker running in another process."""

from __future__ import annotations

import uuid
from typing import Any, Callable, Optional, cast

from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..client import ChannelId, Consumer, Provider, Reconnect
from ..client.connection import Client
from ..client.provider import DEFAULT_CLOSE_TIMEOUT, check_close_timeout
from ..endpoints import Address
from ..wire import messages
from ..wire.errors import ConnectionLostError, NoProviderError, PulsyfluxError, RemoteError, RequestTimeout
from ..wire.messages import Position
from .link import (
    DEFAULT_BROKER_CHANNEL,
    EMPTY_BATCH,
    GO_ARRAY_ERROR,
    RECOVERED,
    RESUMED,
    PublishingSide,
    ignore,
    present_token,
    reads_binary,
    send_until_registered,
)
from .publisher import Publisher
from .subscription import DEFAULT_BUFFER, Subscription

__all__ = ["BrokerClient", "DEFAULT_CLOSE_TIMEOUT", "DEFAULT_HEARTBEAT"]

log = Logger()


# A BrokerClient re-announces its subscriptions this often (seconds), so a
# broker that died while the server runs is noticed, and a restarted one
# learns them again; the broker is gone after this many missed beats in a row.
DEFAULT_HEARTBEAT = 5.0
_HEARTBEAT_MISSES = 2
_NEVER = float("inf")


def _announcement(sub: Subscription, first: bool = False) -> bytes:
    """The ``$pulsyflux/subscribe`` for ``sub``: its first, every re-announce, and every heartbeat.

    The ``group`` header only for a queue group: a plain one is byte for
    byte what Go providers send. The first asks for what the application
    asked (``since`` / ``last``); later ones resume from the subscription's
    position once it has one. A broker without history ignores both.
    """
    headers = {"topic": sub.topic, "channel": str(sub.channel)}
    if sub.group is not None:
        headers["group"] = sub.group
    if first and sub._since is not None:
        headers["since"] = str(sub._since)
    elif first and sub._last is not None:
        headers["last"] = str(sub._last)
    elif sub._position is not None:
        headers["since"] = str(sub._position)
    return messages.control(messages.SUBSCRIBE, **headers).encode("utf-8")


def _subscribe_answer(answer: bytes) -> Optional[tuple[bool, Optional[Position]]]:
    """What a subscribe announcement's answer says: None for "resumed" (the broker kept it),
    else (recovered, start) for a subscription the broker set up afresh."""
    word, _, rest = answer.partition(b" ")
    if word == RESUMED:
        return None
    start = None
    if rest:
        try:
            start = Position.parse(rest.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            start = None
    return word == RECOVERED and start is not None, start


class BrokerClient(PublishingSide):
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

    :meth:`close` drains: it waits (``timeout``, default 5 s) for the broker
    to confirm what was published before it, and fails what it could not
    confirm with :class:`~pulsyflux.broker.publisher.PublishUnconfirmed`.
    """

    resubscribe_patience = 30.0

    def __init__(
        self,
        address: Address,
        broker_channel_id: ChannelId = DEFAULT_BROKER_CHANNEL,
        reactor: Optional[IReactorTime] = None,
        buffer: int = DEFAULT_BUFFER,
        reconnect: Reconnect = False,
        heartbeat: Optional[float] = DEFAULT_HEARTBEAT,
        token: Optional[str] = None,
    ) -> None:
        if heartbeat is not None and heartbeat < 0:
            raise ValueError("heartbeat must be >= 0 (0 or None: no heartbeat)")
        super().__init__(address, broker_channel_id, reactor, buffer, reconnect, token)
        self.heartbeat = heartbeat or None
        self._beat: Optional[IDelayedCall] = None  # the next heartbeat, while one is due
        self._beating = False
        self._misses = 0  # heartbeats in a row the broker did not answer
        self._consumer: Optional[Consumer] = None
        self._subscriptions: dict[uuid.UUID, Subscription] = {}
        self._resubscribing: set[uuid.UUID] = set()
        self._pauses: set[Deferred[None]] = set()  # resubscribe retries waiting; cancelled by close()
        self.go_broker = False  # the broker is the Go original: publishing only (see _start)
        self._closing: Optional[Deferred[None]] = None  # close() running or done
        self._draining: Optional[tuple[IDelayedCall, Callable[[], None]]] = None  # while close() waits: (timer, stop)
        self._deadline = _NEVER  # when close() stops waiting for the broker
        self._why = ""  # why close() stopped waiting (in PublishUnconfirmed's text)

    async def _start(self) -> "BrokerClient":
        self._consumer = await Consumer.connect(
            self.address, self.channel, reactor=self.reactor, reconnect=self.reconnect, token=self.token
        )
        self._publisher = Publisher(self._consumer)
        try:
            answer = await send_until_registered(self._consumer, EMPTY_BATCH, self.reactor)
        except RemoteError as error:
            if GO_ARRAY_ERROR not in str(error):
                await self._consumer.close()
                raise
            # The Go broker (broker.NewBroker): it reads one message per request and nothing else.
            self.go_broker = True
            self._publisher.use_go_broker()
        except NoProviderError:
            await self._consumer.close()
            raise NoProviderError(f"no broker on channel {self.channel} at {self.address}") from None
        except BaseException:
            await self._consumer.close()
            raise
        else:
            if reads_binary(answer):
                self._publisher.use_binary()
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

    def _refusal(self) -> Optional[Exception]:
        """Not connected, closed, or a Go broker, which has no remote subscriptions."""
        if self._closed is not None or self._consumer is None:
            return self._closed or ConnectionLostError("not connected")
        if self.go_broker:
            return PulsyfluxError(
                f"cannot subscribe: the broker on channel {self.channel} is a Go broker (broker.NewBroker), "
                "which takes publishes but has no subscriptions from other processes"
            )
        return None

    async def _set_up(
        self, sub: Subscription, provider: Provider, since: Optional[Position], last: Optional[int]
    ) -> None:
        """Announce ``sub`` to the broker through the control messages."""
        consumer = self._consumer
        assert consumer is not None  # _refusal() said so
        sub._since, sub._last = since, last
        if self.reconnect:
            provider.on_reconnect(lambda _: self._resubscribe(sub))

        def ended_by_broker(reason: str) -> None:
            sub.mark_closed(reason)
            self._forget(sub)
            self.reactor.callLater(0, provider.close)

        sub.on_closed_by_broker(ended_by_broker)
        provider.when_lost().addCallback(lambda _: self._forget(sub))
        answer = await consumer.send(_announcement(sub, first=True), timeout=10.0)
        if self._closed is not None:  # close() began meanwhile and did not see this one: end it here
            await self._unsubscribe(sub, "the client closed", patience=0)
            raise self._closed
        started = _subscribe_answer(answer)
        if started is not None:
            asked = since is not None or last is not None
            sub.started(started[0] or not asked, started[1])
        self._subscriptions[sub.channel] = sub
        self._schedule_heartbeat()

    def refresh(self, token: str) -> "Deferred[Any]":
        """Present a new token on every connection of this client (publishing and each subscription's).

        Fires once the server accepted it on all of them; fails with
        PermissionDenied if it refused it. Subscriptions the new token no
        longer covers are ended by the broker (``permission denied: ...``).
        """

        def accepted() -> None:
            self.token = token  # what new subscriptions present

        return present_token(self.connections(), token, accepted)

    @property
    def next_heartbeat(self) -> Optional[float]:
        """When the next heartbeat goes out (the clock's time); None while none is due (no timer)."""
        return self._beat.getTime() if self._beat is not None else None

    @property
    def consumer(self) -> Optional[Consumer]:
        """Its publishing (and control) connection, once connected."""
        return self._consumer

    def connections(self) -> list[Client]:
        """Every connection it holds: the publishing Consumer, then each subscription's Provider."""
        found: list[Client] = [self._consumer] if self._consumer is not None else []
        for sub in self._subscriptions.values():
            found += sub.connections()
        return found

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

        def done(_: object) -> None:
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
        subs = [s for s in self._subscriptions.values() if self._steady(s) and s.provider_connected()]
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
                started = _subscribe_answer(result)
                if started is not None and self._steady(sub):
                    # A broker that had forgotten it (restarted) took it as new: messages may be missing
                    # (unless it replayed them from the position we sent: then recovered).
                    log.warn("the broker on channel {c} had lost the subscription to {t!r}; subscribed again",
                             c=self.channel, t=sub.topic)  # fmt: skip
                    sub.count_gap()
                    sub.started(*started)
                    sub.resumed(kept=False)
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
                sub.count_gap()
                self._resubscribe(sub)
            else:
                log.warn("subscription to {t!r} ended: {r} ({e})", t=sub.topic, r=reason, e=error)
                self._forget(sub)
                sub.end(reason).addErrback(ignore)

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
        deadline = None
        delay = 0.05
        error: Exception = ConnectionLostError("not connected")
        while not sub.closed and self._closed is None and sub.channel in self._subscriptions:
            if not (sub.provider_connected() and self._consumer.connected):
                deadline = None  # patience counts while both lines are up
                try:
                    await sub.when_provider_connected()
                    await self._consumer.when_connected()
                except ConnectionLostError:
                    return  # closed for good
                continue
            if deadline is None:
                deadline = self.reactor.seconds() + self.resubscribe_patience
            try:
                # From the position now (read each time): what arrived before the line dropped stays.
                body = _announcement(sub)
                answer = await self._consumer.send(body, timeout=min(10.0, self.resubscribe_patience))
            except NoProviderError:
                error = NoProviderError(f"no broker on channel {self.channel}")
            except PulsyfluxError as failure:  # the broker could not reach our Provider yet, ...
                error = failure
                log.debug("resubscribe to {t!r} not accepted yet: {e}", t=sub.topic, e=failure)
            else:
                started = _subscribe_answer(answer)
                if started is not None:
                    sub.started(*started)  # set up afresh: resumed from our position, or not (recovered)
                if not sub.closed:
                    sub.resumed(kept=answer == RESUMED)
                return
            if self.reactor.seconds() >= deadline:
                reason = f"resubscribe failed: {error}"
                log.warn("subscription to {t!r} ended: {r}", t=sub.topic, r=reason)
                self._forget(sub)
                await sub.end(reason)
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

    async def _unsubscribe(self, sub: Subscription, reason: str, patience: float = 2.0, drain: bool = False) -> None:
        """Tell the broker (waiting ``patience`` seconds at most for its answer; 0: not at all), then close.

        With ``drain`` (close()), a plain subscription still takes what the broker
        forwards until it answers: those were sent before it stopped, and stay
        readable. A queue group member refuses them at once, so that the group's
        other members get them.
        """
        self._forget(sub)
        if not (drain and patience > 0 and sub.group is None):
            sub.mark_closed(reason)
        if self._consumer is not None and self._consumer.connected:
            body = messages.control(messages.UNSUBSCRIBE, topic=sub.topic, channel=str(sub.channel)).encode("utf-8")
            # Waited for: what is left of the patience; not waited for (0): it still times out, in 1 s.
            answer = self._consumer.send(body, timeout=patience if patience > 0 else 1.0)
            if patience > 0:
                try:
                    await answer
                except (PulsyfluxError, CancelledError) as error:
                    log.debug("unsubscribe not confirmed by the broker: {e}", e=error)
            else:
                answer.addErrback(ignore)  # sent before the line closes; the answer is not awaited
        await sub.end(reason)  # closed above: this closes its Provider

    @property
    def unconfirmed(self) -> int:
        """Publishes :meth:`close` failed with PublishUnconfirmed: not sent, or not answered, in its time."""
        return self._publisher.unconfirmed if self._publisher is not None else 0

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> "Deferred[None]":
        """Drain, then close: take no new publish or subscribe, wait up to ``timeout`` seconds for
        the broker to confirm every publish made so far, then end every subscription and connection.

        Publishes still unconfirmed at the deadline fail with
        :class:`~pulsyflux.broker.publisher.PublishUnconfirmed` (``sent`` says
        whether they left) and one warning is logged; :attr:`unconfirmed`
        counts them. ``timeout=0`` closes at once, draining nothing. A second
        call waits for the first close (a shorter ``timeout`` cuts its wait for
        publishes short). Messages a subscription had received stay readable;
        those the broker still held for it are counted lost there (a queue
        group's go to its other members): docs/broker.md, "Closing a BrokerClient".
        """
        check_close_timeout(timeout)
        d: Deferred[None] = Deferred()
        if self._closing is None:
            self._closing = Deferred.fromCoroutine(self._close(float(timeout)))
            self._closing.addErrback(lambda failure: log.failure("closing the broker client failed", failure))
        else:
            self._hurry(float(timeout))

        def closed(result: object) -> object:
            d.callback(None)
            return result

        self._closing.addBoth(closed)
        return d

    async def _close(self, timeout: float) -> None:
        self._closed = ConnectionLostError(
            "the broker client is closed (close() was called): no new publish or subscribe"
        )
        self._stop_heartbeat()
        for pause in list(self._pauses):
            pause.cancel()
        publisher = self._publisher
        self._deadline = self.reactor.seconds() + timeout
        self._why = f"close timeout of {timeout:g} s passed" if timeout else "close(timeout=0): no drain"
        if publisher is not None:
            publisher.stop(self._closed)
            if publisher.busy and timeout > 0:
                await self._wait_for(publisher, timeout)
            if publisher.busy:
                publisher.give_up(self._why)
        # What is left of the timeout, for the broker to confirm the unsubscribes (they are sent anyway).
        patience = min(2.0, max(self._deadline - self.reactor.seconds(), 0.0))
        subs = list(self._subscriptions.values())
        await DeferredList(
            [Deferred.fromCoroutine(self._unsubscribe(s, "the client closed", patience, drain=True)) for s in subs]
        )
        if publisher is not None:
            await publisher.close(self._closed)
            if publisher.unconfirmed:
                log.warn("broker client closed ({why}) with {n} publishes the broker had not confirmed: "
                         "each failed with PublishUnconfirmed", why=self._why, n=publisher.unconfirmed)  # fmt: skip
        elif self._consumer is not None:
            await self._consumer.close()

    async def _wait_for(self, publisher: Publisher, timeout: float) -> None:
        """Wait until ``publisher`` is idle, or ``timeout`` seconds (or less: :meth:`_hurry`)."""
        done: Deferred[None] = Deferred()

        def finish(_: object = None) -> None:
            if not done.called:
                done.callback(None)

        publisher.when_idle().addCallback(finish)
        timer = self.reactor.callLater(timeout, finish)
        self._draining = (timer, finish)
        try:
            await done
        finally:
            if timer.active():
                timer.cancel()
            self._draining = None

    def _hurry(self, timeout: float) -> None:
        """A later close(): end a running drain sooner if its ``timeout`` says so (0: now)."""
        if self._draining is None:
            return
        timer, finish = self._draining
        if not timer.active():
            return
        deadline = self.reactor.seconds() + timeout
        if deadline < self._deadline:
            self._deadline = deadline
            if timeout == 0:
                self._why = "close(timeout=0) cut the drain short"
                finish()
            else:
                self._why = f"close timeout of {timeout:g} s passed"
                timer.reset(timeout)
