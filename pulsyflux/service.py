"""Twisted services: the server on an endpoint, the broker beside it, and ``twistd``.

service = BrokerService("tcp:9090:interface=127.0.0.1")
service.setServiceParent(application)
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from . import logs
from ._reactor import default_reactor
from .broker.broker import Broker
from .broker.history import DEFAULT_HISTORY_BYTES, DEFAULT_HISTORY_TOTAL_BYTES, History
from .broker.link import DEFAULT_BROKER_CHANNEL
from .broker.subscription import Subscription
from .client import DEFAULT_BACKOFF, ChannelId
from .endpoints import DEFAULT_PORT, check_server_description, describe_address, port_number
from .endpoints import client_address as client_address  # its old home: still importable from here
from .server.collector import tune_collector
from .server.inproc import InProcessEndpoint
from .server.listening import ListeningService
from .server.protocol import ServerFactory
from .server.router import (
    DEFAULT_FRAME_TIMEOUT,
    DEFAULT_GRACE,
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_PARTIAL_BYTES,
    DEFAULT_MAX_UNSENT,
    DEFAULT_MAX_UNSENT_TOTAL,
    DEFAULT_REGISTER_TIMEOUT,
)
from .wire.errors import MSG_SHUTTING_DOWN, ConnectionLostError, RequestTimeout
from .wire.messages import Position

if TYPE_CHECKING:
    from ._types import IReactor
    from .cluster.node import Cluster


__all__ = ["ServerService", "BrokerService", "Options", "makeService", "connect_own_broker"]


class ServerService(ListeningService):
    """Listens on an endpoint with a :class:`ServerFactory`.

    ``stopService`` is graceful and means "all gone": it stops accepting,
    refuses new requests, gives those in flight up to ``grace`` seconds to
    finish, then closes every connection (:meth:`ServerFactory.shutdown`).
    The grace period starts when it stops accepting (:meth:`stop_accepting`),
    once, whoever calls it first.
    """

    log = Logger()
    _what = "pulsyflux server"
    _exposes = "any host that reaches it can send requests, serve channels and publish"

    def __init__(
        self,
        listen: str | int = DEFAULT_PORT,
        reactor: Optional[IReactor] = None,
        factory: ServerFactory | None = None,
        grace: float = DEFAULT_GRACE,
    ) -> None:
        super().__init__(listen, reactor)
        self.factory = factory or ServerFactory(self.reactor)
        self.grace = grace
        self.deadline: Optional[float] = None  # when the grace period ends, once stopping (reactor seconds)

    def startService(self) -> "Deferred[Optional[IListeningPort]]":  # type: ignore[override]  # for tests to wait on
        super().startService()
        self.deadline = None
        # A failure is logged, and told to whoever waits in whenListening; not raised.
        return self._listen(self.factory).addErrback(lambda _: None)

    def _listening(self, port: IListeningPort) -> None:
        # Logged once the reactor runs: twistd starts services before it
        # installs its signal handlers, and this line tells a supervisor
        # (or a test) that the server is up and a SIGTERM stops it cleanly.
        address = describe_address(port.getHost())
        self.reactor.callWhenRunning(self.log.info, "pulsyflux server listening on {address}", address=address)

    def stop_accepting(self) -> "Deferred[None]":
        """Stop listening and refuse new requests (``server overloaded: shutting down``); the grace
        period starts now. Fires once the port is closed. What is in flight goes on."""
        if self.deadline is None:
            self.deadline = self.reactor.seconds() + self.grace
        self.factory.router.draining = True
        port, self.port = self.port, None
        stopped = maybeDeferred(port.stopListening) if port is not None else succeed(None)
        return stopped.addBoth(lambda _: None)

    def grace_left(self) -> float:
        """Seconds of the grace period left (all of it before :meth:`stop_accepting`)."""
        if self.deadline is None:
            return self.grace
        return max(self.deadline - self.reactor.seconds(), 0.0)

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        return self.stop_accepting().addCallback(lambda _: self.factory.shutdown(self.grace_left()))


# Why what a stopping BrokerService's broker could not finish failed (its publishes, a publish that waits for it).
SHUTTING_DOWN = "the server is shutting down"

# Subscription setups a BrokerService's broker runs at once (a Broker over TCP: 64).
INPROC_MAX_SETUPS = 256


def connect_own_broker(
    factory: ServerFactory, reactor: IReactorTime, channel: uuid.UUID = DEFAULT_BROKER_CHANNEL, **broker_options: Any
) -> "Deferred[Broker]":
    """The server's own broker: on its reserved ``channel``, linked in-process.

    One place for what BrokerService and pulsyflux.testing both run: the
    channel is reserved (a foreign provider there is refused), the link
    needs no socket, so it works whatever the endpoint, and its setups
    need no file descriptor, so more run at once (``max_setups``,
    :data:`INPROC_MAX_SETUPS` unless given).
    """
    factory.router.reserve(channel.bytes)
    broker_options.setdefault("max_setups", INPROC_MAX_SETUPS)
    endpoint = InProcessEndpoint(factory, reactor, label="broker")
    return Broker.connect(endpoint, channel, reactor=reactor, **broker_options)


class BrokerService(service.MultiService):
    """The server on an endpoint plus the broker connected to it.

        svc = BrokerService("tcp:9090:interface=127.0.0.1")
        svc.setServiceParent(application)   # or svc.startService()
        await svc.publish("orders", b"new order")

    Starts the server, then connects the broker to it in-process
    (:mod:`pulsyflux.server.inproc`: no socket, so it works whatever the endpoint,
    TLS included). ``stopService`` is orderly: the server stops accepting,
    what is in flight finishes and the broker forwards what it accepted,
    within ``grace`` seconds; then the broker closes (what is left fails
    or is counted lost, one warning), then the server and every connection;
    it fires once they are all gone (docs/broker.md, BrokerService).
    ``broker_channel=None`` runs the server alone. Other services (HTTP,
    ...) can be added as children.

    The server owns the broker channel: it is reserved, so a provider from
    outside registering there is refused (``channel reserved: ...``). Should
    the broker ever lose its link, a new one is started (after a short
    backoff if it keeps failing), and is logged once per outage.
    """

    # A broker that stayed up this long resets the restart backoff.
    _STEADY = 10.0

    log = Logger()

    def __init__(
        self,
        listen: str | int = DEFAULT_PORT,
        broker_channel: Optional[ChannelId] = DEFAULT_BROKER_CHANNEL,
        reactor: Optional[IReactor] = None,
        grace: float = DEFAULT_GRACE,
        factory: Optional[ServerFactory] = None,
        cluster: Optional[str] = None,
        node_name: Optional[str] = None,
        cluster_lease: float = 3.0,
        **broker_options: Any,
    ) -> None:
        """``cluster``: a ``redis://`` URL to share pub/sub with other servers through (docs/cluster.md)."""
        super().__init__()
        self.reactor: IReactor = default_reactor(reactor)
        reactor = self.reactor
        self.server = ServerService(listen, reactor, factory=factory, grace=grace)
        self.server.setServiceParent(self)
        self.broker_channel = None if broker_channel is None else uuid.UUID(str(broker_channel))
        history = broker_options.pop("history", 0)
        history_bytes = broker_options.pop("history_bytes", DEFAULT_HISTORY_BYTES)
        history_total_bytes = broker_options.pop("history_total_bytes", DEFAULT_HISTORY_TOTAL_BYTES)
        if history and not isinstance(history, History):
            history = History(history, history_bytes, history_total_bytes)
        # One History for every broker this service starts: a restarted broker keeps the
        # retained messages and their epochs, so subscribers resume without a gap.
        self.history: Optional[History] = history if isinstance(history, History) else None
        if self.history is not None:
            broker_options["history"] = self.history
        self.broker_options = broker_options
        self.broker: Optional[Broker] = None
        self.broker_restarts = 0  # times the broker was started again after losing its link
        self._ready: Optional[Deferred[None]] = None
        self._waiting: list[Deferred[Broker]] = []
        self._restart: Optional[IDelayedCall] = None  # the pending restart, while one is due
        self._attempts = 0  # restarts in a row that did not last
        self._started_at = 0.0
        self._outage = False  # the broker is down and being restarted (logged once)
        self._stopping = False
        self._draining: Optional[Broker] = None  # the broker while stopService lets it finish its work
        # How the last stopService went: whether all in flight finished within the grace period, the
        # requests failed when it was over, the messages the broker could not forward (counted lost).
        self.shutdown_stats: dict[str, Any] = {}
        self.cluster: Optional[Cluster] = None  # with --cluster
        if cluster is not None:
            from .cluster.node import Cluster
            from .cluster.url import parse_redis_url

            self.cluster = Cluster(
                parse_redis_url(cluster), node_name or "", reactor, self.server.factory, lease=cluster_lease
            )

    @property
    def factory(self) -> ServerFactory:
        return self.server.factory

    @property
    def restart_attempts(self) -> int:
        """Broker restarts tried in a row that did not last (0 once a broker stays up ``_STEADY`` seconds)."""
        return self._attempts

    def startService(self) -> None:
        self._stopping = False
        if self.broker_channel is not None:
            self.factory.router.reserve(self.broker_channel.bytes)  # before the first client can connect
        super().startService()
        if self.broker_channel is None:
            return
        self._ready = self.server.whenListening().addCallback(self._join_cluster).addCallback(self._connect_broker)
        self._ready.addErrback(self._broker_failed)

    def _join_cluster(self, port: IListeningPort) -> IListeningPort:
        """Link to the cluster's Redis once listening (the node's default name has the port in it)."""
        if self.cluster is not None:
            if not self.cluster.node:
                import os
                import socket

                self.cluster.node = f"{socket.gethostname()}:{port_number(port)}:{os.getpid()}"
            self.cluster.start()
        return port

    def _connect_broker(self, port: Optional[IListeningPort] = None) -> "Deferred[None]":
        assert self.broker_channel is not None  # startService connects a broker only when there is a channel
        d = connect_own_broker(self.factory, self.reactor, self.broker_channel, **self.broker_options)

        def connected(broker: Broker) -> Optional[Deferred[None]]:
            if self._stopping or not self.running:
                return broker.close()  # stopped meanwhile
            self.broker = broker
            self._started_at = self.reactor.seconds()
            if self._outage:
                self._outage = False
                self.broker_restarts += 1
                self.log.info("pulsyflux broker is back on channel {channel}", channel=str(self.broker_channel))
            else:
                self.log.info("pulsyflux broker on channel {channel}", channel=str(self.broker_channel))
            if self.cluster is not None:
                broker.join_cluster(self.cluster.pubsub)
            broker.when_closed().addCallback(lambda _: self._broker_closed(broker))
            waiting, self._waiting = self._waiting, []
            for waiter in waiting:
                waiter.callback(broker)
            return None

        return d.addCallback(connected)

    def _broker_closed(self, broker: Broker) -> None:
        """The broker lost its link to the server: start a new one (close() stays closed)."""
        if self.broker is not broker or self._stopping or not broker.lost_link:
            return  # stopService, or someone who meant it, closed it
        self.broker = None
        if self.reactor.seconds() - self._started_at >= self._STEADY:
            self._attempts = 0
        if not self._outage:
            self._outage = True
            self.log.warn("pulsyflux broker lost its link to the server; starting a new one")
        self._schedule_restart()

    def _schedule_restart(self) -> None:
        delay = DEFAULT_BACKOFF(self._attempts - 1) if self._attempts else 0.0  # now, then 0.1 s doubling to 5 s
        self._attempts += 1
        self._restart = self.reactor.callLater(delay, self._restart_broker)

    def _restart_broker(self) -> None:
        self._restart = None
        if self._stopping:
            return
        self._ready = self._connect_broker()

        def failed(failure: Failure) -> None:
            if not self._stopping:
                self.log.debug("pulsyflux broker restart failed: {e}", e=failure.getErrorMessage())
                self._schedule_restart()

        self._ready.addErrback(failed)

    def _broker_failed(self, failure: Failure) -> None:
        if self.running:
            self.log.failure("pulsyflux broker did not start", failure)
        else:
            self.log.info("pulsyflux broker start abandoned: the service is stopping")
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.errback(failure)

    def whenReady(self) -> "Deferred[Broker]":
        """Fires with the running :class:`Broker` (fails if it cannot start)."""
        if self.broker is not None:
            return succeed(self.broker)
        if self.broker_channel is None:
            return fail(RuntimeError("this service runs without a broker"))
        if self._stopping:
            return fail(ConnectionLostError(SHUTTING_DOWN))
        if not self.running:
            return fail(ConnectionLostError("the broker service is not running"))
        d: Deferred[Broker] = Deferred()
        self._waiting.append(d)
        return d

    def publish(
        self, topic: str, payload: bytes = b"", headers: Optional[dict[str, str]] = None, timeout: float = 5.0
    ) -> "Deferred[Optional[Position]]":
        """:meth:`Broker.publish` on this service's broker (waits for it to start, within ``timeout``)."""
        ready = self.whenReady()
        if self.broker is None and timeout and timeout > 0:
            # Starting or restarting: the publish's timeout covers the wait too.
            ready.addTimeout(timeout, self.reactor)

            def late(failure: Failure) -> None:
                failure.trap(defer.TimeoutError)
                raise RequestTimeout("the broker did not start within the publish's timeout")

            ready.addErrback(late)
        return ready.addCallback(lambda broker: broker.publish(topic, payload, headers, timeout))

    def subscribe(
        self,
        topic: str,
        buffer: Optional[int] = None,
        since: Union[None, str, Position] = None,
        last: Optional[int] = None,
    ) -> "Deferred[Subscription]":
        """:meth:`Broker.subscribe` on this service's broker (waits for it to start)."""
        return self.whenReady().addCallback(lambda broker: broker.subscribe(topic, buffer, since=since, last=last))

    def stats(self) -> dict[str, Any]:
        """The broker's :meth:`Broker.stats` (empty without a broker; a draining one's while stopping)."""
        broker = self.broker or self._draining
        return broker.stats() if broker is not None else {}

    def stopService(self) -> "Deferred[None]":
        self._stopping = True
        if self._restart is not None:
            if self._restart.active():
                self._restart.cancel()
            self._restart = None
        starting = self._ready
        broker, self.broker = self.broker, None
        first = Deferred.fromCoroutine(self._drain(broker))
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.errback(ConnectionLostError("the broker service stopped"))

        cluster = self.cluster
        if cluster is not None:
            first.addBoth(lambda _: defer.ensureDeferred(cluster.stop()))

        def stop_children(_: object) -> "Deferred[None]":
            return maybeDeferred(service.MultiService.stopService, self)

        def settle_start(_: object) -> Optional[Deferred[None]]:
            # A broker still connecting fails once the server is gone; wait
            # for that, and close it should it have made it after all.
            if starting is None or starting.called:
                return None
            settled: Deferred[None] = Deferred()

            def settle(result: object) -> object:
                settled.callback(None)
                return result

            starting.addBoth(settle)
            return settled.addCallback(lambda _: self.broker.close() if self.broker is not None else None)

        return first.addBoth(stop_children).addBoth(settle_start).addCallback(lambda _: None)

    async def _drain(self, broker: Optional[Broker]) -> None:
        """The orderly part of stopService: stop accepting, let what is in flight finish, close the broker.

        The server refuses new requests and connections at once (``server
        overloaded: shutting down``) while its broker goes on forwarding what
        it accepted; once nothing is in flight and the broker is idle, or
        when the grace period is over, what is left fails with that error,
        then the broker closes (its undelivered backlog counted as ``lost``):
        one warning says how much, and :attr:`shutdown_stats` keeps it.
        """
        router = self.factory.router
        self._draining = broker
        lost_before = broker.fanout.lost if broker is not None else 0
        try:
            if broker is not None:
                # The broker's own publishes come in on a trusted connection, which the server lets
                # finish: refuse new ones here (an application may have kept the broker).
                broker.stop_publishing(ConnectionLostError(SHUTTING_DOWN))
            await self.server.stop_accepting()
            if router.requests or (broker is not None and not broker.idle):
                self.log.info(
                    "pulsyflux server stopping: {n} request(s) in flight get up to {grace} s to finish",
                    n=len(router.requests),
                    grace=self.server.grace,
                )
            finished = await self._settled(broker)
            failed = 0
            if not finished:
                failed = len(router.requests)
                router.fail_all(MSG_SHUTTING_DOWN)  # before the broker's Provider goes: not "peer disappeared"
            if broker is not None:
                await broker.close(ConnectionLostError(SHUTTING_DOWN))
        finally:
            self._draining = None
        lost = broker.fanout.lost - lost_before if broker is not None else 0
        self.shutdown_stats = {"finished": finished, "requests_failed": failed, "messages_lost": lost}
        if failed or lost:
            self.log.warn(
                "pulsyflux server stopped with work unfinished after its {grace} s grace period: "
                "{failed} request(s) failed with '{message}', the broker lost {lost} message(s) it had not forwarded",
                grace=self.server.grace,
                failed=failed,
                message=MSG_SHUTTING_DOWN,
                lost=lost,
            )

    async def _settled(self, broker: Optional[Broker]) -> bool:
        """Wait until no request is in flight and ``broker`` is idle (True), or the grace period is over."""
        router = self.factory.router
        step = 0.0
        while router.requests or (broker is not None and not broker.idle):
            left = self.server.grace_left()
            if left <= 0:
                return False
            if router.requests:
                wait = router.when_idle()
            else:  # answers on their way back to the broker, a subscriber not back yet: look again soon
                step = min(step * 2 or 0.001, 0.1)
                wait = task.deferLater(self.reactor, min(step, left), lambda: None)
            try:
                await wait.addTimeout(left, self.reactor)
            except defer.TimeoutError:
                return False
        return True


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the pulsyflux request/response router and its pub/sub broker. "
        "--port takes a bare port (listens on 127.0.0.1) or any Twisted server "
        "endpoint description, e.g. tcp:9090:interface=0.0.0.0 or "
        "unix:/run/pulsyflux.sock. The broker answers on --broker-channel "
        f"(default {DEFAULT_BROKER_CHANNEL}, what every client assumes)."
    )
    optParameters = [
        ["port", "p", str(DEFAULT_PORT), "Where the server listens: a port (on 127.0.0.1) or an endpoint description."],
        ["broker-channel", None, str(DEFAULT_BROKER_CHANNEL), "The broker's channel id (a UUID)."],
        ["http", None, None, "Serve the HTTP monitoring/publish API here: a port (on 127.0.0.1) or a description."],
        [
            "cluster",
            None,
            None,
            "Share pub/sub with other servers through Redis: redis://[:PASSWORD@]HOST:PORT[/DB], rediss:// for TLS.",
        ],
        ["node-name", None, None, "This server's name in the cluster (default HOST:PORT:PID)."],
        [
            "cluster-lease",
            None,
            3.0,
            "Seconds after which the cluster forgets a server that stopped renewing its lease (killed, cut off).",
        ],
        [
            "auth",
            None,
            None,
            "An auth file (JSON, or TOML on Python 3.11+): the keys tokens are checked with and what anonymous"
            " clients may do (docs/security.md). Without it every client may do everything.",
        ],
        [
            "grace",
            None,
            DEFAULT_GRACE,
            "Seconds a shutdown lets requests in flight and the broker's forwarding finish before closing (0: none).",
        ],
        [
            "max-connections",
            None,
            DEFAULT_MAX_CONNECTIONS,
            "Client connections at once; past it, new ones are refused.",
        ],
        ["max-in-flight", None, DEFAULT_MAX_IN_FLIGHT, "Requests one connection may have in flight."],
        [
            "max-body",
            None,
            DEFAULT_MAX_BODY,
            "Bytes of payload in one request or response (a published message's payload, not its base64).",
        ],
        [
            "frame-timeout",
            None,
            DEFAULT_FRAME_TIMEOUT,
            "Seconds a frame may stay incomplete before its connection is closed.",
        ],
        [
            "register-timeout",
            None,
            DEFAULT_REGISTER_TIMEOUT,
            "Seconds a new connection has to register before it is closed.",
        ],
        [
            "max-partial-bytes",
            None,
            DEFAULT_MAX_PARTIAL_BYTES,
            "Bytes held in incomplete frames, all connections together.",
        ],
        ["max-unsent", None, DEFAULT_MAX_UNSENT, "Bytes queued for one connection that reads too slowly."],
        ["history", None, 0, "Messages the broker keeps per topic for subscribers to replay (0: none, the default)."],
        ["history-bytes", None, DEFAULT_HISTORY_BYTES, "Bytes of history kept per topic, at most (with --history)."],
        [
            "history-total-bytes",
            None,
            DEFAULT_HISTORY_TOTAL_BYTES,
            "Bytes of history kept for all topics together (with --history); past it the least recently "
            "published topics give way.",
        ],
        [
            "max-unsent-total",
            None,
            DEFAULT_MAX_UNSENT_TOTAL,
            "Bytes queued for slow readers, all connections together.",
        ],
    ]
    optFlags = [
        ["no-broker", None, "Run the request/response server only, without the pub/sub broker."],
    ]
    optParameters += [
        ["log-level", None, "info", "Log events of this level and above: debug, info, warn, error, critical."],
        ["log-format", None, "text", "text (twistd's lines) or json (one JSON object per line)."],
    ]

    def parseOptions(self, options: Optional[list[str]] = None) -> None:
        """Under twistd, a bad option is one line on stderr and exit status 1 (not the whole usage)."""
        try:
            super().parseOptions(options)
        except usage.UsageError as error:
            if getattr(self, "parent", None) is None:
                raise  # parsed on its own (tests, tools): the caller decides
            raise SystemExit(f"twistd pulsyflux: {error}") from None

    def postOptions(self) -> None:
        try:
            uuid.UUID(self["broker-channel"])
        except ValueError:
            raise usage.UsageError(f"--broker-channel must be a UUID, not {self['broker-channel']!r}") from None
        for name in ("port", "http"):
            if self[name] is not None:
                try:
                    check_server_description(self[name])
                except ValueError as error:
                    raise usage.UsageError(f"--{name}: {error}") from None
        try:
            grace = float(self["grace"])
        except (TypeError, ValueError):
            grace = float("nan")
        if not 0 <= grace < float("inf"):  # NaN too
            raise usage.UsageError(f"--grace must be a number of seconds, 0 or more, not {self['grace']!r}")
        self["grace"] = grace
        self["cluster-lease"] = _positive("cluster-lease", self["cluster-lease"], float)
        if self["cluster"] is not None:
            _check_cluster(self["cluster"], self["node-name"])
        elif self["node-name"] is not None:
            raise usage.UsageError("--node-name is for a server in a cluster: give --cluster as well")
        for name, kind in _LIMITS.items():
            self[name] = _positive(name, self[name], kind)
        logs.check_options(self["log-level"], self["log-format"])
        parent = getattr(self, "parent", None)
        if parent is not None:  # under twistd: its log observer gets the level and format
            logs.configure(parent, self["log-level"], self["log-format"])
        self.authority = None
        if self["auth"]:
            from .auth.config import AuthConfigError, load_auth_file

            try:
                self.authority = load_auth_file(self["auth"])
            except AuthConfigError as error:
                raise usage.UsageError(f"--auth: {error}") from None
        history = str(self["history"])
        if not (history.isdigit() and history.isascii()):
            raise usage.UsageError(f"--history must be a whole number >= 0 (0: no history), not {history!r}")
        self["history"] = int(history)
        for name in ("history-bytes", "history-total-bytes"):
            self[name] = _positive(name, self[name], int)

    def server_factory(self, reactor: Optional[IReactorTime] = None) -> ServerFactory:
        """A :class:`ServerFactory` with the limits (and the ``--auth`` checks) these options give."""
        factory = ServerFactory(reactor, **{name.replace("-", "_"): self[name] for name in _LIMITS})
        authority = getattr(self, "authority", None)  # None until postOptions ran
        if authority is not None:
            factory.router.enable_auth(authority)
        return factory


