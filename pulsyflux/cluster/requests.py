"""Requests across servers: a consumer here reaches providers on other servers.

For every channel another server holds (registry.py), this server runs a
*relay*: an in-process Provider registered on that channel, so the router
takes it in its round-robin beside the local providers (one turn per
other server holding the channel). A request the relay receives goes to
that server's inbox channel on Redis (``<prefix>n:<node>``) in chunks of
at most 512 KiB; there an in-process Consumer sends it to a local provider
(never to a relay: the router keeps relayed requests on their server), and
the answer comes back the same way. The deadline stays where the request
entered: the router there answers the consumer when it expires.

Memory is bounded on both sides: requests in flight per server, bytes
being forwarded out and bytes being reassembled in (past either, a clear
``server overloaded`` error), and no body larger than the server's
``--max-body``. A server that leaves the registry (its lease expired,
its link to Redis down) takes its relays with it, and its requests in
flight fail with ``peer disappeared``.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..client import Consumer, Provider
from ..server.inproc import InProcessEndpoint
from ..wire import errors
from ..wire.codec import MAX_ERROR_TEXT, bound_error_text
from ..wire.ratelimit import LogLimiter, shorten, summary_to
from .link import ClusterDown, RedisLink

__all__ = ["ClusterRequests", "Relayed"]

log = Logger()

CHUNK = 512 * 1024  # bytes of a body per Redis message
MAX_IN_FLIGHT = 10_000  # requests this server forwards at once
MAX_OUT_BYTES = 256 << 20  # bytes of bodies being forwarded at once
MAX_IN_BYTES = 256 << 20  # bytes of other servers' requests and answers being reassembled here
RELAY_TIMEOUT = 300.0  # seconds a relayed request may wait for its answer (the real deadline is the consumer's)
INCOMPLETE_TIMEOUT = 30.0  # seconds the rest of a request in pieces may take to arrive before its pieces go


class Relayed(Exception):
    """An answer from another server's router or provider, repeated word for word here."""


class _Out:
    __slots__ = ("deferred", "node", "size", "parts", "received", "born")

    def __init__(self, deferred: Deferred[bytes], node: str, size: int, born: int) -> None:
        self.deferred = deferred
        self.node = node
        self.size = size
        self.parts: list[bytes] = []
        self.received = 0
        self.born = born  # the sweep it was sent in (one timer for all: see _sweep)


class _In:
    """A request from another server still arriving in pieces."""

    __slots__ = ("parts", "size", "timer")

    def __init__(self, timer: Any) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.timer = timer


