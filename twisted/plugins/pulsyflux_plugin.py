"""Makes ``twistd pulsyflux`` run the pulsyflux server (and broker).

Kept tiny: twistd imports every plugin module to list them, so the real
work lives in :mod:`pulsyflux.service`.
"""

from twisted.application.service import ServiceMaker

pulsyflux = ServiceMaker(
    "pulsyflux",
    "pulsyflux.service",
    "Request/response router and pub/sub broker (Go pulsyflux wire format).",
    "pulsyflux",
)
