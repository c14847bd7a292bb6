"""The site that serves the resources (bounded requests, an access log of printable lines) and its service."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Optional, cast

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IAddress, IListeningPort, IProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.iweb import IAccessLogFormatter
from twisted.web.server import Request, Site
from zope.interface import provider

from .._twisted_compat import http_channel_transport
from ..endpoints import describe_address
from ..server.listening import ListeningService
from ..server.protocol import ServerFactory
from ..wire.printable import printable_bytes
from ..wire.ratelimit import DEFAULT_TEXT, LogLimiter, summary_to
from .resources import DEFAULT_MAX_PUBLISH_BODY, Healthz, History, Metrics, Publish, Root, Stats
from .stats import DEFAULT_MAX_TOPICS, HTTPBroker, stats_document

if TYPE_CHECKING:
    from .._types import IReactor
    from ..service import BrokerService

__all__ = ["make_site", "access_log_line", "PulsyfluxSite", "HTTPService", "http_service"]

log = Logger()


class _BoundedRequest(Request):
    """Stops buffering a request body past the site's limit, so a huge POST
    costs no memory or disk; the resource then answers 413."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.body_too_large = False  # past the limit: the body is dropped, the answer is 413

    def _max_body(self) -> Optional[int]:
        """The limit of the site (a :class:`PulsyfluxSite`) that made this request's channel."""
        return getattr(getattr(self.channel, "site", None), "max_body", None)

    def gotLength(self, length: Optional[int]) -> None:
        limit = self._max_body()
        if limit is not None and length is not None and length > limit:
            self.body_too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        limit = self._max_body()
        content = cast(BinaryIO, self.content)  # made by gotLength (Twisted's stub says None)
        if limit is not None and content.tell() + len(data) > limit:
            self.body_too_large = True
            content.seek(0)
            content.truncate()
            return
        super().handleContentChunk(data)


def make_site(
    server_factory: ServerFactory,
    broker: Optional[HTTPBroker] = None,
    ready: Optional[Callable[[], list[str]]] = None,
    max_body: int = DEFAULT_MAX_PUBLISH_BODY,
    max_topics: int = DEFAULT_MAX_TOPICS,
    degraded: Optional[Callable[[], list[str]]] = None,
) -> PulsyfluxSite:
    """A twisted.web Site serving the monitoring and publish endpoints.

    ``ready`` returns the names of parts not running yet (empty = healthy);
    ``degraded`` those running with less than they should (the cluster link).
    ``max_topics`` bounds the topics (and the subscriptions) /stats and
    /metrics list one by one.

        site = make_site(factory, broker=broker)
    """

    def document() -> dict[str, Any]:
        return stats_document(server_factory, broker, max_topics=max_topics)

    root = Root()
    root.putChild(b"healthz", Healthz(ready or (lambda: []), degraded))
    gate = getattr(getattr(server_factory, "router", None), "gate", None)  # --auth: tokens checked here too
    root.putChild(b"stats", Stats(document, gate))
    root.putChild(b"metrics", Metrics(document, gate))
    root.putChild(b"publish", Publish(broker, max_body=max_body, gate=gate))
    root.putChild(b"history", History(broker, gate=gate))
    site = PulsyfluxSite(root, requestFactory=_BoundedRequest)
    site.max_body = max_body
    site.noisy = False
    site.displayTracebacks = False
    return site


def _access_field(value: Optional[bytes]) -> str:
    """A peer's bytes in an access log line: escaped, cut after
    :data:`~pulsyflux.wire.ratelimit.DEFAULT_TEXT` bytes, quotes escaped (the
    line's fields are quoted)."""
    if not value:
        return "-"
    return printable_bytes(value, DEFAULT_TEXT).replace('"', '\\"')


@provider(IAccessLogFormatter)
def access_log_line(timestamp: str, request: http.Request) -> str:
    """The combined log format, every field a peer chose (method, path,
    protocol, referer, user agent) escaped and cut: a 15 KB path or an
    escape sequence in a User-Agent stays one short, safe line."""
    host = getattr(request.getClientAddress(), "host", None)
    return '"{}" - - {} "{} {} {}" {:d} {} "{}" "{}"'.format(
        _access_field(host.encode("ascii", "replace") if isinstance(host, str) else host),
        timestamp,
        _access_field(request.method),
        _access_field(request.uri),
        _access_field(request.clientproto),
        request.code,
        request.sentLength or "-",
        _access_field(request.getHeader(b"referer")),
        _access_field(request.getHeader(b"user-agent")),
    )


# Paths monitors poll: their successful requests get no access-log line.
_QUIET_PATHS = frozenset({b"/metrics", b"/healthz"})


