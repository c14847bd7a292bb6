"""One subscription as the broker sees it: its forwarding Consumer, backlog and window."""

from __future__ import annotations

import uuid
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..client import Consumer
from ..client.consumer import Answer
from ..endpoints import Address
from ..wire import messages
from ..wire.errors import (
    PREFIX_REQUEST_TOO_LARGE,
    ConnectionLostError,
    NoProviderError,
    PulsyfluxError,
    RemoteError,
    ServerOverloaded,
)
from ..wire.messages import BINARY_MAGIC, Position
from ..wire.printable import error_excerpt
from .link import PROBE, ignore, send_until_registered
from .subscription import Subscription

if TYPE_CHECKING:
    from ..auth.tokens import Identity
    from .fanout import Fanout

__all__ = ["Outlet", "DEFAULT_BACKLOG", "DEFAULT_BACKLOG_BYTES", "FORWARD_CHARS", "guard_channel", "nothing"]

log = Logger()


DEFAULT_BACKLOG = 10_000  # messages the broker keeps per slow subscriber
DEFAULT_BACKLOG_BYTES = 8 << 20  # and bytes (JSON characters) per slow subscriber
FORWARD_CHARS = 256 * 1024  # a forward stops growing past this much JSON
_DRAIN_PATIENCE = 2.0  # seconds a closing queue group member waits for answers to its forwards in flight


def nothing() -> None:
    return None


def guard_channel(address: Address, channel: uuid.UUID) -> Callable[[], None]:
    """Ask the server to let only the broker send on ``channel``, when the address can (in-process)."""
    guard = getattr(address, "guard_channel", None)
    return guard(channel.bytes) if guard is not None else nothing


class _Forward(Answer):
    """One forward in flight: the consumer hands its answer straight to the outlet (no Deferred and
    callbacks per forward, ~4 us of the server's CPU per forward, per subscriber)."""

    __slots__ = ("outlet", "count", "texts")

    def __init__(self, outlet: "Outlet", count: int, texts: Sequence[Union[str, bytes]]) -> None:
        self.request_id = b""
        self.body = None
        self.outlet = outlet
        self.count = count
        self.texts = texts

    def callback(self, result: bytes) -> None:
        self.texts = ()  # let go of the messages (as a fired Deferred lets go of its callbacks' arguments)
        try:
            self.outlet._answered(result, self.count)
        except Exception:  # as a Deferred would keep it: never into the consumer reading the line
            log.failure("forward answer failed")

    def errback(self, error: BaseException) -> None:
        texts, self.texts = self.texts, ()
        try:
            self.outlet._failed(error, self.count, texts)
        except Exception:
            log.failure("forward failure failed")