# The ServerFactory limits twistd takes as options, and the type of each.
_LIMITS = {
    "max-connections": int,
    "max-in-flight": int,
    "max-body": int,
    "max-partial-bytes": int,
    "max-unsent": int,
    "max-unsent-total": int,
    "frame-timeout": float,
    "register-timeout": float,
}


def _check_cluster(url: str, node_name: Optional[str]) -> None:
    """A Redis URL that parses, hiredis installed, a usable node name: else one usage line."""
    from .cluster.shape import check_node_name
    from .cluster.url import RedisError, parse_redis_url

    try:
        parse_redis_url(url)
    except RedisError as error:
        raise usage.UsageError(f"--cluster: {error}") from None
    try:
        import hiredis  # noqa: F401
    except ImportError:
        raise usage.UsageError("--cluster needs hiredis: pip install 'pulsyflux[cluster]'") from None
    if node_name is not None:
        try:
            check_node_name(node_name)
        except ValueError as error:
            raise usage.UsageError(f"--node-name: {error}") from None


def _positive(name: str, value: object, kind: Callable[[Any], float]) -> float:
    """``value`` as a number > 0 of ``kind``, or one clear usage line."""
    what = "a whole number" if kind is int else "a number of seconds"
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not number > 0 or number == float("inf"):
        raise usage.UsageError(f"--{name} must be {what} greater than 0, not {value!r}")
    return number


