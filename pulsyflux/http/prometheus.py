"""The /metrics text: the stats document in Prometheus text format, labels escaped and bounded."""

from __future__ import annotations

import math
from typing import Any, Iterable

from ..wire.printable import printable
from .stats import OTHER_TOPICS

__all__ = ["LABEL_TEXT_LIMIT", "prometheus_text"]


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
        "Clients' requests handed to a provider.",
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
        "Responses (or provider errors) delivered to the client that asked (answers to pulsyflux_requests_routed_total).",
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
    c = document.get("cluster")
    if c is not None:
        _cluster_metrics(m, c)
    auth = s.get("auth")
    if auth is not None:
        m.family(
            "pulsyflux_auth_refusals_total",
            "counter",
            "Tokens and rights refused, by kind (expired, bad signature, unknown key, provide, publish...).",
            [({"kind": kind}, count) for kind, count in sorted(auth["refusals"].items())],
        )
        m.one("pulsyflux_auth_tokens_accepted_total", "counter", "Tokens accepted (first ones and refreshes).",
              auth["authenticated"])  # fmt: skip
        m.one("pulsyflux_auth_connections_with_token", "gauge", "Open connections holding a token.",
              auth["connections_with_token"])  # fmt: skip
    return m.text()


def _cluster_metrics(m: _Metrics, c: dict[str, Any]) -> None:
    """The link to the cluster's Redis (docs/cluster.md)."""
    m.one("pulsyflux_cluster_up", "gauge", "1 while the link to the cluster's Redis is up.", 1 if c["up"] else 0)
    if c.get("rtt_ms") is not None:
        m.one("pulsyflux_cluster_redis_rtt_seconds", "gauge", "The last PING round trip to Redis.", c["rtt_ms"] / 1000)
    for key, help_text in (
        ("sent", "Messages published here and shared through Redis."),
        ("received", "Messages other servers published, delivered here."),
        ("unshared", "Messages published here while the cluster link was down."),
        ("bad", "Messages on a cluster channel that were refused."),
        ("failed", "Publishes to Redis that the link lost."),
        ("reconnects", "Times the cluster link came back."),
    ):
        m.one(f"pulsyflux_cluster_{key}_total", "counter", help_text, c[key])
    if "requests_forwarded" not in c:
        return  # requests across servers start with the server (its node name may need its port)
    m.one("pulsyflux_cluster_nodes", "gauge", "Servers in the cluster, this one included.", c["nodes_count"])
    for key, help_text in (
        ("requests_forwarded", "Requests sent to a provider on another server."),
        ("requests_served", "Requests from other servers answered by a provider here."),
        ("requests_failed", "Requests sent to another server that failed here (link down, overloaded, server gone)."),
        ("requests_cancelled", "Requests sent to another server whose consumer gave up (that server was told)."),
        ("requests_refused_from_one", "Requests from another server refused: it held its share here already."),
        ("bad_inbox", "Messages in this server's inbox that were not ours to read."),
    ):
        m.one(f"pulsyflux_cluster_{key}_total", "counter", help_text, c.get(key, 0))
    for key, help_text in (
        ("requests_in_flight", "Requests sent to other servers, not answered yet."),
        ("requests_held", "Other servers' requests this server holds (arriving, or in its router)."),
        ("relays", "Channels held on other servers that this server relays to (one per server and channel)."),
    ):
        m.one(f"pulsyflux_cluster_{key}", "gauge", help_text, c.get(key, 0))


# The broker's counters, in the order they are exposed: (stats key, help text);
# lost and rejected are absent from documents of older brokers (0).
_BROKER_COUNTERS = (
    ("published", "Messages the broker accepted from publishers (any client, Go ones too)."),
    ("delivered", "Messages subscribers accepted (one per subscriber)."),
    ("dropped", "Messages dropped because a subscriber's backlog was full (it read too slowly)."),
    ("lost", "Messages queued for subscribers whose connection vanished."),
    ("rejected", "Publish requests the broker refused as malformed."),
)


def _broker_metrics(m: _Metrics, b: dict[str, Any]) -> None:
    for key, help_text in _BROKER_COUNTERS:
        m.one(f"pulsyflux_broker_{key}_total", "counter", help_text, b.get(key, 0))
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
    m.one(
        "pulsyflux_broker_requeued_total",
        "counter",
        "Messages a leaving queue group member had not taken, given to another member.",
        b.get("requeued", 0),
    )
    m.family(
        "pulsyflux_broker_group_members",
        "gauge",
        "Members per queue group (the largest groups, as in /stats).",
        [
            ({"topic": str(g.get("topic", "")), "group": str(g.get("group", ""))}, g.get("members", 0))
            for g in sorted(b.get("groups", []), key=lambda g: (str(g.get("topic")), str(g.get("group"))))
        ],
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
