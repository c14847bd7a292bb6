"""CPython's cyclic garbage collector, set for a server process.

A server keeps tens of objects per connection and per subscription for as
long as they last, and every forward or request in flight makes a few more
that live until its answer comes back. With CPython's default thresholds
(700, 10, 10) the objects in flight of a large fan-out survive two young
collections, are promoted to the oldest generation, and soon make up the
quarter of it that triggers a full collection, which walks every object of
every connection: with 10,000 subscriptions the server spent 30 µs of CPU
per delivery instead of 1 µs (``pulsyflux bench capacity``, docs/performance.md).

:data:`SERVER_THRESHOLDS` collect the youngest generation every 100,000
allocations instead of 700, so what is in flight is mostly answered (and
freed by reference counting: the server's hot path makes no cycles) before
a collection looks at it, and the oldest generation every 100 collections
of the middle one instead of 10. Cyclic garbage still goes, later: at most
about 100,000 young objects wait for it.

``twistd pulsyflux`` (:func:`pulsyflux.service.makeService`) calls
:func:`tune_collector`; a program that embeds the server decides for itself
(it owns the process). PyPy's collector is generational with a
nursery already and is left alone.
"""

from __future__ import annotations

import gc
import platform

__all__ = ["SERVER_THRESHOLDS", "tune_collector"]

SERVER_THRESHOLDS = (100_000, 50, 100)


def tune_collector() -> bool:
    """Set the collector's thresholds for a long-running server; True if they were set (CPython)."""
    if platform.python_implementation() != "CPython":
        return False
    gc.set_threshold(*SERVER_THRESHOLDS)
    return True