class _ExitIfNotListening(service.Service):
    """Makes twistd exit with one clear line when a port cannot be opened,
    instead of running on without it. Started after the services it checks."""

    def __init__(self, *listeners: ListeningService) -> None:
        self.listeners = listeners

    def startService(self) -> None:
        super().startService()
        for listener in self.listeners:
            self._check(listener)

    def _check(self, listener: ListeningService) -> None:
        failed_now: list[Failure] = []
        checking = True

        def failed(failure: Failure) -> None:
            if checking:  # TCP and UNIX endpoints fail at once: exit before the reactor runs
                failed_now.append(failure)
            else:
                listener.reactor.callWhenRunning(listener.reactor.stop)

        listener.whenListening().addErrback(failed)
        checking = False
        if failed_now:
            raise SystemExit(1)  # the listener logged the one line saying why


def makeService(options: Options) -> service.IService:
    tune_collector()  # twistd's process is the server's (pulsyflux/server/collector.py)
    channel = None if options["no-broker"] else options["broker-channel"]
    top = BrokerService(
        options["port"],
        broker_channel=channel,
        grace=options["grace"],
        factory=options.server_factory(),
        cluster=options["cluster"],
        node_name=options["node-name"],
        cluster_lease=options["cluster-lease"],
        history=options["history"],
        history_bytes=options["history-bytes"],
        history_total_bytes=options["history-total-bytes"],
    )
    listeners: list[Any] = [top.server]
    if options["http"]:
        from .http.site import http_service

        web = http_service(options["http"], top)
        web.setServiceParent(top)
        listeners.append(web)
    _ExitIfNotListening(*listeners).setServiceParent(top)
    return top
