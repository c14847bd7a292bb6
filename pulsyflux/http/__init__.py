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
    from .prometheus import LABEL_TEXT_LIMIT as LABEL_TEXT_LIMIT
    from .prometheus import prometheus_text
    from .resources import DEFAULT_MAX_PUBLISH_BODY as DEFAULT_MAX_PUBLISH_BODY
    from .resources import HEADER_PREFIX
    from .resources import JSON_TYPE as JSON_TYPE
    from .resources import PROMETHEUS_TYPE as PROMETHEUS_TYPE
    from .resources import Healthz as Healthz
    from .resources import Metrics as Metrics
    from .resources import Publish as Publish
    from .resources import Root as Root
    from .resources import Stats as Stats
    from .site import HTTPService, http_service, make_site
    from .site import PulsyfluxSite as PulsyfluxSite
    from .site import access_log_line as access_log_line
    from .site import log as log
    from .stats import DEFAULT_MAX_CONNECTIONS_LISTED as DEFAULT_MAX_CONNECTIONS_LISTED
    from .stats import DEFAULT_MAX_TOPICS as DEFAULT_MAX_TOPICS
    from .stats import OTHER_TOPICS as OTHER_TOPICS
    from .stats import TOPIC_TEXT_LIMIT as TOPIC_TEXT_LIMIT
    from .stats import broker_stats as broker_stats
    from .stats import latency_stats as latency_stats
    from .stats import process_stats as process_stats
    from .stats import server_limits as server_limits
    from .stats import server_stats as server_stats
    from .stats import stats_document

# Public name -> the submodule that defines it.
_LAZY = {
    "DEFAULT_MAX_TOPICS": "stats",
    "DEFAULT_MAX_CONNECTIONS_LISTED": "stats",
    "TOPIC_TEXT_LIMIT": "stats",
    "OTHER_TOPICS": "stats",
    "process_stats": "stats",
    "server_limits": "stats",
    "latency_stats": "stats",
    "server_stats": "stats",
    "broker_stats": "stats",
    "stats_document": "stats",
    "LABEL_TEXT_LIMIT": "prometheus",
    "prometheus_text": "prometheus",
    "log": "site",
    "HEADER_PREFIX": "resources",
    "JSON_TYPE": "resources",
    "PROMETHEUS_TYPE": "resources",
    "DEFAULT_MAX_PUBLISH_BODY": "resources",
    "Healthz": "resources",
    "Stats": "resources",
    "Metrics": "resources",
    "Publish": "resources",
    "Root": "resources",
    "make_site": "site",
    "access_log_line": "site",
    "PulsyfluxSite": "site",
    "HTTPService": "site",
    "http_service": "site",
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
