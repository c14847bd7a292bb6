"""The /stats document as a short human-readable report (``pulsyflux stats``)."""

from __future__ import annotations

from typing import Any

from ..wire.printable import printable

__all__ = ["format_stats", "format_info", "plural"]


# Topics and error texts in `pulsyflux stats`: at most this many characters each.
_STATS_TEXT_LIMIT = 200


def format_stats(document: dict[str, Any]) -> list[str]:
    """The /stats document as a short human-readable report."""
    s = document["server"]
    roles = s["connections"]["by_role"]
    lines = [
        f"uptime          {_duration(s['uptime_seconds'])}",
        f"connections     {s['connections']['open']} open ({plural(roles.get('consumer', 0), 'consumer')}, "
        f"{plural(roles.get('provider', 0), 'provider')}, {roles.get('unregistered', 0)} unregistered), "
        f"{s['connections']['total']} since start"
        f"{_broker_connections(roles)}",
        f"channels        {s['channels']['count']}{_channel_detail(s['channels'])}",
        f"requests        {s['requests']['routed']} routed, {s['requests']['responses_routed']} answered, "
        f"{s['requests']['in_flight']} in flight",
        *_latency(s["requests"].get("latency")),
        f"bytes           {_size(s['bytes']['in'])} in, {_size(s['bytes']['out'])} out",
        f"dropped frames  {s['frames_dropped']}",
    ]
    errors = s.get("errors") or {}
    if errors:
        lines.append("errors")
        for message, count in sorted(errors.items(), key=lambda item: -_number(item[1])):
            lines.append(f"  {str(count):>8}  {printable(str(message), _STATS_TEXT_LIMIT)}")
    else:
        lines.append("errors          none")
    b = document.get("broker")
    if b is None:
        lines.append("broker          not running in this server")
        return lines
    lines.append(f"broker          {b['published']} published, {b['delivered']} delivered, {b['dropped']} dropped")
    topics = b.get("topics") or {}
    other = b.get("other_topics") or {}
    if topics:
        lines.append("topics")
        for topic, count in sorted(topics.items()):
            lines.append(f"  {printable(str(topic), _STATS_TEXT_LIMIT)}  {plural(count, 'subscriber')}")
        if other.get("topics"):
            lines.append(
                f"  ({plural(other['topics'], 'more topic')}, {plural(other.get('subscribers', 0), 'subscriber')})"
            )
    groups = b.get("groups") or []
    if groups:
        lines.append("queue groups")
        for g in groups:
            lines.append(
                f"  {printable(str(g.get('topic', '')), _STATS_TEXT_LIMIT)}  "
                f"{printable(str(g.get('group', '')), _STATS_TEXT_LIMIT)}  {plural(int(_number(g.get('members'))), 'member')}"
            )
        if b.get("groups_count", len(groups)) > len(groups):
            lines.append(f"  ({plural(b['groups_count'] - len(groups), 'more group')})")
    subs = b.get("subscriptions") or []
    if subs:
        lines.append("subscriptions (slowest first)")
        for sub in sorted(subs, key=lambda sub: -_number(sub.get("backlog")) - _number(sub.get("in_flight"))):
            # Never a channel id: it is the subscriber's secret (older servers sent it).
            label = f"{printable(str(sub['id']), 32)}  " if "id" in sub else ""
            lines.append(
                f"  {label}{printable(str(sub.get('topic', '')), _STATS_TEXT_LIMIT)}{_in_group(sub)}  "
                f"backlog {sub.get('backlog', 0)}  "
                f"in flight {sub.get('in_flight', 0)}  delivered {sub.get('delivered', 0)}  "
                f"dropped {sub.get('dropped', 0)}"
            )
        listed = b.get("subscriptions_count", len(subs))
        if listed > len(subs):
            lines.append(f"  ({plural(listed - len(subs), 'more subscription')})")
    return lines


def _latency(latency: object) -> list[str]:
    """Clients' request latency as quantiles read off the histogram's buckets (upper bounds)."""
    if not isinstance(latency, dict) or not latency.get("count"):
        return []
    count = int(_number(latency["count"]))
    buckets = [(bound, int(_number(n))) for bound, n in (latency.get("buckets") or {}).items()]

    def upto(share: float) -> str:
        for bound, n in buckets:
            if n >= share * count:
                return "over 10 s" if bound == "+Inf" else f"<= {_seconds(float(bound))}"
        return "?"

    mean = _number(latency.get("sum_seconds")) / count
    return [f"latency         mean {_seconds(mean)}, p50 {upto(0.5)}, p99 {upto(0.99)} ({plural(count, 'request')})"]


def _seconds(value: float) -> str:
    return f"{value * 1000:.2f} ms" if value < 1 else f"{value:.2f} s"


def _broker_connections(roles: dict[str, Any]) -> str:
    count = roles.get("broker")
    relays = roles.get("cluster relay")
    return (f"; {plural(count, 'connection')} of the server's own broker" if count else "") + (
        f"; {plural(relays, 'cluster relay')}" if relays else ""
    )


