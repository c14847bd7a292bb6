"""Pub/sub across servers: what is published here goes out through Redis, what other servers publish comes in.

The broker's :class:`~pulsyflux.broker.fanout.Fanout` delivers a publish
to its own subscribers first, then hands the accepted messages here; each
batch goes to Redis as one ``SPUBLISH`` per channel (shape.py says which).
Messages from other servers are fanned out to local subscribers exactly as
a local publish is, minus the publish rights (checked where the message
entered the cluster) and minus the trip back out.

Delivery across servers is at most once, in publish order per publishing
server and channel. While the link is down, local pub/sub works as ever,
messages published here are not shared (counted in ``unshared``) and
messages published elsewhere do not arrive: when the link is back, every
local subscription's ``gaps`` count goes up by one, as after any gap.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..wire.ratelimit import LogLimiter, shorten, summary_to
from .link import RedisLink
from .shape import (
    DEFAULT_PREFIX,
    EnvelopeError,
    Interest,
    batches,
    decode_envelope,
    encode_envelope,
    firehose,
    firehose_flag,
)

__all__ = ["ClusterPubSub"]

log = Logger()

# How long a server's wish for the firehose lasts in Redis unless renewed.
FIREHOSE_LEASE = 10.0
# Seconds between two looks at the firehose flag (and renewals of our own wish).
FIREHOSE_CHECK = 1.0


class FanoutLike(Protocol):
    """What the cluster needs of the broker's fan-out."""

    def deliver_from_cluster(self, body: bytes) -> int: ...

    def patterns(self) -> list[str]: ...

    def count_gaps(self) -> None: ...

    def groups(self) -> list[tuple[str, str]]: ...

    def deliver_group_here(self, pattern: str, group: str, here: bool) -> None: ...


