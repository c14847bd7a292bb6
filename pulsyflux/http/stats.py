"""The HTTP monitoring and publish API (twisted.web), off unless asked for.

``twistd -n pulsyflux --http 8222`` serves, next to the router:

* ``GET /healthz`` - 200 ``{"status": "ok"}`` once the server (and broker) run;
* ``GET /stats`` - every counter as one JSON document (:func:`stats_document`);
* ``GET /metrics`` - the same counters in Prometheus text format;
* ``POST /publish/{topic}`` - publish the body through the broker.

Everything reads live objects in this process (the server factory, the
broker); nothing here keeps counters of its own except HTTP ones.

    site = make_site(server_factory, broker=broker)
    HTTPService("8222", site).setServiceParent(application)
"""

from __future__ import annotations

import heapq
import json
import math
import re
import sys
import time
import uuid
from collections import Counter
from typing import Any, BinaryIO, Callable, Iterable, Optional, cast
from urllib.parse import unquote

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger
from twisted.web import http
from twisted.web.iweb import IAccessLogFormatter
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import provider

from .._twisted_compat import http_channel_transport
from ..endpoints import describe_address
from ..server.listening import ListeningService
from ..server.protocol import ServerFactory
from ..wire.codec import MAX_PAYLOAD
from ..wire.printable import printable, printable_bytes
from ..wire.ratelimit import DEFAULT_TEXT, LogLimiter, summary_to

__all__ = [
    "HEADER_PREFIX",
    "HTTPService",
    "http_service",
    "make_site",
    "prometheus_text",
    "stats_document",
]

HEADER_PREFIX = "x-pulsyflux-header-"
JSON_TYPE = b"application/json"
PROMETHEUS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

# What a published body may weigh (like NATS's max_payload): what one wire
# frame carries; larger bodies are refused with 413 before they are read.
DEFAULT_MAX_PUBLISH_BODY = 1 << 20

# Topics shown one by one in /stats and /metrics (the most subscribed first;
# the rest are summed): anyone can create topics, and a scrape must not grow
# with them.
DEFAULT_MAX_TOPICS = 50

# Connections listed one by one in /stats (the busiest; the rest are counted in
# ``connections.omitted``): a scrape must not grow with the clients.
DEFAULT_MAX_CONNECTIONS_LISTED = 100


# -- the stats document ---------------------------------------------------------


