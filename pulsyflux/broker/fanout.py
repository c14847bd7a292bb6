"""The broker Provider's handler: who subscribes to what, and the fan-out of each message."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Optional, Sequence, Union

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..client import Consumer, Provider, Reconnect
from ..endpoints import Address
from ..wire import messages
from ..wire.errors import ConnectionLostError, NoProviderError, PermissionDenied, PulsyfluxError
from ..wire.messages import (
    BINARY_MAGIC,
    CONTROL_PREFIX,
    MessageError,
    Position,
    group_problem,
    is_pattern,
    topic_problem,
)
from ..wire.printable import error_excerpt, excerpt
from ..wire.ratelimit import LogLimiter, summary_to
from .history import History
from .link import (
    EMPTY_BATCH,
    OK,
    OK_BINARY,
    PROBE,
    RECOVERED,
    RESUMED,
    ignore,
    reads_binary,
    send_until_registered,
)

if TYPE_CHECKING:
    from ..auth.tokens import Identity
from .outlet import FORWARD_CHARS, Outlet, guard_channel
from .rights import Rights, auth_link
from .subjects import Interest, Sublist
from .subscription import MESSAGES_INCOMPLETE, Subscription

__all__ = [
    "Fanout",
    "Setup",
    "Subscribers",
    "DEFAULT_TOTAL_BACKLOG_BYTES",
    "DEFAULT_MAX_SUBSCRIPTIONS",
    "DEFAULT_MAX_SETUPS",
    "DEFAULT_MAX_SETUPS_PER_CLIENT",
    "DEFAULT_BATCH",
    "DEFAULT_WINDOW",
]

log = Logger()


DEFAULT_TOTAL_BACKLOG_BYTES = 256 << 20  # bytes (JSON characters) in all backlogs together
DEFAULT_MAX_SUBSCRIPTIONS = 10_000  # subscriptions a broker keeps; more are refused
DEFAULT_MAX_SETUPS = 64  # remote subscriptions being set up at once; more are refused
DEFAULT_MAX_SETUPS_PER_CLIENT = 8  # of those, from one client (one connection: the server checks its id)
_SETUP_WAITERS = 16  # announcements of one channel waiting for its setup; more are refused
DEFAULT_BATCH = 256  # messages per forward request, at most
DEFAULT_WINDOW = 4  # forward requests in flight per subscriber
_GROWS_PAST = MESSAGES_INCOMPLETE // 6  # a binary publish up to this size is no larger than that as JSON


class Subscribers(Interest[Outlet]):
    """The outlets of one topic or pattern (plain and in queue groups), and its counters
    (as long as it has a subscriber).

    ``published`` counts the messages fanned out to it, ``delivered_before``
    what subscribers that left had accepted: the topic's publish -> deliver
    numbers in the stats cost one attribute increment per message.
    """

    __slots__ = ("published", "delivered_before")

    def __init__(self) -> None:
        super().__init__()
        self.published = 0
        self.delivered_before = 0

    def delivered(self) -> int:
        members = self.plain + [member for group in self.groups.values() for member in group.members]
        return self.delivered_before + sum(outlet.delivered for outlet in members)


def _replay_headers(headers: dict[str, str]) -> tuple[Optional[Position], Optional[int]]:
    """The ``since`` / ``last`` headers of a ``$pulsyflux/subscribe``, checked."""
    since = last = None
    if "since" in headers:
        try:
            since = Position.parse(headers["since"])
        except ValueError as error:
            raise MessageError(f"subscribe refused: since: {error}") from None
    if "last" in headers:
        text = headers["last"]
        if not (text.isdigit() and text.isascii() and len(text) < 10):
            raise MessageError(f"subscribe refused: last must be a whole number >= 0, not {excerpt(text)}")
        last = int(text)
    return since, last


class Setup:
    """A subscription being set up: its topic and group, and later announcements of its channel waiting for it."""

    __slots__ = ("topic", "group", "waiters")

    def __init__(self, topic: str, group: Optional[str] = None) -> None:
        self.topic = topic
        self.group = group
        self.waiters: list[Deferred[Outlet]] = []


class Fanout:
    """The broker Provider's handler: who subscribes to what, and fan-out.

    Not a router: the server's :class:`~pulsyflux.server.Router` routes frames
    between connections; this fans each published message out to the outlets
    of its topic.
    """

    def __init__(
        self,
        address: Address,
        reactor: IReactorTime,
        *,
        backlog: int,
        batch: int,
        window: int,
        reconnect: Reconnect,
        rejoin_patience: float,
        backlog_bytes: int,
        total_backlog_bytes: int,
        max_subscriptions: int,
        max_setups: int,
        max_setups_per_client: int,
        token: Optional[str] = None,
        history: Optional[History],
    ) -> None:
        """Only :class:`Broker` makes one, by keyword: its arguments (and their defaults) are the Broker's."""
        self.address = address
        self.token = token  # what its forwarding Consumers present to a server that checks tokens
        self.reactor = reactor
        self.log_limiter = LogLimiter(reactor, summary_to(log))  # subscribers decide how often these happen
        self.reconnect = reconnect
        self.rejoin_patience = rejoin_patience
        self.backlog = backlog
        self.backlog_bytes = backlog_bytes
        self.total_backlog_bytes = total_backlog_bytes
        self.max_subscriptions = max_subscriptions
        self.max_setups = max_setups
        self.max_setups_per_client = max_setups_per_client
        self.history = history  # retained messages per topic, or None (off)
        # Remote setups in progress per announcing client id; the broker's Provider tells who asks.
        self.setups_by_client: dict[uuid.UUID, int] = {}
        self.provider: Optional[Provider] = None
        # Beside a server that checks tokens: who may publish and subscribe (None: no checks; rights.py).
        link = auth_link(address)
        self.rights: Optional[Rights] = (
            None
            if link is None
            else Rights(link, reactor, lambda outlet, why: self.remove(outlet, why), self.log_limiter)
        )
        self.batch = batch
        self.window = window
        # Who wants what: pattern (or topic) -> its plain subscribers and queue groups (subjects.py).
        self.index: Sublist[Subscribers] = Sublist()
        self.outlets: dict[uuid.UUID, Outlet] = {}
        # Channels being set up, recorded before the first await, so that two
        # announcements of one channel never open two forwarding Consumers.
        self.opening: dict[uuid.UUID, Setup] = {}
        self.backlog_size = 0  # characters of JSON waiting in all backlogs
        self.published = 0
        self.delivered = 0
        self.dropped = 0
        self.lost = 0  # backlog and in-flight messages of subscribers that vanished
        self.requeued = 0  # messages a queue group member left behind, given to another member
        self.rejected = 0
        self.refused = 0  # subscribe announcements refused by the caps
        self.closing = False
        # Pub/sub across servers (pulsyflux.cluster.pubsub), when the server has --cluster.
        self.cluster: Optional[Any] = None
        self._serial = 0  # labels subscriptions in stats and logs: "sub-1", "sub-2", ...

    def handle(self, body: bytes) -> Union[bytes, "Deferred[bytes]"]:
        if body[:4] == BINARY_MAGIC:
            return self._handle_binary(body)
        if body == EMPTY_BATCH:
            return OK_BINARY  # our publishers' first request: say which encodings we read (docs/protocol.md)
        try:
            items = messages.split_body(body)
        except MessageError:
            self.rejected += 1
            raise
        for item in items:
            # One call of the topic rule per published message; only a refused topic asks why.
            problem = topic_problem(item[0])  # also a Go publisher's "orders.*", "a..b"
            if problem is not None:
                topic = item[0]
                if topic.startswith(CONTROL_PREFIX) and len(items) == 1:
                    try:
                        return self._control(topic, item[3] or {})
                    except MessageError:
                        self.rejected += 1
                        raise
                self._refuse(topic, problem)
        if self.rights is not None:
            self.rights.may_publish(self._request_id(), items)
        answer = OK
        shared = items  # other servers get the messages as published: each positions them itself
        if self.history is not None:
            items, answer = self._retain(items, body[:1] == b"[")
        recipients = self.recipients
        self.published += len(items)
        if len(items) == 1:
            outlets = recipients(items[0][0])
            if outlets:
                self._push(outlets, items[0])
                for outlet in list(outlets):
                    outlet.flush()
            if self.cluster is not None:
                self.cluster.publish(shared)
            return answer
        self._fan(items)
        if self.cluster is not None:
            self.cluster.publish(shared)
        return answer

    def _refuse(self, topic: str, problem: str) -> NoReturn:
        """A published message's topic broke the rule: the whole request is refused, saying why."""
        self.rejected += 1
        if not topic:
            raise MessageError(problem)  # nobody can subscribe to it
        if topic.startswith(CONTROL_PREFIX):
            raise MessageError("control messages cannot be sent in a batch")
        raise MessageError(f"publish refused: {problem}")

    def _push(self, outlets: list[Outlet], item: tuple[str, str, Any, Any]) -> None:
        """Queue one message (JSON) on each of its outlets, in each one's encoding: the JSON text as it
        came, or its binary record, made once for all the outlets that read it (docs/protocol.md)."""
        text = item[1]
        size = 0
        record: Optional[bytes] = None
        for outlet in outlets:
            if outlet.binary:
                if record is None:
                    record = messages.record_of(item[0], item[2], item[3])
                outlet.push(record)
                size += len(record)
            else:
                outlet.push(text)
                size += len(text)
        self.backlog_size += size
        if self.backlog_size > self.total_backlog_bytes:
            self.trim_backlogs()

    def _handle_binary(self, body: bytes) -> bytes:
        """A binary batch from one of our publishers: each record goes as it came to the outlets
        that read the binary encoding, and as JSON (made once per message) to the others."""
        try:
            items = messages.split_binary(body)
        except MessageError:
            self.rejected += 1
            raise
        for item in items:
            problem = topic_problem(item[0])
            if problem is not None:
                self._refuse(item[0], problem)
        if len(body) > _GROWS_PAST:  # only so large a body can hold a message too large once made JSON
            for _, record, payload, _ in items:
                size = 0 if payload is None else len(payload)
                # At most: the payload in base64, and six bytes (\u0000) per byte of topic and headers.
                if 4 * -(-size // 3) + 6 * (len(record) - size) > MESSAGES_INCOMPLETE:
                    self.rejected += 1
                    raise MessageError(
                        f"publish refused: a message of {len(record)} bytes may be larger as JSON (made for"
                        f" subscribers that read only JSON) than the {MESSAGES_INCOMPLETE} bytes a publish may take"
                    )
        if self.rights is not None:
            self.rights.may_publish(self._request_id(), items)  # type: ignore[arg-type]  # reads the topics only
        if self.history is not None or self.cluster is not None:
            # Both keep and share JSON: the message takes the JSON path from here (a batch: positions answered).
            encode_text = messages.encode_text
            texts = [
                (topic, encode_text(topic, payload, headers), payload, headers) for topic, _, payload, headers in items
            ]
            shared = texts
            answer = OK
            if self.history is not None:
                texts, answer = self._retain(texts, True)
            self.published += len(texts)
            self._fan(texts)
            if self.cluster is not None:
                self.cluster.publish(shared)
            return answer
        self.published += len(items)
        recipients = self.recipients
        chosen = [recipients(item[0]) for item in items]
        alike = _alike(chosen)
        if alike is not None:
            self._fan_alike(alike, items, binary=True)
            return OK
        touched: dict[Outlet, None] = {}
        for (topic, record, payload, headers), outlets in zip(items, chosen):
            if outlets:
                size = 0
                text: Optional[str] = None
                for outlet in outlets:
                    if outlet.binary:
                        outlet.push(record)
                        size += len(record)
                    else:
                        if text is None:
                            text = messages.encode_text(topic, payload, headers)
                        outlet.push(text)
                        size += len(text)
                    touched[outlet] = None
                self.backlog_size += size
                if self.backlog_size > self.total_backlog_bytes:
                    self.trim_backlogs()
        for outlet in touched:
            outlet.flush()
        return OK

    def _fan(self, items: list[tuple[str, str, Any, Any]]) -> None:
        """Deliver a batch of checked messages to their outlets, each outlet flushed once."""
        recipients = self.recipients
        chosen = [recipients(item[0]) for item in items]
        alike = _alike(chosen)
        if alike is not None:
            self._fan_alike(alike, items, binary=False)
            return
        touched: dict[Outlet, None] = {}
        for item, outlets in zip(items, chosen):
            if outlets:
                self._push(outlets, item)
                for outlet in outlets:
                    touched[outlet] = None
        for outlet in touched:
            outlet.flush()

    def _fan_alike(self, outlets: list[Outlet], items: Sequence[tuple[str, Any, Any, Any]], binary: bool) -> None:
        """A batch every message of which goes to the same outlets (one topic, no queue group).

        ``items`` as :func:`~pulsyflux.wire.messages.split_body` gives them
        (JSON texts) or, with ``binary``, as ``split_binary`` does (records).
        An outlet with nothing waiting and room in its window would send the
        whole batch as one forward (:meth:`Outlet.flush`); it gets that
        forward at once, its body made once per encoding for all of them,
        instead of a push and a pop per message. The other outlets queue the
        batch (each at once: :meth:`Outlet.push_all`; backlog, drops) and flush, as any publish;
        message by message where it would pass the bound of all backlogs together.
        """
        count = len(items)
        entries: dict[bool, list[Any]] = {binary: [item[1] for item in items]}  # per encoding (True: binary)
        sizes: dict[bool, int] = {}
        bodies: dict[bool, bytes] = {}

        def batch_in(kind: bool) -> tuple[list[Any], int]:
            """The batch's messages in one encoding and their bytes, each made once."""
            batch = entries.get(kind)
            if batch is None:
                batch = entries[kind] = self._convert(items, kind)
            size = sizes.get(kind)
            if size is None:
                size = sizes[kind] = sum(map(len, batch))
            return batch, size

        window = self.window
        waiting: list[Outlet] = []
        for outlet in list(outlets):  # a failed send can take an outlet out of the index's list
            if (
                outlet.backlog
                or outlet.requests >= window
                or not outlet.ready
                or not outlet.open
                or outlet.dropped != outlet.notified
                or outlet.group is not None
                or count > self.batch
                or count > outlet.limit
                or outlet.consumer.reconnecting
            ):
                waiting.append(outlet)
                continue
            kind = outlet.binary
            batch, size = batch_in(kind)
            if size >= FORWARD_CHARS or size > outlet.limit_bytes:
                waiting.append(outlet)
                continue
            body = bodies.get(kind)
            if body is None:
                body = bodies[kind] = messages.encode_records(batch) if kind else messages.encode_batch(batch)
            outlet.forward(body, batch)
        if not waiting:
            return
        batches = [batch_in(outlet.binary) for outlet in waiting]
        total = self.backlog_size
        for _, size in batches:
            total += size
        if total <= self.total_backlog_bytes:  # under the all-backlogs bound: each takes the batch at once
            for outlet, (batch, size) in zip(waiting, batches):
                outlet.push_all(batch, size)
                self.backlog_size += size
        else:
            # Rare: the batch passes the bound of all backlogs together. Whole batches, one outlet after
            # the other, would trim the later outlets of almost all of it and the earlier of none;
            # message by message, as any publish, spreads the drops over the largest backlogs.
            for index in range(count):
                size = 0
                for outlet, (batch, _) in zip(waiting, batches):
                    entry = batch[index]
                    outlet.push(entry)
                    size += len(entry)
                self.backlog_size += size
                if self.backlog_size > self.total_backlog_bytes:
                    self.trim_backlogs()
        for outlet in waiting:
            outlet.flush()

    @staticmethod
    def _convert(items: Sequence[tuple[str, Any, Any, Any]], binary: bool) -> list[Any]:
        """The batch's messages in the other encoding, each made once (as :meth:`_push` makes them)."""
        if binary:
            return [messages.record_of(topic, payload, headers) for topic, _, payload, headers in items]
        return [messages.encode_text(topic, payload, headers) for topic, _, payload, headers in items]

    def deliver_from_cluster(self, body: bytes) -> int:
        """Fan out a batch another server of the cluster accepted; returns how many messages.

        Its publish rights were checked where it entered the cluster; the
        topic rule is checked again (one server's rule could be older).
        """
        items = messages.split_body(body)
        for item in items:
            problem = topic_problem(item[0])  # the one rule: it names the empty topic and reserves the control prefix
            if problem is not None:
                raise MessageError(f"not a publishable topic: {problem}")
        if self.history is not None:  # retained and positioned here as a local publish is
            items, _ = self._retain(items, body[:1] == b"[")
        self.published += len(items)
        self._fan(items)
        return len(items)

    def groups(self) -> list[tuple[str, str]]:
        """Every (topic or pattern, queue group) with members here."""
        return [(pattern, name) for pattern, interest in self.index.items() for name in interest.groups]

    def deliver_group_here(self, pattern: str, group: str, here: bool) -> None:
        """Whether this server delivers ``group``'s messages (in a cluster, one server does)."""
        interest = self.index.get(pattern)
        found = interest.groups.get(group) if interest is not None else None
        if found is not None:
            found.elsewhere = not here

    def patterns(self) -> list[str]:
        """Every topic and pattern someone here subscribes to."""
        return list(self.index)

    def count_gaps(self) -> None:
        """Messages may have been missed by every subscription here (the cluster link was down)."""
        for outlet in self.outlets.values():
            outlet.gaps += 1

    def _retain(self, items: list[tuple[str, str, Any, Any]], batch: bool) -> tuple[list[Any], bytes]:
        """With history: keep each message, its position in its text (forwarded and replayed as such).

        A batch (our publishers send arrays) is answered with the positions,
        a JSON array of "EPOCH:SEQ"; a plain object (a Go publisher) with ``ok``.
        """
        append = self.history.append  # type: ignore[union-attr]  # only called with history
        retained = []
        positions = []
        for topic, text, payload, headers in items:
            position, text = append(topic, text)
            retained.append((topic, text, payload, headers))
            positions.append(f"{position[0]}:{position[1]}")
        if not batch:
            return retained, OK
        return retained, ('["' + '","'.join(positions) + '"]').encode("ascii")

    def recipients(self, topic: str) -> Optional[list[Outlet]]:
        """The outlets one message of ``topic`` goes to: each plain subscriber of every
        matching pattern, and one member of each queue group (the round-robin turns).

        Counts the message in each matching topic's ``published``. A plain
        topic without groups is one dict lookup, as before patterns existed;
        the list returned may be the index's own (not to be changed).
        """
        index = self.index
        if not index.patterns:
            interest = index.literal.get(topic)
            if interest is None:
                return None
        else:
            interests = index.match(topic)
            if not interests:
                return None
            if len(interests) > 1:
                out: list[Outlet] = []
                for interest in interests:
                    interest.published += 1
                    interest.recipients(Outlet.has_room, out)
                return out
            interest = interests[0]
        interest.published += 1
        if not interest.groups:
            return interest.plain
        out = []
        interest.recipients(Outlet.has_room, out)
        return out

    def enlist(self, outlet: Outlet) -> None:
        """Add a new subscription to the index: its pattern, and its queue group if any."""
        interest = self.index.get(outlet.topic)
        if interest is None:
            interest = Subscribers()
            self.index.add(outlet.topic, interest)
            if self.cluster is not None:
                self.cluster.want(outlet.topic)
        new_group = outlet.group is not None and outlet.group not in interest.groups
        interest.add(outlet, outlet.group)
        if new_group and self.cluster is not None:
            self.cluster.group_added(outlet.topic, outlet.group)

    def delist(self, outlet: Outlet) -> None:
        """Take a subscription out of the index; a pattern nobody wants any more goes."""
        interest = self.index.get(outlet.topic)
        if interest is None:
            return
        interest.remove(outlet, outlet.group)
        interest.delivered_before += outlet.delivered
        if outlet.group is not None and outlet.group not in interest.groups and self.cluster is not None:
            self.cluster.group_removed(outlet.topic, outlet.group)
        if not interest.plain and not interest.groups:
            self.index.remove(outlet.topic)
            if self.cluster is not None:
                self.cluster.unwant(outlet.topic)

    def subscribers(self, topic: str) -> list[Outlet]:
        """Every subscription to exactly ``topic`` (a pattern is one topic here), in groups or not."""
        interest = self.index.get(topic)
        if interest is None:
            return []
        return interest.plain + [member for group in interest.groups.values() for member in group.members]

    def _control(self, kind: str, headers: dict[str, str]) -> Union[bytes, "Deferred[bytes]"]:
        if kind not in (messages.SUBSCRIBE, messages.UNSUBSCRIBE):
            raise MessageError(
                f"unknown control message {excerpt(kind)}; topics starting with {CONTROL_PREFIX!r} are reserved"
            )
        topic = headers.get("topic")
        if topic is None:
            raise MessageError(f"{kind} needs a 'topic' header")
        group = headers.get("group")  # absent: a plain subscription (what Go providers send)
        try:
            channel = uuid.UUID(headers.get("channel", ""))
        except ValueError:
            raise MessageError(f"{kind} needs a 'channel' header holding a UUID") from None
        if kind == messages.UNSUBSCRIBE:
            outlet = self.outlets.get(channel)
            if outlet is not None and outlet.topic == topic and self._may_end(outlet):
                self.remove(outlet, "unsubscribed", notify=False)
            return OK  # also to a stranger: whether the subscription exists is not told
        rights = self.rights
        identity = rights.may_subscribe(self._request_id(), topic) if rights is not None else None
        outlet = self.outlets.get(channel)
        d: Deferred[Any]
        answer: Optional[bytes]
        since = last = None
        if outlet is not None:
            if outlet.topic != topic or outlet.group != group:
                raise MessageError(f"channel {channel} is already subscribed to another topic or group")
            if rights is not None and identity is not None:
                rights.keep(outlet, identity)  # heartbeats carry the announcer's latest (refreshed) token
            # A subscriber back after a gap says so again: the subscription we kept resumes.
            if outlet.ready and outlet.consumer.connected:
                return RESUMED  # also every heartbeat: a dict lookup, nothing else
            d = outlet.rejoin()
            answer = RESUMED
        elif channel in self.opening:
            # Announced again while its first announcement is being set up: wait
            # for that one and answer as to a re-announce (never a second outlet).
            setup = self.opening[channel]
            if setup.topic != topic or setup.group != group:
                raise MessageError(f"channel {channel} is already being subscribed to another topic or group")
            if len(setup.waiters) >= _SETUP_WAITERS:
                self.refused += 1
                raise PulsyfluxError("subscribe refused: too many announcements of one channel being set up")
            d = Deferred()
            setup.waiters.append(d)
            answer = RESUMED
        else:
            problem = topic_problem(topic, subscribing=True)
            if problem is None and group is not None:
                problem = group_problem(group)
            if problem is not None:
                raise MessageError(f"subscribe refused: {problem}")
            if len(self.outlets) + len(self.opening) >= self.max_subscriptions:
                self.refused += 1
                raise PulsyfluxError(
                    f"subscribe refused: the broker has its maximum of {self.max_subscriptions} subscriptions"
                )
            client = self.provider.current_client_id if self.provider is not None else None
            if client is not None and self.setups_by_client.get(client, 0) >= self.max_setups_per_client:
                self.refused += 1
                raise PulsyfluxError(
                    "subscribe refused: too many subscriptions being set up by this client"
                    f" (at most {self.max_setups_per_client} at once); try again"
                )
            if len(self.opening) >= self.max_setups:
                self.refused += 1
                raise PulsyfluxError(
                    f"subscribe refused: too many subscriptions being set up (at most {self.max_setups} at once); try again"
                )
            since, last = _replay_headers(headers)
            if (since is not None or last is not None) and (group is not None or is_pattern(topic)):
                raise MessageError("subscribe refused: since and last need a plain topic without a group")
            d = Deferred.fromCoroutine(
                self.setup(topic, channel, None, client, group, identity, since=since, last=last)
            )
            answer = None  # from the new outlet: its replay

        def failed(failure: Failure) -> NoReturn:
            # Said plainly, so the client does not take it for "no broker".
            if failure.check(PermissionDenied):
                failure.raiseException()  # its own clear line (the channel is someone else's)
            if failure.check(NoProviderError):
                raise PulsyfluxError(f"subscribe failed: no subscriber answers on channel {channel}")
            # Never the whole text: it may be the (hostile) provider's on that channel.
            raise PulsyfluxError(f"subscribe failed: {error_excerpt(failure.getErrorMessage())}")

        asked = since is not None or last is not None

        def done(outlet: Optional[Outlet]) -> bytes:
            if answer is not None:
                return answer
            assert outlet is not None
            if not asked or outlet.start is None:
                return OK  # as before history (also what a Go provider expects); asked, without history: not recovered
            return (RECOVERED if outlet.recovered else OK) + b" " + str(outlet.start).encode("ascii")

        return d.addCallbacks(done, failed)

    async def setup(
        self,
        topic: str,
        channel: uuid.UUID,
        local: Optional[Subscription],
        client: Optional[uuid.UUID] = None,
        group: Optional[str] = None,
        identity: Optional[Identity] = None,
        since: Optional[Position] = None,
        last: Optional[int] = None,
    ) -> Outlet:
        """:meth:`open_outlet`, with ``channel`` marked as opening meanwhile (see :meth:`_control`).

        ``client``: the announcing client of a remote subscription, counted in
        ``setups_by_client`` while it is set up.
        """
        if channel in self.opening or channel in self.outlets:
            raise PulsyfluxError(f"channel {channel} is already subscribed")
        setup = Setup(topic, group)
        self.opening[channel] = setup
        if client is not None:
            self.setups_by_client[client] = self.setups_by_client.get(client, 0) + 1
        try:
            outlet = await self.open_outlet(topic, channel, local, group, identity, since, last)
        except BaseException:
            failure = Failure()
            self._setup_done(channel, client)
            for d in setup.waiters:
                d.errback(failure)
            raise
        self._setup_done(channel, client)
        outlet.owner = client
        for d in setup.waiters:
            d.callback(outlet)
        return outlet

    def _may_end(self, outlet: Outlet) -> bool:
        """Only the client that announced a subscription may unsubscribe it (knowing its channel is not enough)."""
        if outlet.owner is None:
            return True
        if self.provider is None:
            return False
        return self.provider.current_client_id == outlet.owner

    def _setup_done(self, channel: uuid.UUID, client: Optional[uuid.UUID]) -> None:
        """Undo what :meth:`setup` recorded while ``channel`` was being set up, however that ended."""
        del self.opening[channel]
        if client is not None:
            left = self.setups_by_client.pop(client, 1) - 1
            if left > 0:
                self.setups_by_client[client] = left

    async def open_outlet(
        self,
        topic: str,
        channel: uuid.UUID,
        local: Optional[Subscription],
        group: Optional[str] = None,
        identity: Optional[Identity] = None,
        since: Optional[Position] = None,
        last: Optional[int] = None,
    ) -> Outlet:
        """Connect a forwarding Consumer to ``channel``, check the subscriber answers, start forwarding.

        ``since`` / ``last``: start with retained messages (:meth:`_replay`).
        """
        if self.closing:
            raise ConnectionLostError("the broker is closing")
        # Beside the server (pulsyflux.server.inproc), only the broker may deliver on this channel.
        unguard = guard_channel(self.address, channel)
        if identity is not None and self.rights is not None:
            try:
                release = self.rights.claim(channel, identity)
            except PermissionDenied:
                unguard()
                raise
            unguard = _both(unguard, release)
        consumer: Optional[Consumer] = None
        try:
            consumer = await Consumer.connect(
                self.address, channel, reactor=self.reactor, reconnect=self.reconnect, token=self.token
            )
            # The subscriber's answer says which encodings it reads besides JSON (docs/protocol.md).
            answer = await send_until_registered(consumer, PROBE, self.reactor)
            if self.closing:
                raise ConnectionLostError("the broker is closing")
        except BaseException:
            unguard()
            if consumer is not None:
                await consumer.close()
            raise
        self._serial += 1
        outlet = Outlet(self, topic, consumer, local, self.backlog, self.backlog_bytes, f"sub-{self._serial}", group)
        # With history every forward is JSON (its texts carry their positions): binary only without it.
        outlet.binary = reads_binary(answer) and self.history is None
        outlet.unguard = unguard
        if identity is not None and self.rights is not None:
            self.rights.keep(outlet, identity)
        self.enlist(outlet)
        self.outlets[channel] = outlet
        self._replay(outlet, since, last)
        if self.reconnect:
            consumer.on_reconnect(lambda _: outlet.rejoin().addErrback(ignore))
        consumer.when_lost().addCallback(lambda _: self.remove(outlet, "connection to the server lost"))
        return outlet

    def remove(
        self,
        outlet: Outlet,
        reason: str,
        notify: bool = True,
        orphans: Sequence[Union[str, bytes]] = (),
        hand_over: bool = True,
    ) -> "Deferred[Any]":
        """Forget a subscription and close its connections (and a local stream).

        A queue group member's waiting messages, and ``orphans`` (forwards its
        subscriber never got), go to the group's other members (``hand_over``;
        not when the whole topic or broker goes).
        """
        if self.outlets.get(outlet.channel) is not outlet:
            return succeed(None)
        del self.outlets[outlet.channel]
        outlet.unguard()
        if outlet.identity is not None and self.rights is not None:
            self.rights.unkeep(outlet)
        self.delist(outlet)
        if outlet.group is not None and hand_over and not self.closing:
            self.hand_over(outlet, orphans)
        elif orphans:
            outlet.lost += len(orphans)
            self.lost += len(orphans)
        if outlet.pinned and self.history is not None:
            self.history.unsubscribe(outlet.topic)
        waits = [outlet.close(reason, notify=notify and outlet.local is None)]
        sub = outlet.local
        if sub is not None:
            waits.append(sub.end(reason))
        return DeferredList(waits, consumeErrors=True)

    def _request_id(self) -> Optional[bytes]:
        """The id of the request being handled (who sent it: the server knows, rights.py asks)."""
        provider = self.provider
        return provider.current_request_id if provider is not None else None

    def _replay(self, outlet: Outlet, since: Optional[Position], last: Optional[int]) -> None:
        """Start a new outlet with the retained messages asked for, then live ones.

        Called in the same reactor turn that makes the outlet a subscriber
        of its topic, so no publish falls between the replay and the live
        stream: no gap, no duplicate. The replay goes through the backlog
        (paged by ``batch`` and ``window``, bounded as any backlog). A
        remote subscriber that asked for nothing learns where its stream
        starts from a ``$pulsyflux/start`` notice (to resume from there).
        Patterns and queue groups have no positions of their own.
        """
        history = self.history
        asked = since is not None or last is not None
        if history is None or outlet.group is not None or is_pattern(outlet.topic):
            outlet.recovered = not asked  # asked, nothing comes
            return
        replay = history.subscribe(outlet.topic, since, last)
        outlet.pinned = True
        outlet.recovered = replay.recovered
        outlet.start = replay.start
        if not asked and outlet.local is None:
            notice = messages.control(messages.START, position=str(replay.start)).encode("utf-8")
            outlet.forward(notice, ())  # in order, ahead of every forward
        if replay.texts:
            for text in replay.texts:
                outlet.push(text)
                self.backlog_size += len(text)
            if self.backlog_size > self.total_backlog_bytes:
                self.trim_backlogs()
            outlet.flush()

    def trim_backlogs(self) -> None:
        """All backlogs together are over the bound: drop the oldest messages of the largest.

        Down to 15/16 of the bound, so the sort is paid once per 1/16 of it.
        """
        excess = self.backlog_size - (self.total_backlog_bytes - self.total_backlog_bytes // 16)
        for outlet in sorted(self.outlets.values(), key=lambda o: o.size, reverse=True):
            if excess <= 0 or not outlet.size:
                return
            excess -= outlet.trim(outlet.limit, max(outlet.size - excess, 0))

    def hand_over(self, outlet: Outlet, orphans: Sequence[Union[str, bytes]]) -> None:
        """A queue group member left (already out of the index): its ``orphans``
        and backlog go to the group's other members, one each, by the usual turns.

        Never a duplicate: orphans are forwards the server could not route to
        the member (NoProviderError), and the backlog was never sent. With no
        member left, they are counted lost (``close()`` counts the backlog).
        """
        if self.closing:
            return  # every member is going: close() counts what waits
        interest = self.index.get(outlet.topic)
        group = interest.groups.get(outlet.group) if interest is not None and outlet.group is not None else None
        if group is None:
            if orphans:
                outlet.lost += len(orphans)
                self.lost += len(orphans)
            return
        texts = [*orphans, *outlet.backlog]
        self.backlog_size -= outlet.size
        outlet.size = 0
        outlet.backlog.clear()
        touched: dict[Outlet, None] = {}
        for text in texts:
            member = group.pick(Outlet.has_room)
            if (type(text) is bytes) is not member.binary:
                # Into the member's encoding (an outlet's backlog holds only its own: Outlet.flush).
                text = messages.convert(text, member.binary)
            member.push(text)
            self.backlog_size += len(text)
            touched[member] = None
        self.requeued += len(texts)
        if self.backlog_size > self.total_backlog_bytes:
            self.trim_backlogs()
        for member in touched:
            member.flush()

    def remove_topic(self, topic: str, reason: str) -> "Deferred[Any]":
        return DeferredList(
            [self.remove(o, reason, hand_over=False) for o in self.subscribers(topic)], consumeErrors=True
        )

    def remove_all(self, reason: str) -> "Deferred[Any]":
        return DeferredList(
            [self.remove(o, reason, hand_over=False) for o in list(self.outlets.values())], consumeErrors=True
        )

    def stats(self) -> dict[str, Any]:
        return {
            "published": self.published,
            "delivered": self.delivered,
            "dropped": self.dropped,
            "lost": self.lost,
            "requeued": self.requeued,
            "rejected": self.rejected,
            "refused": self.refused,
            "backlog_bytes": self.backlog_size,
            "topics": {topic: len(interest) for topic, interest in self.index.items()},
            # Per topic (or pattern) while it has subscribers: messages fanned out to it, and accepted by them.
            "topic_published": {topic: interest.published for topic, interest in self.index.items()},
            "topic_delivered": {topic: interest.delivered() for topic, interest in self.index.items()},
            "groups": [
                {"topic": topic, "group": group.name, "members": len(group)}
                for topic, interest in self.index.items()
                for group in interest.groups.values()
            ],
            "subscriptions": [outlet.stats() for outlet in self.outlets.values()],
            "history": self.history.stats() if self.history is not None else None,
        }


def _both(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    def both() -> None:
        first()
        second()

    return both


def _alike(chosen: list[Optional[list[Outlet]]]) -> Optional[list[Outlet]]:
    """The one list of outlets every message of a batch goes to, if it is one list (one plain topic's)."""
    if len(chosen) < 2:
        return None
    first = chosen[0]
    if not first:
        return None
    for outlets in chosen:
        if outlets is not first:
            return None
    return first