class Outlet:
    """One subscription as the broker sees it: forwarding Consumer, backlog, window.

    Forwards go in order over one connection, several in flight; what does
    not fit in the window waits in the backlog, whose oldest entries are
    dropped (and counted) past ``limit`` messages or ``limit_bytes`` (the
    newest message always stays), and when all backlogs together pass the
    fanout's ``total_backlog_bytes``. While a reconnecting Consumer is
    down the outlet is not ``ready``: the backlog waits until a probe has
    reached the subscriber again (:meth:`rejoin`).
    """

    def __init__(
        self,
        fanout: "Fanout",
        topic: str,
        consumer: Consumer,
        local: Optional[Subscription],
        limit: int,
        limit_bytes: int = DEFAULT_BACKLOG_BYTES,
        label: str = "",
        group: Optional[str] = None,
    ) -> None:
        self.fanout = fanout
        self.topic = topic  # what was subscribed to: a topic or a pattern
        self.group = group  # the queue group, or None: gets a copy of every message
        self.consumer = consumer
        self.channel = consumer.channel_id  # a secret of the subscriber's: never in stats or logs
        self.label = label  # what stats and logs call it instead
        self.local = local
        self.limit = limit
        self.limit_bytes = limit_bytes
        # Each message as the subscriber reads it: its JSON text, or its binary record (``binary``).
        self.backlog: deque[Union[str, bytes]] = deque()
        self.size = 0  # characters of JSON (bytes of binary records) in the backlog
        # Forwards to it are binary: it reads the encoding (offered at subscribe: docs/protocol.md) and the
        # broker keeps no history (whose texts carry positions, so they go as JSON).
        self.binary = False
        self.requests = 0
        self.in_flight = 0
        self.delivered = 0
        self.dropped = 0
        self.notified = 0  # drop total last told to the subscriber
        self.lost = 0  # in forwards in flight when the line dropped
        self.gaps = 0
        self.open = True
        self.ready = True
        self._rejoining = False
        self._rejoin_waiters: list[Deferred[None]] = []
        self._drained: Optional[Deferred[None]] = None  # a closing group member: fires when no forward is in flight
        self.unguard: Callable[[], None] = nothing  # ends the server's guard on the channel (inproc)
        # The client that announced it (a client id names one connection): only it may end it.
        self.owner: Optional[uuid.UUID] = None
        self.identity: Optional[Identity] = None  # whose rights keep it (rights.py), when the server checks tokens
        # With history: whether its replay was complete, the position right before it,
        # and whether the history holds its topic for it (a plain topic without a group).
        self.recovered = True
        self.start: Optional[Position] = None
        self.pinned = False

    def has_room(self) -> bool:
        """Whether a queue group should give this member the next message: up, and its backlog not full."""
        return self.ready and len(self.backlog) < self.limit and self.size < self.limit_bytes

    def push(self, text: Union[str, bytes]) -> None:
        """Queue one message; the caller adds it to the fanout's ``backlog_size`` (once per publish)."""
        backlog = self.backlog
        backlog.append(text)
        size = self.size + len(text)
        self.size = size
        if size > self.limit_bytes or len(backlog) > self.limit:
            self.trim(self.limit, self.limit_bytes)

    def push_all(self, texts: Sequence[Union[str, bytes]], size: int) -> None:
        """Queue a batch of messages (``size`` bytes in all) as a :meth:`push` of each would, in one step.

        The bounds are checked once, after: that drops the same messages as
        checking after each (what stays is the longest run of the newest
        that fits, either way), at a C loop's cost per message, not a call's.
        """
        backlog = self.backlog
        backlog.extend(texts)
        size += self.size
        self.size = size
        if size > self.limit_bytes or len(backlog) > self.limit:
            self.trim(self.limit, self.limit_bytes)

    def trim(self, limit: int, limit_bytes: int) -> int:
        """Drop (and count) the oldest waiting messages down to the bounds; the newest stays."""
        backlog = self.backlog
        popleft = backlog.popleft
        freed = 0
        dropped = 0
        while len(backlog) > 1 and (len(backlog) > limit or self.size - freed > limit_bytes):
            freed += len(popleft())
            dropped += 1
        if len(backlog) > limit:  # limit 0: nothing waits, not even the newest
            freed += len(popleft())
            dropped += 1
        if dropped:
            self.size -= freed
            self.fanout.backlog_size -= freed
            self.count_dropped(dropped)
        return freed

    def count_dropped(self, count: int) -> None:
        """``count`` messages for this subscriber are gone: counted here and in the fan-out, and told to a
        local subscription at once (a remote one learns it from its next forward's drop notice)."""
        self.dropped += count
        self.fanout.dropped += count
        if self.local is not None:
            self.local.set_dropped(self.dropped)

    def flush(self) -> None:
        backlog = self.backlog
        fanout = self.fanout
        if self.consumer.reconnecting:
            self.ready = False  # the line is down: keep the backlog for rejoin()
        while backlog and self.open and self.ready and self.requests < fanout.window:
            # A forward is in the outlet's encoding: every message waiting is in it (the fan-out
            # pushes each outlet its own; a queue group's hand-over converts).
            kind = type(backlog[0])
            # A binary forward is sent as its pieces (the magic, then the records), joined once where
            # it is framed (Consumer.send_parts); the messages are always the last ``count`` of texts.
            texts: list[Any] = [BINARY_MAGIC] if kind is bytes else []
            if self.dropped != self.notified:
                self.notified = self.dropped
                texts.append(
                    messages.encode_record(messages.DROPPED, None, {"dropped": str(self.dropped)})
                    if kind is bytes
                    else messages.control(messages.DROPPED, dropped=str(self.dropped))
                )
            limit = fanout.batch
            if len(backlog) <= limit and self.size < FORWARD_CHARS:
                # All of it fits one forward: taken at once, as the loop below would take it.
                count = len(backlog)
                size = self.size
                texts += backlog
                backlog.clear()
            else:
                popleft = backlog.popleft
                size = 0
                count = 0
                while backlog and count < limit and size < FORWARD_CHARS:
                    text = popleft()
                    texts.append(text)
                    size += len(text)
                    count += 1
            self.size -= size
            fanout.backlog_size -= size
            self.requests += 1
            self.in_flight += count
            if kind is bytes:
                self.consumer.send_parts_for(texts, 0, _Forward(self, count, texts))
            else:
                self.consumer.send_for(messages.encode_batch(texts), 0, _Forward(self, count, texts))

    def forward(self, body: bytes, texts: Sequence[Union[str, bytes]]) -> None:
        """Send ``texts`` (JSON texts or binary records, joined as ``body``) as one forward, as :meth:`flush` would with them alone
        waiting: only when nothing waits before them and the window has room (``Fanout._fan_alike``)."""
        count = len(texts)
        self.requests += 1
        self.in_flight += count
        self.consumer.send_for(body, 0, _Forward(self, count, texts))

    def _answered(self, result: bytes, count: int) -> None:
        self.requests -= 1
        self.in_flight -= count
        self.delivered += count
        self.fanout.delivered += count
        if self._drained is not None and not self.requests:
            self._drained.callback(None)
        self.flush()

    def _failed(self, error: BaseException, count: int, texts: Sequence[Union[str, bytes]] = ()) -> None:
        self.requests -= 1
        self.in_flight -= count
        if self._drained is not None and not self.requests:
            self._drained.callback(None)
        if not self.open:
            # Ended while these were on their way (unsubscribed, closed): a
            # subscriber holds its answer while its buffer is full, so when the
            # line is cut (ConnectionLostError) they are most likely readable
            # there, and not counted as lost. Those it never took (not routed,
            # refused by its closed subscription, refused by the server) go to
            # another member of a queue group; with none to take them (a plain
            # subscription, the whole broker closing) they are counted as lost.
            if isinstance(error, (NoProviderError, RemoteError, ServerOverloaded)):
                if self.group is not None and not self.fanout.closing and not isinstance(error, ServerOverloaded):
                    self.fanout.hand_over(self, texts[len(texts) - count :])  # counts them if no member is left
                else:
                    self.lost += count
                    self.fanout.lost += count
            return
        if isinstance(error, ConnectionLostError) and self.consumer.reconnecting:
            # At most once: these may or may not have arrived; the rest waits for rejoin().
            self.lost += count
            self.fanout.lost += count
            self.ready = False
            return
        if isinstance(error, ServerOverloaded) and str(error).startswith(PREFIX_REQUEST_TOO_LARGE):
            # Too large for the server or the subscriber (a binary publish made JSON for a Go subscriber
            # grows by a third, NUL header bytes sixfold): those messages are dropped and counted, and its
            # next forward says so; the subscription stays (a publisher cannot end other clients' ones).
            self.count_dropped(count)
            self.flush()
            return
        if isinstance(error, NoProviderError):
            reason = "subscriber disappeared"
        elif isinstance(error, ConnectionLostError):
            reason = "connection to the server lost"
        else:
            reason = f"subscriber refused a message: {error_excerpt(str(error))}"
        if self.fanout.log_limiter.allow("dropping subscription"):
            log.info(
                "dropping subscription {label} to {topic!r}: {reason}",
                label=self.label,
                topic=self.topic,
                reason=reason,
            )
        if self.group is not None and isinstance(error, (NoProviderError, RemoteError)):
            # Never routed to the subscriber, or refused by it (a member that unsubscribes refuses what
            # was on its way, and that answer may reach us before its unsubscribe, which travels on
            # another connection): another member of the group takes them, as after the unsubscribe
            # (the last count of texts are the messages; a drop notice may come first).
            self.fanout.remove(self, reason, orphans=texts[len(texts) - count :])
            return
        self.lost += count
        self.fanout.lost += count  # the backlog is counted by close()
        self.fanout.remove(self, reason)

    def rejoin(self) -> "Deferred[None]":
        """Probe the subscriber once the Consumer is connected, then forward again.

        Fires when forwarding resumed; fails if the line is down again, or
        if the subscriber is not back within the patience (the subscription
        is then removed: ``subscriber did not come back``).
        """
        self.ready = False
        d: Deferred[None] = Deferred()
        self._rejoin_waiters.append(d)
        if not self._rejoining:
            self._rejoining = True
            Deferred.fromCoroutine(self._rejoin()).addBoth(self._rejoined)
        return d

    async def _rejoin(self) -> None:
        fanout = self.fanout
        await self.consumer.when_connected()
        try:
            await send_until_registered(self.consumer, PROBE, fanout.reactor, patience=fanout.rejoin_patience)
        except ConnectionLostError:
            raise  # down again: the next reconnect rejoins
        except PulsyfluxError as error:
            if self.open:
                reason = (
                    "subscriber did not come back" if isinstance(error, NoProviderError) else error_excerpt(str(error))
                )
                if fanout.log_limiter.allow("dropping subscription"):
                    log.info("dropping subscription {label} to {topic!r}: {reason}", label=self.label,
                             topic=self.topic, reason=reason)  # fmt: skip
                fanout.remove(self, reason)  # close() counts the backlog as lost
            raise
        if not self.open:
            raise ConnectionLostError("the subscription was closed")
        self.gaps += 1
        self.ready = True
        self.flush()
        if self.local is not None:
            self.local.resumed()

    def _rejoined(self, result: object) -> None:
        self._rejoining = False
        waiters, self._rejoin_waiters = self._rejoin_waiters, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(None)

    def close(self, reason: str, notify: bool) -> "Deferred[None]":
        """Stop forwarding; tell a remote subscriber (``notify``), close the Consumer."""
        self.open = False
        self.lost += len(self.backlog)  # never forwarded: the subscription ended first
        self.fanout.lost += len(self.backlog)
        self.fanout.backlog_size -= self.size
        self.size = 0
        self.backlog.clear()
        if notify and self.consumer.connected:
            self.consumer.send(
                messages.control(messages.CLOSED, reason=reason).encode("utf-8"), timeout=1.0
            ).addErrback(ignore)
        if self.group is not None and self.requests:
            return self._close_when_answered()
        return self.consumer.close()

    def _close_when_answered(self) -> "Deferred[None]":
        """A queue group member: let its forwards in flight be answered (for at most
        ``_DRAIN_PATIENCE`` s) before the line closes, so those its subscriber
        refused go to another member instead of vanishing with the line."""
        drained: Deferred[None] = Deferred()
        self._drained = drained
        timer = self.fanout.reactor.callLater(_DRAIN_PATIENCE, drained.callback, None)

        def close(_: object) -> "Deferred[None]":
            self._drained = None
            if timer.active():
                timer.cancel()
            return self.consumer.close()

        return drained.addCallback(close)

    def stats(self) -> dict[str, Any]:
        return {
            "id": self.label,  # not the channel: whoever knows that can write to the subscriber
            "topic": self.topic,
            "group": self.group,
            "remote": self.local is None,
            "backlog": len(self.backlog),
            "backlog_bytes": self.size,
            "in_flight": self.in_flight,
            "delivered": self.delivered,
            "dropped": self.dropped,
            "lost": self.lost,
            "gaps": self.gaps,
        }
