"""The /stats document: every counter of the server and the broker, bounded whatever the peers do.

Everything reads live objects in this process (the server factory, the
broker); nothing here keeps counters of its own except HTTP ones.
"""

from __future__ import annotations

import heapq
import math
import re
import sys
import time
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any, Optional, Protocol

from ..server.protocol import ServerFactory
from ..server.router import LatencyHistogram
from ..wire.codec import MAX_PAYLOAD

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from ..broker.history import History
    from ..wire.messages import Position


__all__ = [
    "DEFAULT_MAX_TOPICS",
    "DEFAULT_MAX_CONNECTIONS_LISTED",
    "process_stats",
    "server_limits",
    "latency_stats",
    "server_stats",
    "broker_stats",
    "stats_document",
    "HTTPBroker",
    "TOPIC_TEXT_LIMIT",
    "OTHER_TOPICS",
]


class HTTPBroker(Protocol):
    """What the HTTP API uses of a broker: a :class:`~pulsyflux.broker.Broker`, or a
    :class:`~pulsyflux.service.BrokerService` (which waits for its broker); named by
    shape, as http/ must not import the service (which imports http/)."""

    history: Optional[History]

    def publish(
        self, topic: str, payload: bytes = ..., headers: Optional[dict[str, str]] = ..., timeout: float = ...
    ) -> Deferred[Optional[Position]]: ...

    def stats(self) -> dict[str, Any]: ...


# Topics shown one by one in /stats and /metrics (the most subscribed first;
# the rest are summed): anyone can create topics, and a scrape must not grow
# with them.
DEFAULT_MAX_TOPICS = 50
# Connections listed one by one in /stats (the busiest; the rest are counted in
# ``connections.omitted``): a scrape must not grow with the clients.
DEFAULT_MAX_CONNECTIONS_LISTED = 100
# Topic names in the stats and metrics: at most this many characters.
TOPIC_TEXT_LIMIT = 200
# The series all topics past the ``max_topics`` most subscribed share. Topics
# under the broker's reserved prefix can never be published to, so no real
# topic is shown under this name.
OTHER_TOPICS = "$pulsyflux/other"
_SURROGATES = re.compile("[\ud800-\udfff]")


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


def latency_stats(histogram: LatencyHistogram) -> dict[str, Any]:
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
        "auth": router.gate.stats() if router.gate is not None else None,  # refusals by kind (--auth)
        "recent_errors": list(stats.recent_errors),  # the last few texts, short and printable
        "bytes": {"in": stats.bytes_in, "out": stats.bytes_out},
    }


def broker_stats(broker: Optional[HTTPBroker], max_topics: int = DEFAULT_MAX_TOPICS) -> Optional[dict[str, Any]]:
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
    factory: ServerFactory,
    broker: Optional[HTTPBroker] = None,
    now: Optional[float] = None,
    max_topics: int = DEFAULT_MAX_TOPICS,
) -> dict[str, Any]:
    """What ``GET /stats`` returns: ``{"server": {...}, "broker": {...} or None}``."""
    document = {"server": server_stats(factory, now), "broker": broker_stats(broker, max_topics)}
    cluster = getattr(broker, "cluster", None)  # a BrokerService with --cluster
    if cluster is not None:
        document["cluster"] = cluster.stats()
    return document


def _topic_text(topic: object) -> str:
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


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0
