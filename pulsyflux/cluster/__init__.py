"""Several pulsyflux servers acting as one, through Redis (docs/cluster.md).

One idea per module: ``url`` (where Redis is), ``shape`` (which Redis
channel a topic travels on, and the envelope; Twisted-free), ``redis`` (the
Redis protocol on hiredis), ``link`` (the connections kept up, and whether
they are), ``pubsub`` (the broker's presence in the cluster).

Nothing here is imported unless ``--cluster`` is given, and the names
below only on first use (PEP 562): a server without a cluster needs
neither Redis nor hiredis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:  # the names for type checkers and IDEs; at run time, __getattr__
    from .link import ClusterDown, RedisLink
    from .pubsub import ClusterPubSub
    from .url import RedisAddress, RedisError, parse_redis_url

__all__ = ["ClusterDown", "ClusterPubSub", "RedisAddress", "RedisError", "RedisLink", "parse_redis_url"]

# Submodule -> the public names it defines.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {"link": "ClusterDown RedisLink", "pubsub": "ClusterPubSub", "url": "RedisAddress RedisError parse_redis_url"},
)
