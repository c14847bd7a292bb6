"""One server's presence in the cluster: its link to Redis, pub/sub, the channel registry and request relays."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .link import RedisLink
from .pubsub import ClusterPubSub
from .registry import DEFAULT_LEASE, Registry
from .requests import ClusterRequests
from .shape import DEFAULT_PREFIX
from .url import RedisAddress

if TYPE_CHECKING:
    from ..server.protocol import ServerFactory

__all__ = ["Cluster"]

log = Logger()


class Cluster:
    """What ``twistd pulsyflux --cluster`` adds to a server (docs/cluster.md).

    The link hands each message to its owner by channel: topic channels and
    the firehose to pub/sub, registry announcements to the registry, this
    server's inbox to the request relays.
    """

    def __init__(
        self,
        address: RedisAddress,
        node: str,
        reactor: IReactorTime,
        factory: ServerFactory,
        *,
        prefix: str = DEFAULT_PREFIX,
        lease: float = DEFAULT_LEASE,
    ) -> None:
        self.node = node
        self.reactor = reactor
        self.factory = factory
        self.prefix = prefix
        self.lease = lease
        self.link = RedisLink(
            address, reactor, self._message, self._state, ping_timeout=max(lease, 1.0), after_read=self._after_read
        )
        self.pubsub = ClusterPubSub(self.link, node, reactor, prefix=prefix)
        self.requests: Optional[ClusterRequests] = None  # from start()
        self.registry: Optional[Registry] = None
        self._inbox = b""
        self._local_groups: dict[bytes, tuple[str, str]] = {}  # "pattern\0group" -> (pattern, group)
        self.pubsub.on_group = self._group

    def start(self) -> None:
        """Start once the node has its name (the default one has the listening port in it)."""
        self.pubsub.node = self.node
        requests = self.requests = ClusterRequests(self.link, self.node, self.factory, self.reactor, prefix=self.prefix)
        registry = self.registry = Registry(
            self.link, self.node, self.reactor, requests.gain, requests.lose, prefix=self.prefix,
            lease=self.lease, on_groups=self._place_groups, on_gone=requests.gone,
        )  # fmt: skip
        self.pubsub.on_group = self._group
        for key in self._local_groups:
            registry.hold_group(key)
        self._inbox = requests.inbox(self.node)
        self.link.subscribe(self._inbox)
        router = self.factory.router
        for channel in router.watch_channels(self._channel):
            registry.hold(channel)
        registry.start()
        self.pubsub.start()
        self.link.start()

    def _channel(self, channel: bytes, held: bool) -> None:
        registry, requests = self.registry, self.requests
        assert registry is not None and requests is not None  # the router tells only once start() watches
        if held:
            registry.hold(channel)
        else:
            registry.release(channel)
            requests.release(channel)

    # -- queue groups: one server of those with members delivers each group --

    def _group(self, pattern: str, group: str, added: bool) -> None:
        key = pattern.encode("utf-8") + b"\0" + group.encode("utf-8")
        if added:
            self._local_groups[key] = (pattern, group)
            if self.registry is not None:
                self.registry.hold_group(key)
            self._place_groups()
        else:
            self._local_groups.pop(key, None)
            if self.registry is not None:
                self.registry.release_group(key)

    def _place_groups(self) -> None:
        """Each group of ours is delivered here only if this server comes first by name among
        the live servers with members of it (so one member in the cluster gets each message)."""
        fanout = self.pubsub.fanout
        if fanout is None:
            return
        remote = self.registry.remote_groups if self.registry is not None else {}
        for key, (pattern, group) in self._local_groups.items():
            first = min([self.node, *(node for node, keys in remote.items() if key in keys)])
            fanout.deliver_group_here(pattern, group, first == self.node)

    def _message(self, channel: bytes, data: bytes) -> None:
        if channel == self._inbox:
            self.requests.message(data)  # type: ignore[union-attr]  # the inbox is subscribed by start(), after it
        elif self.pubsub.owns(channel):
            self.pubsub.message(channel, data)
        elif self.registry is not None and channel == self.registry.announcements:
            self.registry.message(data)

    def _after_read(self) -> None:
        if self.requests is not None:
            self.requests.settle()  # what the read's requests and answers handed to the router goes out

    def _state(self, up: bool) -> None:
        self.pubsub.state(up)
        if self.registry is not None:
            self.registry.state(up)

    async def stop(self) -> None:
        self.factory.router.watch_channels(None)
        self.pubsub.stop()
        if self.requests is not None:
            self.requests.stop()
        if self.registry is not None:
            leaving = self.registry.stop()
            if leaving is not None:
                await leaving
        await self.link.stop()

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"node": self.node, **self.link.stats(), **self.pubsub.stats()}
        if self.requests is not None:
            stats.update(self.requests.stats())
            stats.update(self.registry.stats())  # type: ignore[union-attr]  # made with requests, by start()
        return stats