def process_stats() -> dict[str, Any]:
    """This process as an operator's first look sees it: version, pid, memory, files, CPU.

    Read at scrape time (no counter on any hot path); a number the platform
    cannot give is None.
    """
    import os
    import resource

    from .. import __version__

    times = os.times()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    rss: Optional[int] = None
    try:
        with open("/proc/self/statm", "rb") as statm:
            rss = int(statm.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        rss = None
    fds: Optional[int] = None
    for fd_dir in ("/proc/self/fd", "/dev/fd"):
        try:
            fds = len(os.listdir(fd_dir)) - 1  # listing the directory opens one
            break
        except OSError:
            continue
    try:
        fd_limit: Optional[int] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (OSError, ValueError):
        fd_limit = None
    return {
        "version": __version__,
        "pid": os.getpid(),
        "rss_bytes": rss,
        # ru_maxrss is KiB on Linux and bytes on macOS
        "max_rss_bytes": usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024,
        "open_fds": fds,
        "max_fds": fd_limit if fd_limit is not None and fd_limit >= 0 else None,
        "cpu_seconds": round(times.user + times.system, 3),
    }


def server_limits(factory: ServerFactory) -> dict[str, Any]:
    """The limits this server enforces (docs/reliability.md), as configured."""
    router = factory.router
    guard = router.connection_guard
    return {
        "max_body": router.max_body,
        "max_in_flight": router.max_in_flight,
        "max_connections": router.max_connections,
        "max_unsent": router.flow_control.max_unsent,
        "max_unsent_total": router.flow_control.max_unsent_total,
        "frame_timeout": guard.frame_timeout,
        "register_timeout": guard.register_timeout,
        "max_partial_bytes": guard.max_partial_bytes,
        "max_frame_payload": MAX_PAYLOAD,
    }


def latency_stats(histogram: Any) -> dict[str, Any]:
    """The request latency histogram: cumulative counts per upper bound in seconds, as Prometheus has them."""
    buckets = {("+Inf" if math.isinf(bound) else f"{bound:g}"): count for bound, count in histogram.cumulative()}
    return {"count": histogram.count, "sum_seconds": round(histogram.sum, 6), "buckets": buckets}


def server_stats(
    factory: ServerFactory, now: Optional[float] = None, max_connections: int = DEFAULT_MAX_CONNECTIONS_LISTED
) -> dict[str, Any]:
    """The router's counters and a census of its connections.

    Channels are counted, never named: a channel id is the capability to use
    that channel (a subscriber's id lets anyone inject into or end its
    subscription), so whoever reads the stats must not learn one. The
    server's own broker's connections and requests are counted apart from
    the clients' (role ``broker``, ``requests.broker_routed``).
    """
    stats = factory.stats
    router = factory.router
    census = router.census()
    listed, omitted = router.connection_list(max_connections)
    now = time.time() if now is None else now
    return {
        **process_stats(),
        "started": stats.started,
        "uptime_seconds": round(max(now - stats.started, 0.0), 3),
        "limits": server_limits(factory),
        "connections": {
            "open": census.open,
            "total": stats.connections_total,
            "by_role": census.by_role,
            "list": listed,
            "omitted": omitted,
        },
        "channels": {
            "count": census.channels,
            "with_providers": census.with_providers,
            "without_provider": census.without_provider,
        },
        "requests": {
            "routed": stats.requests_routed,
            "broker_routed": stats.broker_requests_routed,
            "responses_routed": stats.responses_routed,
            "in_flight": census.in_flight,
            "latency": latency_stats(stats.latency),
        },
        "frames_dropped": stats.frames_dropped,
        "protocol_errors": stats.protocol_errors,
        "slow_consumers": stats.slow_consumers,
        "errors": dict(sorted(stats.errors.items())),  # by kind: a small, fixed vocabulary
        "recent_errors": list(stats.recent_errors),  # the last few texts, short and printable
        "bytes": {"in": stats.bytes_in, "out": stats.bytes_out},
    }


def broker_stats(broker: Any, max_topics: int = DEFAULT_MAX_TOPICS) -> Optional[dict[str, Any]]:
    """The broker's counters (:meth:`Broker.stats`), or None when it does not run.

    ``broker`` is a :class:`~pulsyflux.broker.Broker` or a
    :class:`~pulsyflux.service.BrokerService` (whose stats are empty until
    its broker is connected). Anyone may create topics and subscriptions, so
    both are bounded here (:func:`_bounded_broker_stats`) and subscriptions
    lose their channel ids.
    """
    if broker is None:
        return None
    stats = broker.stats()
    if not stats:
        return None
    return _bounded_broker_stats(stats, max_topics)


def stats_document(
    factory: ServerFactory, broker: Any = None, now: Optional[float] = None, max_topics: int = DEFAULT_MAX_TOPICS
) -> dict[str, Any]:
    """What ``GET /stats`` returns: ``{"server": {...}, "broker": {...} or None}``."""
    return {"server": server_stats(factory, now), "broker": broker_stats(broker, max_topics)}


# Topic names in the stats and metrics: at most this many characters.
TOPIC_TEXT_LIMIT = 200
# The series all topics past the ``max_topics`` most subscribed share. Topics
# under the broker's reserved prefix can never be published to, so no real
# topic is shown under this name.
OTHER_TOPICS = "$pulsyflux/other"
_SURROGATES = re.compile("[\ud800-\udfff]")


def _topic_text(topic: Any) -> str:
    """A topic as stats show it: at most TOPIC_TEXT_LIMIT characters, and
    UTF-8 encodable (a lone surrogate, which JSON lets a client send, becomes U+FFFD)."""
    text = str(topic)
    if len(text) > TOPIC_TEXT_LIMIT:
        text = text[:TOPIC_TEXT_LIMIT] + "..."
    return _SURROGATES.sub("\ufffd", text)


def _bounded_broker_stats(stats: dict[str, Any], max_topics: int) -> dict[str, Any]:
    """The broker's stats as shown: the ``max_topics`` most subscribed topics
    (the others summed in ``other_topics``), the ``max_topics`` largest queue
    groups (of ``groups_count``), the ``max_topics`` slowest
    subscriptions, topic names cut and made encodable, and no subscription's
    channel id (nor any other text of it but its topic)."""
    from ..wire.messages import is_control

    out = {
        key: value
        for key, value in stats.items()
        if key not in ("topics", "subscriptions", "topic_published", "topic_delivered", "groups")
    }
    published = stats.get("topic_published", {})
    delivered = stats.get("topic_delivered", {})
    traffic: dict[str, dict[str, int]] = {}
    topics: Counter[str] = Counter()
    other = {"topics": 0, "subscribers": 0}
    ranked = sorted(stats.get("topics", {}).items(), key=lambda item: (-item[1], str(item[0])))
    for topic, count in ranked:
        if len(topics) < max_topics and not is_control(str(topic)):
            shown = _topic_text(topic)
            topics[shown] += count  # two cut names may meet: add them up
            counts = traffic.setdefault(shown, {"published": 0, "delivered": 0})
            counts["published"] += _int(published.get(topic))
            counts["delivered"] += _int(delivered.get(topic))
        else:
            other["topics"] += 1
            other["subscribers"] += count
    out["topics_count"] = len(ranked)
    out["topics"] = dict(topics)
    out["topic_traffic"] = traffic  # publish -> deliver per shown topic, since it last gained a subscriber
    out["other_topics"] = other
    groups = stats.get("groups", [])
    out["groups_count"] = len(groups)
    largest = heapq.nsmallest(
        max_topics, groups, key=lambda g: (-_int(g.get("members")), str(g.get("topic")), str(g.get("group")))
    )
    out["groups"] = [
        {
            "topic": _topic_text(g.get("topic", "")),
            "group": _topic_text(g.get("group", "")),
            "members": _int(g.get("members")),
        }
        for g in largest
    ]
    subs = stats.get("subscriptions", [])
    out["subscriptions_count"] = len(subs)
    slowest = heapq.nsmallest(
        max_topics,
        subs,
        key=lambda sub: (-_int(sub.get("backlog")) - _int(sub.get("in_flight")), str(sub.get("topic"))),
    )
    out["subscriptions"] = [_subscription(sub) for sub in slowest]
    out["backlog"] = sum(_int(sub.get("backlog")) for sub in subs)
    out["backlog_max"] = max((_int(sub.get("backlog")) for sub in subs), default=0)
    return out


def _subscription(sub: dict[str, Any]) -> dict[str, Any]:
    """One subscription's numbers, topic and label (``sub-N``, when the broker
    gives one); its channel id (its bearer secret) stays out, and so does any
    other text the broker may add."""
    shown: dict[str, Any] = {}
    label = sub.get("id")
    if isinstance(label, str) and len(label) <= 32 and not _looks_like_a_channel(label):
        shown["id"] = label
    shown["topic"] = _topic_text(sub.get("topic", ""))
    if isinstance(sub.get("group"), str):
        shown["group"] = _topic_text(sub["group"])  # the queue group, when in one
    for key, value in sub.items():
        if isinstance(value, (bool, int, float)) and key not in ("channel", "id"):
            shown[key] = value
    return shown


def _looks_like_a_channel(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


# -- Prometheus text format -------------------------------------------------------


# Label values past this many characters are cut ("... (N chars more)").
LABEL_TEXT_LIMIT = 256


def _escape_label(value: str) -> str:
    """A label value as the text format wants it: cut to LABEL_TEXT_LIMIT
    characters, control characters other than the line feed (and lone
    surrogates, which no encoder writes) shown as ``\\xNN`` text, then
    backslash, quote and line feed escaped as the format says."""
    more = len(value) - LABEL_TEXT_LIMIT
    if more > 0:
        value = value[:LABEL_TEXT_LIMIT]
    text = "\n".join(printable(part) for part in value.split("\n"))
    if more > 0:
        text += f"... ({more} chars more)"
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Metrics:
    """Collects families in order; each family is HELP, TYPE, then samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self, name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]] = ()
    ) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        rendered: dict[str, float] = {}
        for labels, value in samples:
            series = name
            if labels:
                text = ",".join(f'{key}="{_escape_label(str(val))}"' for key, val in labels.items())
                series = f"{name}{{{text}}}"
            # Label values that differ only past the cut (or in how they are
            # escaped) are one series: add them up rather than repeat it.
            rendered[series] = rendered[series] + value if series in rendered else value
        for series, value in rendered.items():
            self.lines.append(f"{series} {_number(value)}")

    def one(self, name: str, kind: str, help_text: str, value: float) -> None:
        self.family(name, kind, help_text, [({}, value)])

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def prometheus_text(document: dict[str, Any]) -> str:
    """Render a :func:`stats_document` in the Prometheus text exposition format."""
    m = _Metrics()
    s = document["server"]
    m.family(
        "pulsyflux_info",
        "gauge",
        "Always 1; the labels say which pulsyflux this is.",
        [({"version": str(s.get("version", "")), "pid": str(s.get("pid", ""))}, 1)],
    )
    m.one("pulsyflux_uptime_seconds", "gauge", "Seconds since the server started.", s["uptime_seconds"])
    # The standard process metrics (names as the Prometheus client libraries use them).
    for name, key, kind, help_text in (
        ("process_resident_memory_bytes", "rss_bytes", "gauge", "Resident memory size in bytes."),
        ("process_open_fds", "open_fds", "gauge", "Number of open file descriptors."),
        ("process_max_fds", "max_fds", "gauge", "Maximum number of open file descriptors."),
        ("process_cpu_seconds_total", "cpu_seconds", "counter", "Total user and system CPU time in seconds."),
        ("process_start_time_seconds", "started", "gauge", "Start time of the process since the Unix epoch."),
    ):
        if s.get(key) is not None:
            m.one(name, kind, help_text, s[key])
    m.family(
        "pulsyflux_limit",
        "gauge",
        "The limits the server enforces, as configured (bytes, seconds or counts; see docs/reliability.md).",
        [({"limit": name}, value) for name, value in sorted(s.get("limits", {}).items())],
    )
    m.family(
        "pulsyflux_connections",
        "gauge",
        "Open connections by role (unregistered = connected, not yet registered; broker = the server's own broker).",
        [({"role": role}, count) for role, count in sorted(s["connections"]["by_role"].items())],
    )
    m.one(
        "pulsyflux_connections_accepted_total",
        "counter",
        "Client connections accepted since start.",
        s["connections"]["total"],
    )
    m.one("pulsyflux_channels", "gauge", "Channels with at least one registered client.", s["channels"]["count"])
    m.one(
        "pulsyflux_requests_routed_total",
        "counter",
        "Requests handed to a provider.",
        s["requests"]["routed"],
    )
    m.one(
        "pulsyflux_broker_requests_routed_total",
        "counter",
        "Requests of the server's own broker (its forwards to subscribers) handed to a provider.",
        s["requests"].get("broker_routed", 0),
    )
    latency = s["requests"].get("latency")
    if latency is not None:
        name = "pulsyflux_request_duration_seconds"
        m.lines.append(f"# HELP {name} Clients' requests, from their START to the end of the response.")
        m.lines.append(f"# TYPE {name} histogram")
        for bound, count in latency["buckets"].items():
            m.lines.append(f'{name}_bucket{{le="{bound}"}} {count}')
        m.lines.append(f"{name}_sum {_number(latency['sum_seconds'])}")
        m.lines.append(f"{name}_count {latency['count']}")
    m.one(
        "pulsyflux_responses_routed_total",
        "counter",
        "Responses (or provider errors) delivered to the consumer that asked.",
        s["requests"]["responses_routed"],
    )
    m.one(
        "pulsyflux_requests_in_flight",
        "gauge",
        "Requests routed whose response has not finished.",
        s["requests"]["in_flight"],
    )
    m.one(
        "pulsyflux_frames_dropped_total",
        "counter",
        "Frames the router could not deliver (late, unroutable or mismatched).",
        s["frames_dropped"],
    )
    m.one(
        "pulsyflux_protocol_errors_total",
        "counter",
        "Connections closed for bytes that break the wire protocol.",
        s["protocol_errors"],
    )
    m.one(
        "pulsyflux_slow_consumers_total",
        "counter",
        "Connections closed for leaving too many bytes unread (max_unsent).",
        s["slow_consumers"],
    )
    m.family(
        "pulsyflux_errors_total",
        "counter",
        "ERROR frames by kind (the server's own messages; 'provider error' for any a provider sends).",
        [({"kind": kind}, count) for kind, count in sorted(s["errors"].items())],
    )
    m.one("pulsyflux_received_bytes_total", "counter", "Bytes read from client connections.", s["bytes"]["in"])
    m.one("pulsyflux_sent_bytes_total", "counter", "Bytes written to client connections.", s["bytes"]["out"])
    b = document.get("broker")
    if b is not None:
        _broker_metrics(m, b)
    return m.text()


def _broker_metrics(m: _Metrics, b: dict[str, Any]) -> None:
    m.one(
        "pulsyflux_broker_published_total",
        "counter",
        "Messages the broker accepted from publishers (any client, Go ones too).",
        b["published"],
    )
    m.one(
        "pulsyflux_broker_delivered_total",
        "counter",
        "Messages subscribers accepted (one per subscriber).",
        b["delivered"],
    )
    m.one(
        "pulsyflux_broker_dropped_total",
        "counter",
        "Messages dropped because a subscriber's backlog was full (it read too slowly).",
        b["dropped"],
    )
    m.one(
        "pulsyflux_broker_lost_total",
        "counter",
        "Messages queued for subscribers whose connection vanished.",
        b.get("lost", 0),
    )
    m.one(
        "pulsyflux_broker_rejected_total",
        "counter",
        "Publish requests the broker refused as malformed.",
        b.get("rejected", 0),
    )
    topics = b.get("topics", {})
    other = b.get("other_topics", {})
    m.one(
        "pulsyflux_broker_topics", "gauge", "Topics with at least one subscriber.", b.get("topics_count", len(topics))
    )
    samples = [({"topic": topic}, count) for topic, count in sorted(topics.items())]
    if other.get("topics"):
        samples.append(({"topic": OTHER_TOPICS}, other.get("subscribers", 0)))
    m.family(
        "pulsyflux_broker_topic_subscribers",
        "gauge",
        f"Subscriptions per topic (the most subscribed ones; {OTHER_TOPICS} sums the others).",
        samples,
    )
    traffic = b.get("topic_traffic", {})
    m.family(
        "pulsyflux_broker_topic_published_total",
        "counter",
        "Messages published to a topic while it had subscribers (the topics listed above).",
        [({"topic": topic}, counts.get("published", 0)) for topic, counts in sorted(traffic.items())],
    )
    m.family(
        "pulsyflux_broker_topic_delivered_total",
        "counter",
        "Messages of a topic its subscribers accepted (the topics listed above).",
        [({"topic": topic}, counts.get("delivered", 0)) for topic, counts in sorted(traffic.items())],
    )
    subs = b.get("subscriptions", [])
    m.one(
        "pulsyflux_broker_subscriptions",
        "gauge",
        "Subscriptions the broker serves.",
        b.get("subscriptions_count", len(subs)),
    )
    m.one(
        "pulsyflux_broker_backlog",
        "gauge",
        "Messages the broker holds for its subscriptions, not yet forwarded.",
        b.get("backlog", 0),
    )
    m.one(
        "pulsyflux_broker_backlog_max",
        "gauge",
        "The largest backlog of any one subscription (how far the slowest subscriber is behind).",
        b.get("backlog_max", 0),
    )
    # Per subscription, by its label (sub-N, never its channel id), for the
    # subscriptions the document lists: the slowest, at most max_topics.
    listed = sorted((sub for sub in subs if "id" in sub), key=lambda sub: (sub["topic"], sub["id"]))
    m.family(
        "pulsyflux_broker_subscription_backlog",
        "gauge",
        "Messages the broker holds for one subscription, not yet forwarded (the slowest subscriptions).",
        [({"topic": sub["topic"], "subscription": sub["id"]}, sub.get("backlog", 0)) for sub in listed],
    )
    m.family(
        "pulsyflux_broker_subscription_delivered_total",
        "counter",
        "Messages one subscription accepted (the slowest subscriptions).",
        [({"topic": sub["topic"], "subscription": sub["id"]}, sub.get("delivered", 0)) for sub in listed],
    )
    m.family(
        "pulsyflux_broker_subscription_dropped_total",
        "counter",
        "Messages dropped for one subscription, it read too slowly (the slowest subscriptions).",
        [({"topic": sub["topic"], "subscription": sub["id"]}, sub.get("dropped", 0)) for sub in listed],
    )


# -- resources ----------------------------------------------------------------------


def _json(request: Request, code: int, body: Any) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", JSON_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, indent=2).encode() + b"\n"


class _Leaf(Resource):
    """An endpoint: JSON 405 for other methods, 404 below it unless it takes a path."""

    isLeaf = True
    takes_path = False

    def render(self, request: Request) -> bytes:
        if request.postpath and request.postpath != [b""] and not self.takes_path:
            return _not_found(request)
        method = request.method.decode("ascii", "replace")
        handler = getattr(self, "render_" + method, None)
        if handler is None:
            allowed = [name[len("render_") :].encode() for name in dir(self) if name.startswith("render_")]
            request.setHeader(b"allow", b", ".join(allowed))
            return _json(request, http.NOT_ALLOWED, {"error": f"method {method} not allowed"})
        return handler(request)


class Healthz(_Leaf):
    """200 once every part runs; 503 with what is missing otherwise."""

    def __init__(self, ready: Callable[[], list[str]]) -> None:
        super().__init__()
        self.ready = ready

    def render_GET(self, request: Request) -> bytes:
        missing = self.ready()
        if missing:
            return _json(request, http.SERVICE_UNAVAILABLE, {"status": "unavailable", "not_running": missing})
        return _json(request, http.OK, {"status": "ok"})

    render_HEAD = render_GET


class Stats(_Leaf):
    def __init__(self, document: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self.document = document

    def render_GET(self, request: Request) -> bytes:
        return _json(request, http.OK, self.document())


class Metrics(_Leaf):
    def __init__(self, document: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self.document = document

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", PROMETHEUS_TYPE)
        # Every label is printable() already; "replace" is the last safety net.
        return prometheus_text(self.document()).encode("utf-8", "replace")


class Publish(_Leaf):
    """``POST /publish/{topic}``: the body is the payload; headers come from
    ``X-Pulsyflux-Header-<name>`` (names lowercased, as HTTP ignores case)."""

    log = Logger()
    takes_path = True

    def __init__(self, broker: Any, max_body: int = DEFAULT_MAX_PUBLISH_BODY, timeout: float = 5.0) -> None:
        super().__init__()
        self.broker = broker
        self.max_body = max_body
        self.timeout = timeout
        from twisted.internet import reactor

        self.log_limiter = LogLimiter(reactor, summary_to(self.log))  # clients decide how often publishes fail

    def render_POST(self, request: Request) -> Any:
        path = request.path.decode("utf-8", "replace")
        raw_topic = path[len("/publish") :].lstrip("/")
        topic = unquote(raw_topic)
        if getattr(request, "body_too_large", False):
            return self._too_large(request)
        problem = _topic_problem(topic)
        if problem:
            return _json(request, http.BAD_REQUEST, {"error": problem})
        content = cast(BinaryIO, request.content)  # Twisted's stub says None: it is the buffered body
        content.seek(0)
        payload = content.read()
        if len(payload) > self.max_body:
            return self._too_large(request)
        if self.broker is None:
            return _json(request, http.SERVICE_UNAVAILABLE, {"error": "this server runs no broker"})
        headers = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            lower = name.decode("latin-1").lower()
            if lower.startswith(HEADER_PREFIX) and len(lower) > len(HEADER_PREFIX):
                headers[lower[len(HEADER_PREFIX) :]] = values[-1].decode("utf-8", "replace")
        d = maybeDeferred(self.broker.publish, topic, payload, headers or None, timeout=self.timeout)
        gone: list[Any] = []  # the client hung up: the message is still published, nobody to tell
        request.notifyFinish().addErrback(gone.append)

        def answer(code: int, body: dict[str, Any]) -> None:
            if not gone and not request.finished:
                request.write(_json(request, code, body))
                request.finish()

        def failed(failure: Any) -> None:
            code, message = _publish_error(failure.value)
            if code >= 500 and self.log_limiter.allow("publish failed"):
                self.log.warn(
                    "publish to {topic} failed: {error}",
                    topic=printable(repr(topic), TOPIC_TEXT_LIMIT),
                    error=printable(str(failure.value)),
                )
            answer(code, {"error": message})

        d.addCallbacks(
            lambda _: answer(http.ACCEPTED, {"status": "accepted", "topic": topic, "bytes": len(payload)}), failed
        )
        return NOT_DONE_YET

    def _too_large(self, request: Request) -> bytes:
        return _json(
            request,
            http.REQUEST_ENTITY_TOO_LARGE,
            {"error": f"body larger than {self.max_body} bytes", "limit": self.max_body},
        )


def _topic_problem(topic: str) -> Optional[str]:
    """The broker's topic rule (:func:`messages.topic_problem`), with how to name a topic in a URL."""
    from ..wire.messages import topic_problem

    problem = topic_problem(topic)
    if problem is not None and not topic:
        return problem + ": POST /publish/{topic}"
    return problem


def _publish_error(error: BaseException) -> tuple[int, str]:
    text = printable(str(error))  # may repeat what a client sent: bounded
    if isinstance(error, (ValueError, TypeError)):
        return http.BAD_REQUEST, text
    if isinstance(error, TimeoutError):
        return http.GATEWAY_TIMEOUT, f"broker did not accept the message in time: {text}"
    return http.SERVICE_UNAVAILABLE, f"broker did not accept the message: {text}"


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


class _Root(Resource):
    def render_GET(self, request: Request) -> bytes:
        return _json(
            request,
            http.OK,
            {"endpoints": ["GET /healthz", "GET /stats", "GET /metrics", "POST /publish/{topic}"]},
        )

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self
        return _NotFound()


def _not_found(request: Request) -> bytes:
    path = printable(request.path.decode("utf-8", "replace"), TOPIC_TEXT_LIMIT)
    return _json(request, http.NOT_FOUND, {"error": f"no such endpoint: {path}"})


class _NotFound(_Leaf):
    def render(self, request: Request) -> bytes:
        return _not_found(request)


def make_site(
    server_factory: ServerFactory,
    broker: Any = None,
    ready: Optional[Callable[[], list[str]]] = None,
    max_body: int = DEFAULT_MAX_PUBLISH_BODY,
    max_topics: int = DEFAULT_MAX_TOPICS,
) -> Site:
    """A twisted.web Site serving the monitoring and publish endpoints.

    ``ready`` returns the names of parts not running yet (empty = healthy).
    ``max_topics`` bounds the topics (and the subscriptions) /stats and
    /metrics list one by one.

        site = make_site(factory, broker=broker)
    """

    def document() -> dict[str, Any]:
        return stats_document(server_factory, broker, max_topics=max_topics)

    root = _Root()
    root.putChild(b"healthz", Healthz(ready or (lambda: [])))
    root.putChild(b"stats", Stats(document))
    root.putChild(b"metrics", Metrics(document))
    root.putChild(b"publish", Publish(broker, max_body=max_body))
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
def access_log_line(timestamp: str, request: Any) -> str:
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
        self.open_connections: dict[Any, list[Deferred[None]]] = {}
        # Kinds are status classes chosen here, not peer text: at most a handful.
        self.access_limiter = LogLimiter(self.reactor, summary_to(self.access_log))

    def log(self, request: Any) -> None:
        """One access-log line, unless this status class had its burst this interval."""
        if self.access_limiter.allow(f"http {request.code // 100}xx"):
            super().log(request)

    def stopFactory(self) -> None:
        super().stopFactory()
        self.access_limiter.stop()  # pending summaries written, no timer left behind

    def buildProtocol(self, addr: Any) -> Any:
        proto = super().buildProtocol(addr)
        self.open_connections[proto] = []
        # The Site's protocol is Twisted's (private) proxy, which may swap the
        # HTTPChannel behind it for an h2 connection; wrapping this instance's
        # connectionLost is the one hook that sees every connection end, and
        # no public Site API offers one.
        lost = proto.connectionLost

        def connection_lost(reason: Any) -> None:
            waiters = self.open_connections.pop(proto, [])
            lost(reason)
            for waiter in waiters:
                waiter.callback(None)

        proto.connectionLost = connection_lost
        return proto

    def close_connections(self) -> "Deferred[Any]":
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

    def __init__(self, listen: str | int, site: Site, reactor: Any = None) -> None:
        super().__init__(listen, reactor)
        self.site = site

    def startService(self) -> Any:
        super().startService()
        # A failure is logged, and told to whoever waits in whenListening; not raised.
        return self._listen(self.site).addErrback(lambda _: None)

    def _listening(self, port: Any) -> None:
        self.log.info("pulsyflux HTTP API on http://{address}/", address=describe_address(port.getHost()))

    def stopService(self) -> Any:
        super().stopService()
        waits = []
        if self.port is not None:
            waits.append(maybeDeferred(self.port.stopListening))
            self.port = None
        close = getattr(self.site, "close_connections", None)
        if close is not None:
            waits.append(close())
        return DeferredList(waits)


def http_service(listen: str | int, broker_service: Any, reactor: Any = None) -> HTTPService:
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

    site = make_site(broker_service.factory, broker=broker_service if runs_broker else None, ready=not_running)
    return HTTPService(listen, site, reactor or broker_service.reactor)