class PulsyfluxSite(Site):
    """A Site that knows its open connections, so stopping can close them
    (keep-alive clients would otherwise hold the reactor open).

    Its access log is bounded like every line a peer can trigger: per status
    class (``http 2xx``, ``http 4xx``...) the first ``burst`` requests of each
    interval are logged (:class:`~pulsyflux.wire.ratelimit.LogLimiter`, 10 per 10 s
    by default), the rest counted in one summary line, and each line is
    :func:`access_log_line` (peer text escaped and cut)."""

    max_body: Optional[int] = None
    access_log = Logger()  # the summaries; ``log`` is the Site's access-log method

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("logFormatter", access_log_line)
        super().__init__(*args, **kwargs)
        self.open_connections: dict[IProtocol, list[Deferred[None]]] = {}
        # Kinds are status classes chosen here, not peer text: at most a handful.
        self.access_limiter = LogLimiter(self.reactor, summary_to(self.access_log))

    def log(self, request: http.Request) -> None:
        """One access-log line, unless this status class had its burst this interval.

        A monitor's successful ``/metrics`` scrape or ``/healthz`` probe is
        not logged: every few seconds, forever, it would bury the rest.
        """
        if request.code < 400 and request.path in _QUIET_PATHS:
            return
        if self.access_limiter.allow(f"http {request.code // 100}xx"):
            super().log(request)

    def stopFactory(self) -> None:
        super().stopFactory()
        self.access_limiter.stop()  # pending summaries written, no timer left behind

    def buildProtocol(self, addr: Optional[IAddress]) -> Any:  # Twisted's own type for it is private
        proto = super().buildProtocol(addr)
        self.open_connections[proto] = []
        # The Site's protocol is Twisted's (private) proxy, which may swap the
        # HTTPChannel behind it for an h2 connection; wrapping this instance's
        # connectionLost is the one hook that sees every connection end, and
        # no public Site API offers one.
        lost = proto.connectionLost

        def connection_lost(reason: Failure) -> None:
            waiters = self.open_connections.pop(proto, [])
            lost(reason)
            for waiter in waiters:
                waiter.callback(None)

        proto.connectionLost = connection_lost
        return proto

    def close_connections(self) -> "Deferred[list[tuple[bool, None]]]":
        """Abort every open HTTP connection; fires once all are gone."""
        waits = []
        for proto, waiters in list(self.open_connections.items()):
            d: Deferred[None] = Deferred()
            waiters.append(d)
            waits.append(d)
            http_channel_transport(proto).abortConnection()
        return DeferredList(waits)


class HTTPService(ListeningService):
    """Serves a :func:`make_site` site on an endpoint (a bare port means
    127.0.0.1); stopping closes the port and every open HTTP connection."""

    log = Logger()
    _what = "pulsyflux HTTP API"
    _exposes = "any host that reaches it can publish (POST /publish/..., no authentication) and read /stats"

    def __init__(self, listen: str | int, site: Site, reactor: Optional[IReactor] = None) -> None:
        super().__init__(listen, reactor)
        self.site = site

    def startService(self) -> "Deferred[Optional[IListeningPort]]":  # type: ignore[override]  # for tests to wait on
        super().startService()
        # A failure is logged, and told to whoever waits in whenListening; not raised.
        return self._listen(self.site).addErrback(lambda _: None)

    def _listening(self, port: IListeningPort) -> None:
        self.log.info("pulsyflux HTTP API on http://{address}/", address=describe_address(port.getHost()))

    def stopService(self) -> "Deferred[list[tuple[bool, object]]]":
        super().stopService()
        waits: list[Deferred[object]] = []
        if self.port is not None:
            waits.append(maybeDeferred(self.port.stopListening))
            self.port = None
        close = getattr(self.site, "close_connections", None)
        if close is not None:
            waits.append(close())
        return DeferredList(waits)


def http_service(listen: str | int, broker_service: BrokerService, reactor: Optional[IReactor] = None) -> HTTPService:
    """The HTTP API for a :class:`~pulsyflux.service.BrokerService` (what
    ``twistd pulsyflux --http`` adds): healthy once its server listens and,
    unless it runs without one, its broker is connected.

        http_service("8222", top).setServiceParent(top)
    """
    runs_broker = broker_service.broker_channel is not None

    def not_running() -> list[str]:
        missing = []
        if broker_service.server.port is None:
            missing.append("server")
        broker = broker_service.broker
        # A Broker that lost the server closes itself.
        if runs_broker and (broker is None or broker.closed):
            missing.append("broker")
        return missing

    def degraded() -> list[str]:
        cluster = broker_service.cluster
        return ["cluster"] if cluster is not None and not cluster.link.up else []

    site = make_site(
        broker_service.factory, broker=broker_service if runs_broker else None, ready=not_running, degraded=degraded
    )
    return HTTPService(listen, site, reactor or broker_service.reactor)
