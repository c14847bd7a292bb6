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
    from .prometheus import prometheus_text
    from .resources import HEADER_PREFIX
    from .site import HTTPService, http_service, make_site
    from .stats import server_stats as server_stats
    from .stats import stats_document

__all__ = ["HEADER_PREFIX", "HTTPService", "http_service", "make_site", "prometheus_text", "stats_document"]

# Submodule -> the public names it defines.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "stats": "stats_document server_stats",
        "prometheus": "prometheus_text",
        "resources": "HEADER_PREFIX",
        "site": "make_site HTTPService http_service",
    },
)
