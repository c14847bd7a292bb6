"""The server's link to Redis: two connections kept up, and an honest answer to "is it up?".

Up means both connections (commands, sharded subscriber) are open, logged
in, and answered a PING within ``ping_timeout``; a Redis that stops
answering (``kill -STOP``, a network that drops packets) is down after that
long even though TCP says nothing. While down, cross-server work fails at
once with :class:`ClusterDown` (local clients are served as ever) and the
link reconnects with backoff; once back, it subscribes to every channel
again before it says so (FIELD-NOTES: subscriptions lost silently after a
reconnect are the classic failure).
"""

from __future__ import annotations

import random
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..wire.errors import PulsyfluxError
from ..wire.ratelimit import shorten
from .redis import RedisAddress, RedisCommands, RedisSubscriber, login_commands

__all__ = ["ClusterDown", "RedisLink"]

log = Logger()


class ClusterDown(PulsyfluxError):
    """The link to the cluster's Redis is down: cross-server work cannot be done now."""


def _backoff(attempt: int) -> float:
    return min(2.0, 0.1 * 2 ** min(attempt, 10)) * (0.5 + random.random() / 2)


class RedisLink:
    """Commands and a sharded subscription to one Redis, reconnected as needed."""

    def __init__(
        self,
        address: RedisAddress,
        reactor: IReactorTime,
        on_message: Callable[[bytes, bytes], None],
        on_state: Optional[Callable[[bool], None]] = None,
        *,
        connect_timeout: float = 2.0,
        ping_interval: float = 1.0,
        ping_timeout: float = 3.0,
        after_read: Optional[Callable[[], None]] = None,
    ) -> None:
        self.address = address
        self.after_read = after_read  # called after each read of messages (their effects written once)
        self.reactor = reactor
        self.on_message = on_message
        self.on_state = on_state
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.channels: set[bytes] = set()
        self.commands: Optional[RedisCommands] = None
        self.subscriber: Optional[RedisSubscriber] = None
        self.up = False
        self.running = False
        self.rtt: Optional[float] = None  # seconds, the last PING's round trip
        self.reconnects = 0  # times the link came back after being up
        self.downs = 0
        self.last_error: Optional[str] = None
        self._was_up = False
        self._attempt = 0
        self._retry: Optional[IDelayedCall] = None
        self._pinger: Optional[LoopingCall] = None
        self._ping_due: Optional[IDelayedCall] = None
        self._connecting: Optional[Deferred[Any]] = None
        self._up_waiters: list[Deferred[None]] = []

    # -- what the cluster uses ------------------------------------------------

    def execute(self, *args: Any) -> Deferred[Any]:
        """Run one command, or fail at once with :class:`ClusterDown` while the link is down."""
        commands = self.commands
        if not self.up or commands is None:
            return fail(ClusterDown(f"the cluster link to {self.address} is down"))
        return commands.execute(*args)

    def send(self, *args: Any) -> bool:
        """Run one command whose reply nobody waits for; False while the link is down."""
        commands = self.commands
        if not self.up or commands is None:
            return False
        return commands.send(*args)

    def when_up(self) -> Deferred[None]:
        """Fires once the link is up (at once if it is)."""
        d: Deferred[None] = Deferred()
        if self.up:
            d.callback(None)
        else:
            self._up_waiters.append(d)
        return d

    def settled(self) -> Deferred[None]:
        """Fires once Redis has answered every (un)subscribe sent so far: they are in force."""
        subscriber = self.subscriber
        if not self.up or subscriber is None:
            return fail(ClusterDown(f"the cluster link to {self.address} is down"))
        return subscriber.ping()

    def subscribe(self, channel: bytes) -> None:
        self.channels.add(channel)
        if self.subscriber is not None and self.up:
            self.subscriber.subscribe(channel)

    def unsubscribe(self, channel: bytes) -> None:
        self.channels.discard(channel)
        if self.subscriber is not None and self.up:
            self.subscriber.unsubscribe(channel)

    # -- life -----------------------------------------------------------------

    def start(self) -> None:
        self.running = True
        self._connect()

    def stop(self) -> Deferred[None]:
        self.running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self._stop_pinging()
        if self._connecting is not None:
            self._connecting.cancel()
        waits = []
        for proto in (self.commands, self.subscriber):
            if proto is not None and proto.transport is not None:
                proto.transport.loseConnection()
                waits.append(proto.lost)
        self._set_up(False)
        return DeferredList(waits).addCallback(lambda _: None)

    def _endpoint(self) -> IStreamClientEndpoint:
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self.reactor, self.address.host, self.address.port, timeout=self.connect_timeout
        )
        if self.address.tls:
            from twisted.internet.ssl import optionsForClientTLS

            endpoint = wrapClientTLS(optionsForClientTLS(self.address.host), endpoint)
        return endpoint

    def _connect(self) -> None:
        if not self.running:
            return
        subscriber = RedisSubscriber(self.on_message)
        subscriber.after_read = self.after_read
        commands = RedisCommands(self.reactor)
        ends = [connectProtocol(self._endpoint(), commands), connectProtocol(self._endpoint(), subscriber)]
        d = DeferredList(ends, fireOnOneErrback=True, consumeErrors=True)

        sent: set[bytes] = set()  # the channels this connection was subscribed to before it was ours

        def opened(_: Any) -> Any:
            subscriber.login(self.address)
            sent.update(self.channels)
            for channel in sent:
                subscriber.subscribe(channel)
            logins = [commands.execute(*c) for c in login_commands(self.address)]
            return DeferredList(
                [*logins, commands.execute(b"PING"), subscriber.ping()], fireOnOneErrback=True, consumeErrors=True
            )

        def ready(_: Any) -> None:
            self._connecting = None
            self.commands, self.subscriber = commands, subscriber
            # (Un)subscribed while the logins and the first PING were on their way: not lost until a reconnect.
            for channel in self.channels - sent:
                subscriber.subscribe(channel)
            for channel in sent - self.channels:
                subscriber.unsubscribe(channel)
            self._attempt = 0
            for proto in (commands, subscriber):
                proto.lost.addCallback(lambda _: self._lost(commands, subscriber))
            self._set_up(True)
            self._start_pinging()

        def failed(failure: Failure) -> None:
            self._connecting = None
            for proto in (commands, subscriber):
                if proto.transport is not None:
                    proto.transport.abortConnection()  # type: ignore[attr-defined]
            error = failure.value
            if hasattr(error, "subFailure"):
                error = error.subFailure.value
            self.last_error = shorten(error) or type(error).__name__  # shown in /stats
            if self.running:
                self._attempt += 1
                delay = _backoff(self._attempt)
                log.debug("cluster: cannot reach Redis at {address}: {e}", address=str(self.address), e=self.last_error)
                self._retry = self.reactor.callLater(delay, self._connect)

        d.addCallback(opened)
        d.addTimeout(self.connect_timeout + self.ping_timeout, self.reactor)
        d.addCallbacks(ready, failed)
        self._connecting = d

    def _lost(self, commands: RedisCommands, subscriber: RedisSubscriber) -> None:
        if self.commands is not commands:
            return  # already handled: the other connection of the pair went first
        self.commands = self.subscriber = None
        for proto in (commands, subscriber):
            if proto.transport is not None and proto.connected:
                proto.transport.abortConnection()  # type: ignore[attr-defined]
        self._stop_pinging()
        self._set_up(False)
        if self.running:
            self._retry = self.reactor.callLater(_backoff(0), self._connect)

    def _set_up(self, up: bool) -> None:
        if up == self.up:
            return
        self.up = up
        if up:
            if self._was_up:
                self.reconnects += 1
                log.info("cluster: the link to Redis at {address} is back", address=str(self.address))
            else:
                log.info("cluster: linked to Redis at {address}", address=str(self.address))
            self._was_up = True
        else:
            self.downs += 1
            if self.running:
                log.warn("cluster: the link to Redis at {address} is down; reconnecting", address=str(self.address))
        if self.on_state is not None:
            self.on_state(up)
        if up:
            waiters, self._up_waiters = self._up_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    # -- liveness -------------------------------------------------------------

    def _start_pinging(self) -> None:
        self._pinger = LoopingCall(self._ping)
        self._pinger.clock = self.reactor
        self._pinger.start(self.ping_interval, now=False)

    def _stop_pinging(self) -> None:
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        self._pinger = None
        if self._ping_due is not None and self._ping_due.active():
            self._ping_due.cancel()
        self._ping_due = None

    def _ping(self) -> Deferred[None] | None:
        commands, subscriber = self.commands, self.subscriber
        if commands is None or subscriber is None or self._ping_due is not None:
            return None  # one probe at a time: an unanswered one is timing out
        sent = self.reactor.seconds()
        probes = DeferredList([commands.execute(b"PING"), subscriber.ping()], consumeErrors=True)

        def hung() -> None:
            self._ping_due = None
            self.last_error = f"Redis did not answer a PING within {self.ping_timeout:g} s"
            log.warn("cluster: {why}", why=self.last_error)
            self._lost(commands, subscriber)

        self._ping_due = self.reactor.callLater(self.ping_timeout, hung)

        def answered(_: Any) -> None:
            if self._ping_due is not None and self._ping_due.active():
                self._ping_due.cancel()
                self._ping_due = None
                self.rtt = self.reactor.seconds() - sent

        probes.addCallback(answered)
        return None

    def stats(self) -> dict[str, Any]:
        return {
            "redis": str(self.address),
            "up": self.up,
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
            "reconnects": self.reconnects,
            "downs": self.downs,
            "channels": len(self.channels),
            "last_error": self.last_error,
        }