class ClusterPubSub:
    """One server's pub/sub presence in the cluster."""

    def __init__(self, link: RedisLink, node: str, reactor: IReactorTime, *, prefix: str = DEFAULT_PREFIX) -> None:
        """``link``: the server's link to Redis, which hands this the messages of its channels."""
        self.node = node
        self.reactor = reactor
        self.prefix = prefix
        self.interest = Interest(prefix)
        self.link = link
        self.fanout: Optional[FanoutLike] = None
        # Told when a queue group appears or goes here (the cluster decides who delivers it).
        self.on_group: Optional[Callable[[str, str, bool], None]] = None
        self.firehose_channel = firehose(prefix)
        self._topic_prefix = (prefix + "m:").encode("utf-8")
        self.firehose_on = False  # some server wants the firehose: publishes are copied there
        self.sent = 0  # messages published to Redis
        self.received = 0  # messages from other servers delivered here (before fan-out)
        self.unshared = 0  # messages published here while the link was down
        self.bad = 0  # envelopes from Redis that were not ours to read
        self.failed = 0  # SPUBLISH that failed (the link went down under it)
        self._limiter = LogLimiter(reactor, summary_to(log))
        self.firehose_check = FIREHOSE_CHECK  # read by start(): a test sets it small before then
        self._flag_loop = LoopingCall(self._firehose_tick)
        self._flag_loop.clock = reactor
        self._was_down = False

    # -- life -----------------------------------------------------------------

    def start(self) -> None:
        self._flag_loop.start(self.firehose_check, now=False)

    def stop(self) -> None:
        if self._flag_loop.running:
            self._flag_loop.stop()

    def owns(self, channel: bytes) -> bool:
        """Whether a message on ``channel`` is pub/sub's (a topic channel or the firehose)."""
        return channel.startswith(self._topic_prefix) or channel == self.firehose_channel

    def attach(self, fanout: FanoutLike) -> None:
        """Serve ``fanout`` (a new broker after a restart gets the same cluster presence)."""
        old = self.interest
        self.interest = Interest(self.prefix)
        self.fanout = fanout
        for pattern in fanout.patterns():
            self.want(pattern)
        for pattern, group in fanout.groups():
            self.group_added(pattern, group)
        for channel in old.channels():
            if channel not in self.interest.counts:
                self.link.unsubscribe(channel)

    def detach(self, fanout: FanoutLike) -> None:
        if self.fanout is fanout:
            self.fanout = None

    # -- what the fan-out tells us --------------------------------------------

    def want(self, pattern: str) -> None:
        """A topic or pattern has its first local subscriber."""
        channel = self.interest.add(pattern)
        if channel is not None:
            self.link.subscribe(channel)
            if channel == self.firehose_channel:
                self._renew_firehose()

    def group_added(self, pattern: str, group: str) -> None:
        """A queue group has its first member here."""
        if self.on_group is not None:
            self.on_group(pattern, group, True)

    def group_removed(self, pattern: str, group: str) -> None:
        """A queue group has lost its last member here."""
        if self.on_group is not None:
            self.on_group(pattern, group, False)

    def unwant(self, pattern: str) -> None:
        """A topic or pattern has lost its last local subscriber."""
        channel = self.interest.remove(pattern)
        if channel is not None:
            self.link.unsubscribe(channel)

    def publish(self, items: list[tuple[str, str, Any, Any]]) -> None:
        """Messages accepted and delivered here: share them with the other servers."""
        link = self.link
        if not link.up:
            self.unshared += len(items)
            return
        groups = batches(self.prefix, ((item[0], item[1]) for item in items))
        copy = self.firehose_on
        for channel, texts in groups.items():
            link.execute(b"SPUBLISH", channel, encode_envelope(self.node, texts, copy)).addErrback(self._failed)
        if copy:
            texts = [item[1] for item in items]
            envelope = encode_envelope(self.node, texts, True)
            link.execute(b"SPUBLISH", self.firehose_channel, envelope).addErrback(self._failed)
        self.sent += len(items)

    # -- what Redis tells us --------------------------------------------------

    def message(self, channel: bytes, data: bytes) -> None:
        try:
            envelope = decode_envelope(data)
        except EnvelopeError as error:
            self.bad += 1
            if self._limiter.allow("bad envelope"):
                log.warn("cluster: ignored a message on {channel}: {e}", channel=shorten(channel), e=shorten(error))
            return
        if envelope.node == self.node:
            return  # ours, delivered here already
        if envelope.also_firehose and channel != self.firehose_channel and self.interest.wants_firehose:
            return  # the firehose brings this one too: take that copy only
        fanout = self.fanout
        if fanout is None:
            return
        try:
            self.received += fanout.deliver_from_cluster(envelope.body)
        except Exception as error:  # a message another server let through that ours refuses
            self.bad += 1
            if self._limiter.allow("undeliverable"):
                log.warn(
                    "cluster: a message from {node} was refused here: {e}",
                    node=shorten(envelope.node),
                    e=shorten(error),
                )

    def state(self, up: bool) -> None:
        if not up:
            self._was_down = True
            return
        if up and self.interest.wants_firehose:
            self._renew_firehose()
        if self._was_down and self.fanout is not None:
            self.fanout.count_gaps()  # messages published elsewhere meanwhile never came

    def _failed(self, failure: Failure) -> None:
        self.failed += 1
        if self._limiter.allow("publish failed"):
            log.warn("cluster: a publish did not reach Redis: {e}", e=shorten(failure.getErrorMessage()))

    # -- the firehose flag ----------------------------------------------------

    def _renew_firehose(self) -> None:
        if self.link.up:
            lease_ms = int(FIREHOSE_LEASE * 1000)
            self.link.execute(b"SET", firehose_flag(self.prefix), self.node, b"PX", lease_ms).addErrback(lambda _: None)

    def _firehose_tick(self) -> None:
        if not self.link.up:
            return
        if self.interest.wants_firehose:
            self._renew_firehose()
            self.firehose_on = True  # ours, at least: no need to ask
            return

        def seen(count: Any) -> None:
            self.firehose_on = bool(count)

        self.link.execute(b"EXISTS", firehose_flag(self.prefix)).addCallbacks(seen, lambda _: None)

    def stats(self) -> dict[str, Any]:
        return {
            "firehose": self.firehose_on,
            "sent": self.sent,
            "received": self.received,
            "unshared": self.unshared,
            "bad": self.bad,
            "failed": self.failed,
        }