def format_info(document: dict[str, Any]) -> list[str]:
    """Who the server is, its limits and its busiest connections (``pulsyflux info``)."""
    s = document["server"]
    conns = s["connections"]
    roles = conns.get("by_role", {})
    lines = [
        f"version         pulsyflux {printable(str(s.get('version', '?')), 40)}",
        f"pid             {s.get('pid', '?')}",
        f"uptime          {_duration(s['uptime_seconds'])}",
    ]
    if s.get("rss_bytes") is not None:
        files = f" of {s['max_fds']}" if s.get("max_fds") else ""
        lines.append(
            f"process         {_size(s['rss_bytes'])} resident, {s.get('open_fds', '?')} open files{files}, "
            f"{_number(s.get('cpu_seconds')):.2f} s CPU"
        )
    lines.append(
        f"connections     {conns['open']} open ({plural(roles.get('consumer', 0), 'consumer')}, "
        f"{plural(roles.get('provider', 0), 'provider')}, {roles.get('unregistered', 0)} unregistered), "
        f"{conns['total']} since start{_broker_connections(roles)}"
    )
    limits = s.get("limits") or {}
    if limits:
        lines.append("limits")
        for name, value in sorted(limits.items()):
            if isinstance(value, int) and any(word in name for word in ("body", "bytes", "unsent", "payload")):
                shown = _size(value)
            elif "timeout" in name:
                shown = f"{_number(value):.1f} s"
            else:
                shown = str(value)
            lines.append(f"  {printable(str(name), 40):<20}{shown}")
    listed = conns.get("list") or []
    if listed:
        lines.append("connections (busiest first)")
        lines.append(f"  {'remote':<22}{'role':<14}{'age':>9}{'in':>11}{'out':>11}{'frames in':>11}{'frames out':>11}")
        for conn in listed[:_INFO_CONNECTIONS]:
            lines.append(
                f"  {printable(str(conn.get('remote', '?')), 21):<22}{printable(str(conn.get('role', '?')), 13):<14}"
                f"{_duration(_number(conn.get('age_seconds'))):>9}{_size(int(_number(conn.get('bytes_in')))):>11}"
                f"{_size(int(_number(conn.get('bytes_out')))):>11}{int(_number(conn.get('frames_in'))):>11}"
                f"{int(_number(conn.get('frames_out'))):>11}"
            )
        more = len(listed) - _INFO_CONNECTIONS + int(_number(conns.get("omitted")))
        if more > 0:
            lines.append(f"  ({plural(more, 'more connection')}; all listed ones in pulsyflux stats --json)")
    cluster = document.get("cluster")
    if isinstance(cluster, dict):
        lines.extend(_cluster_lines(cluster))
    return lines


def _count(document: dict[str, Any], key: str) -> int:
    return int(_number(document.get(key)))


def _cluster_lines(c: dict[str, Any]) -> list[str]:
    """The server's place in its cluster (docs/cluster.md), from the stats document's ``cluster``."""
    if c.get("up"):
        rtt = c.get("rtt_ms")
        link = "up" + (f", Redis round trip {_number(rtt):.2f} ms" if rtt is not None else "")
    else:
        error = c.get("last_error")
        link = "DOWN" + (f" ({printable(str(error), _STATS_TEXT_LIMIT)})" if error else "")
    lines = [
        f"cluster         node {printable(str(c.get('node', '?')), _STATS_TEXT_LIMIT)}, "
        f"{printable(str(c.get('redis', '?')), _STATS_TEXT_LIMIT)}, link {link}",
        f"  link          {plural(int(_number(c.get('reconnects'))), 'reconnect')}, "
        f"{plural(int(_number(c.get('downs'))), 'outage')}",
    ]
    if "nodes_count" in c:
        nodes = c.get("nodes")
        others = [printable(str(node), 40) for node in nodes] if isinstance(nodes, list) else []
        count = int(_number(c.get("nodes_count")))
        shown = ", ".join(others[:10]) + (", ..." if len(others) > 10 or count - 1 > len(others) else "")
        lines.append(f"  nodes         {count} (this one{', ' + shown if shown else ''})")
    lines.append(
        f"  pub/sub       {_count(c, 'sent')} sent, {_count(c, 'received')} received, "
        f"{_count(c, 'unshared')} unshared, {_count(c, 'bad')} refused, {_count(c, 'failed')} failed"
        f"{', firehose on' if c.get('firehose') else ''}"
    )
    if "requests_forwarded" in c:
        lines.append(
            f"  requests      {_count(c, 'requests_forwarded')} forwarded, {_count(c, 'requests_served')} served, "
            f"{_count(c, 'requests_failed')} failed, {_count(c, 'requests_in_flight')} in flight; "
            f"{plural(int(_number(c.get('relays'))), 'relay')}, "
            f"{_count(c, 'channels_held')} channels here, {_count(c, 'channels_elsewhere')} elsewhere"
        )
    return lines


# Connections `pulsyflux info` lists (the busiest).
_INFO_CONNECTIONS = 20


def _in_group(sub: dict[str, Any]) -> str:
    group = sub.get("group")
    return f" (group {printable(str(group), _STATS_TEXT_LIMIT)})" if group is not None else ""


def _channel_detail(channels: dict[str, Any]) -> str:
    if "with_providers" not in channels:
        return ""
    return f" ({channels['with_providers']} with a provider, {channels.get('without_provider', 0)} without)"


def _number(value: object) -> float:
    return value if isinstance(value, (int, float)) else 0


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"