class ClusterRequests:
    """Relays for the channels other servers hold; this server's inbox for theirs."""

    def __init__(self, link: RedisLink, node: str, factory: Any, reactor: Any, *, prefix: str) -> None:
        self.link = link
        self.node = node
        self.factory = factory
        self.router = factory.router
        self.reactor = reactor
        self.prefix = prefix
        self.max_body = getattr(self.router, "max_body", 64 << 20)
        self.relays: dict[tuple[str, bytes], Deferred[Provider]] = {}
        self.relayed_by_channel: dict[bytes, int] = {}
        self.relays_by_node: dict[str, int] = {}
        self.consumers: dict[bytes, Deferred[Consumer]] = {}
        self.ready: dict[bytes, Consumer] = {}  # the relay Consumers connected, by channel
        self.out: dict[bytes, _Out] = {}
        self.out_bytes = 0
        self.incoming: dict[tuple[str, bytes], _In] = {}  # requests in pieces, (origin, rid)
        self.serving: dict[tuple[str, bytes], Deferred[Any]] = {}  # requests sent to a local provider
        self.incomplete_timeout = INCOMPLETE_TIMEOUT
        self.in_bytes = 0
        self.forwarded = 0  # requests sent to other servers
        self.served = 0  # requests other servers sent here, answered
        self.failed = 0  # forwarded requests that failed here (link down, overloaded, server gone)
        self.bad = 0  # inbox messages that were not ours to read
        self.cancelled = 0  # forwarded requests whose consumer gave up (deadline, left): the other server told
        self._limiter = LogLimiter(reactor, summary_to(log))
        # Request ids: unique within this process's life (the registry tells a restart apart).
        self._rid_prefix = os.urandom(4).hex().encode("ascii")
        self._rids = itertools.count(1)
        self._sweeps = 0
        self._sweeper: Any = None
        self._endpoint = InProcessEndpoint(factory, reactor, label="cluster")

    def inbox(self, node: str) -> bytes:
        return f"{self.prefix}n:{node}".encode()

    # -- relays (registry callbacks) ------------------------------------------

    def gain(self, node: str, channel: bytes) -> None:
        """``node`` holds ``channel``: relay to it from here."""
        key = (node, channel)
        if key in self.relays:
            return
        count = self.relayed_by_channel.get(channel, 0)
        self.relayed_by_channel[channel] = count + 1
        self.relays_by_node[node] = self.relays_by_node.get(node, 0) + 1
        self.router.relayed.add(channel)

        inbox = self.inbox(node)
        head = b"q " + self.node.encode("utf-8") + b" "
        tail = b" " + channel.hex().encode("ascii")

        def handler(body: bytes) -> Deferred[bytes]:
            return self.forward(node, channel, body, inbox, head, tail)

        d = Provider.connect(self._endpoint, channel, handler=handler, reactor=self.reactor)
        d.addCallbacks(_cancelling, self._relay_failed, errbackArgs=(key,))
        self.relays[key] = d

    def _relay_failed(self, failure: Any, key: tuple[str, bytes]) -> None:
        if self.relays.get(key) is not None:
            self._drop_relay(key)
        if self._limiter.allow("relay failed"):
            log.warn(
                "cluster: cannot relay a channel to {node}: {e}",
                node=shorten(key[0]),
                e=shorten(failure.getErrorMessage()),
            )

    def lose(self, node: str, channel: bytes) -> None:
        """``node`` holds ``channel`` no more (or is gone): its relay goes, its requests fail."""
        if (node, channel) in self.relays:
            self._drop_relay((node, channel))
        if node not in self.relays_by_node:  # its last relay: what was sent there will not come back
            for rid in [rid for rid, entry in self.out.items() if entry.node == node]:
                self._finish(rid, Relayed(errors.MSG_PEER_DISAPPEARED))

    def gone(self, node: str) -> None:
        """``node`` left the cluster (or restarted): what it sent here and was not answered goes."""
        for key in [key for key in self.incoming if key[0] == node]:
            self._drop_incoming(key)
        for key in [key for key in self.serving if key[0] == node]:
            self.serving.pop(key).cancel()  # nobody there waits for the answer
        for rid in [rid for rid, entry in self.out.items() if entry.node == node]:
            self._finish(rid, Relayed(errors.MSG_PEER_DISAPPEARED))

    def _drop_relay(self, key: tuple[str, bytes]) -> None:
        d = self.relays.pop(key)
        node, channel = key
        left = self.relays_by_node.get(node, 1) - 1
        if left:
            self.relays_by_node[node] = left
        else:
            self.relays_by_node.pop(node, None)
        count = self.relayed_by_channel.get(channel, 1) - 1
        if count:
            self.relayed_by_channel[channel] = count
        else:
            self.relayed_by_channel.pop(channel, None)
            self.router.relayed.discard(channel)
        d.addCallback(lambda provider: provider.close()).addErrback(lambda _: None)

    # -- forwarding out -------------------------------------------------------

    def forward(
        self, node: str, channel: bytes, body: bytes, inbox: bytes = b"", head: bytes = b"", tail: bytes = b""
    ) -> Deferred[bytes]:
        """Send one request to ``node``; fires with its answer, or fails with the error to repeat.

        ``inbox``, ``head``, ``tail``: ``node``'s inbox and the header around the
        request id, computed once per relay rather than per request.
        """
        if not self.link.up:
            self.failed += 1
            return fail(ClusterDown(errors.MSG_PEER_DISAPPEARED))  # the link is down: as if the server went
        if len(self.out) >= MAX_IN_FLIGHT or self.out_bytes + len(body) > MAX_OUT_BYTES:
            self.failed += 1
            return fail(Relayed(errors.overloaded("too many requests in flight to other servers")))
        rid = b"%s%x" % (self._rid_prefix, next(self._rids))
        d: Deferred[bytes] = Deferred(lambda _: self._cancel(rid))
        self.out[rid] = _Out(d, node, len(body), self._sweeps)
        self.out_bytes += len(body)
        if self._sweeper is None:
            self._sweeper = self.reactor.callLater(RELAY_TIMEOUT / 2, self._sweep)
        if not head:
            inbox = self.inbox(node)
            head = b"q " + self.node.encode("utf-8") + b" "
            tail = b" " + channel.hex().encode("ascii")
        self._send_chunks(inbox, head + rid + tail, body)
        self.forwarded += 1
        return d

    def _sweep(self) -> None:
        """One timer for every request sent: an answer lost on the way fails within 1-1.5 x RELAY_TIMEOUT."""
        self._sweeper = None
        self._sweeps += 1
        oldest = self._sweeps - 3
        for rid in [rid for rid, entry in self.out.items() if entry.born <= oldest]:
            self._finish(rid, Relayed(errors.MSG_TIMED_OUT))
        if self.out:
            self._sweeper = self.reactor.callLater(RELAY_TIMEOUT / 2, self._sweep)

    def _send_chunks(self, inbox: bytes, head: bytes, body: bytes) -> None:
        send = self.link.send
        end = len(body)
        if end <= CHUNK:  # the common case: one piece
            send(b"SPUBLISH", inbox, head + b" 0\n" + body)
            return
        view = memoryview(body)
        start = 0
        while True:
            stop = min(start + CHUNK, end)
            more = b" 1\n" if stop < end else b" 0\n"
            send(b"SPUBLISH", inbox, head + more + view[start:stop])
            if stop >= end:
                return
            start = stop

    def _release(self, rid: bytes) -> Any:
        entry = self.out.pop(rid, None)
        if entry is None:
            return None
        self.out_bytes -= entry.size
        self.in_bytes -= entry.received
        return entry

    def _cancel(self, rid: bytes) -> None:
        """The consumer gave up (its deadline, it left: the router told the relay): free the
        request here and tell the other server, which stops waiting for its provider."""
        entry = self._release(rid)
        if entry is None:
            return
        self.cancelled += 1
        if self.link.up:
            head = b"c " + self.node.encode("utf-8") + b" " + rid + b" -"
            self._send_chunks(self.inbox(entry.node), head, b"")

    def _finish(self, rid: bytes, result: Any) -> None:
        entry = self._release(rid)
        if entry is None:
            return
        if isinstance(result, BaseException):
            self.failed += 1
            entry.deferred.errback(result)
        else:
            entry.deferred.callback(result)

    # -- the inbox ------------------------------------------------------------

    def message(self, data: bytes) -> None:
        newline = data.find(b"\n", 0, 512)
        fields = data[:newline].split(b" ") if newline > 0 else []
        if len(fields) != 5 or fields[0] not in (b"q", b"r", b"c") or fields[4] not in (b"0", b"1"):
            self.bad += 1
            return
        kind, origin_bytes, rid, arg, more = fields
        origin = origin_bytes.decode("utf-8", "replace")
        chunk = data[newline + 1 :]
        if kind == b"r":
            self._answer_chunk(origin, rid, arg, more == b"1", chunk)
        elif kind == b"q":
            self._request_chunk(origin, rid, arg, more == b"1", chunk)
        else:
            self._cancelled(origin, rid)

    def _cancelled(self, origin: str, rid: bytes) -> None:
        """The asking server's consumer gave up: its pieces or its wait for a provider here go."""
        key = (origin, rid)
        self._drop_incoming(key)
        d = self.serving.pop(key, None)
        if d is not None:
            d.cancel()

    def _answer_chunk(self, origin: str, rid: bytes, status: bytes, more: bool, chunk: bytes) -> None:
        entry = self.out.get(rid)
        if entry is None:
            return  # timed out, or the server went: dropped
        if entry.node != origin:
            self.bad += 1  # only the server asked answers
            return
        entry.parts.append(chunk)
        entry.received += len(chunk)
        self.in_bytes += len(chunk)
        if entry.received > self.max_body or self.in_bytes > MAX_IN_BYTES:
            self._finish(rid, Relayed(errors.too_large("response", "larger than this server accepts")))
            return
        if more:
            return
        answer = b"".join(entry.parts)
        if status == b"ok":
            self._finish(rid, answer)
        else:
            self._finish(rid, Relayed(answer[:MAX_ERROR_TEXT].decode("utf-8", "replace")))

    def _request_chunk(self, origin: str, rid: bytes, channel_hex: bytes, more: bool, chunk: bytes) -> None:
        key = (origin, rid)
        held = self.incoming.get(key)
        if held is None:
            if key in self.serving:
                self.bad += 1  # a second request under the same id
                return
            if len(self.incoming) + len(self.serving) >= MAX_IN_FLIGHT:
                self._reply(origin, rid, False, errors.overloaded("too many requests from other servers"))
                return
            if not more:  # the common case: the whole request in one piece
                if len(chunk) > self.max_body or self.in_bytes + len(chunk) > MAX_IN_BYTES:
                    self._reply(origin, rid, False, errors.too_large("request", "larger than this server accepts"))
                    return
                self._serve(origin, rid, channel_hex, chunk)
                return
            # The rest must come within incomplete_timeout, or the pieces go.
            held = self.incoming[key] = _In(self.reactor.callLater(self.incomplete_timeout, self._stale, key))
        held.parts.append(chunk)
        held.size += len(chunk)
        self.in_bytes += len(chunk)
        if held.size > self.max_body or self.in_bytes > MAX_IN_BYTES:
            self._drop_incoming(key)
            self._reply(origin, rid, False, errors.too_large("request", "larger than this server accepts"))
            return
        if more:
            return
        body = b"".join(held.parts)
        self._drop_incoming(key)
        self._serve(origin, rid, channel_hex, body)

    def _stale(self, key: tuple[str, bytes]) -> None:
        if self.incoming.get(key) is not None:
            self.incoming[key].timer = None
            self._drop_incoming(key)
            self._reply(key[0], key[1], False, errors.MSG_TIMED_OUT)

    def _serve(self, origin: str, rid: bytes, channel_hex: bytes, body: bytes) -> None:
        try:
            channel = bytes.fromhex(channel_hex.decode("ascii"))
        except ValueError:
            self.bad += 1
            return
        if len(channel) != 16:
            self.bad += 1
            return
        key = (origin, rid)
        consumer = self.ready.get(channel)
        if consumer is not None:  # the common case: no Deferred but send()'s
            d: Deferred[Any] = consumer.send(body, timeout=RELAY_TIMEOUT)
        else:
            d = self._consumer(channel).addCallback(lambda consumer: consumer.send(body, timeout=RELAY_TIMEOUT))
        self.serving[key] = d
        d.addCallbacks(self._served, self._not_served, callbackArgs=(key,), errbackArgs=(key,))

    def _served(self, answer: bytes, key: tuple[str, bytes]) -> None:
        if self.serving.pop(key, None) is not None:
            self._reply(key[0], key[1], True, answer)

    def _not_served(self, failure: Failure, key: tuple[str, bytes]) -> None:
        if self.serving.pop(key, None) is not None:  # else cancelled: nobody waits for it
            self._reply(key[0], key[1], False, str(failure.value) or type(failure.value).__name__)

    def _drop_incoming(self, key: tuple[str, bytes]) -> None:
        held = self.incoming.pop(key, None)
        if held is not None:
            self.in_bytes -= held.size
            if held.timer is not None and held.timer.active():
                held.timer.cancel()

    def _consumer(self, channel: bytes) -> Deferred[Consumer]:
        """The relay Consumer for ``channel`` (one per channel, opened on first use)."""
        d = self.consumers.get(channel)
        if d is None:
            d = self.consumers[channel] = Consumer.connect(self._endpoint, channel, reactor=self.reactor)

            def connected(consumer: Consumer) -> Consumer:
                if self.consumers.get(channel) is d:  # not released meanwhile
                    self.ready[channel] = consumer
                return consumer

            def failed(failure: Any) -> Any:
                self.consumers.pop(channel, None)
                return failure

            d.addCallbacks(connected, failed)  # may run now: the in-process connection can be made at once
        out: Deferred[Consumer] = Deferred()  # each caller its own: d's result stays the Consumer

        def passed(result: Any) -> Any:
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(result)
            return result

        d.addBoth(passed)
        return out

    def _reply(self, origin: str, rid: bytes, ok: bool, answer: Any) -> None:
        if ok:
            self.served += 1
            body = bytes(answer)
        else:
            body = bound_error_text(str(answer))  # what a Provider would put in its ERROR frame
        if not self.link.up:
            return  # the asking server fails it by its own timer or when we leave its registry
        head = b"r " + self.node.encode("utf-8") + b" " + rid + (b" ok" if ok else b" err")
        self._send_chunks(self.inbox(origin), head, body)

    def release(self, channel: bytes) -> None:
        """No provider here holds ``channel`` any more: its relay Consumer goes."""
        self.ready.pop(channel, None)
        d = self.consumers.pop(channel, None)
        if d is not None:
            d.addCallback(lambda consumer: consumer.close()).addErrback(lambda _: None)

    def stop(self) -> None:
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        for key in list(self.relays):
            self._drop_relay(key)
        for channel in list(self.consumers):
            self.release(channel)
        for rid in list(self.out):
            self._finish(rid, Relayed(errors.MSG_PEER_DISAPPEARED))
        for key in list(self.incoming):
            self._drop_incoming(key)
        for d in list(self.serving.values()):
            d.cancel()
        self.serving.clear()

    def stats(self) -> dict[str, Any]:
        return {
            "relays": len(self.relays),
            "requests_forwarded": self.forwarded,
            "requests_served": self.served,
            "requests_failed": self.failed,
            "requests_in_flight": len(self.out),
            "requests_cancelled": self.cancelled,
            "requests_serving": len(self.serving),
            "requests_arriving": len(self.incoming),
            "bad_inbox": self.bad,
        }


def _cancelling(provider: Provider) -> Provider:
    """A relay cancels its wait (and tells the other server) when the router gives up on a request."""
    provider.cancel_abandoned = True
    return provider
