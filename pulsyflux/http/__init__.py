"""The HTTP monitoring and publish API (twisted.web), off unless asked for.

``twistd -n pulsyflux --http 8222`` serves, next to the router:

* ``GET /healthz`` - 200 ``{"status": "ok"}`` once the server (and broker) run;
* ``GET /stats`` - every counter as one JSON document (``stats_document``);
* ``GET /metrics`` - the same counters in Prometheus text format;
* ``POST /publish/{topic}`` - publish the body through the broker.

    site = make_site(server_factory, broker=broker)
    HTTPService("8222", site).setServiceParent(application)

One idea per module: ``stats`` (the stats document), ``prometheus`` (its
text format), ``resources`` (the twisted.web resources) and ``site`` (the
site, its access log and the service). The names below are imported on
first use (PEP 562).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:  # the names for type checkers and IDEs; at run time, __getattr__
    from .stats import DEFAULT_MAX_CONNECTIONS_LISTED as DEFAULT_MAX_CONNECTIONS_LISTED
    from .stats import DEFAULT_MAX_PUBLISH_BODY as DEFAULT_MAX_PUBLISH_BODY
    from .stats import DEFAULT_MAX_TOPICS as DEFAULT_MAX_TOPICS
    from .stats import HEADER_PREFIX, HTTPService, http_service, make_site, prometheus_text, stats_document
    from .stats import JSON_TYPE as JSON_TYPE
    from .stats import LABEL_TEXT_LIMIT as LABEL_TEXT_LIMIT
    from .stats import OTHER_TOPICS as OTHER_TOPICS
    from .stats import PROMETHEUS_TYPE as PROMETHEUS_TYPE
    from .stats import TOPIC_TEXT_LIMIT as TOPIC_TEXT_LIMIT
    from .stats import Healthz as Healthz
    from .stats import Metrics as Metrics
    from .stats import Publish as Publish
    from .stats import PulsyfluxSite as PulsyfluxSite
    from .stats import Stats as Stats
    from .stats import access_log_line as access_log_line
    from .stats import broker_stats as broker_stats
    from .stats import latency_stats as latency_stats
    from .stats import process_stats as process_stats
    from .stats import server_limits as server_limits
    from .stats import server_stats as server_stats

# Public name -> the submodule that defines it.
_LAZY = {
    "HEADER_PREFIX": "stats",
    "JSON_TYPE": "stats",
    "PROMETHEUS_TYPE": "stats",
    "DEFAULT_MAX_PUBLISH_BODY": "stats",
    "DEFAULT_MAX_TOPICS": "stats",
    "DEFAULT_MAX_CONNECTIONS_LISTED": "stats",
    "process_stats": "stats",
    "server_limits": "stats",
    "latency_stats": "stats",
    "server_stats": "stats",
    "broker_stats": "stats",
    "stats_document": "stats",
    "TOPIC_TEXT_LIMIT": "stats",
    "OTHER_TOPICS": "stats",
    "LABEL_TEXT_LIMIT": "stats",
    "prometheus_text": "stats",
    "Healthz": "stats",
    "Stats": "stats",
    "Metrics": "stats",
    "Publish": "stats",
    "make_site": "stats",
    "access_log_line": "stats",
    "PulsyfluxSite": "stats",
    "HTTPService": "stats",
    "http_service": "stats",
}

__all__ = [
    "HEADER_PREFIX",
    "HTTPService",
    "http_service",
    "make_site",
    "prometheus_text",
    "stats_document",
]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
