"""Consumers (callers) and Providers (callees) over one server connection each.

Both return Deferreds, so they work with callbacks, ``inlineCallbacks`` and
``await`` (inside ``Deferred.fromCoroutine`` or pytest-twisted):

    consumer = await Consumer.connect("127.0.0.1:9090", channel)
    reply = await consumer.send(b"hello", timeout=2.0)

    provider = await Provider.connect("127.0.0.1:9090", channel, handler=lambda data: data.upper())
"""

from __future__ import annotations

import json
import os
import random
import uuid
from typing import Any, Awaitable, Callable, Iterator, Optional, Union

from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred, DeferredQueue, fail, maybeDeferred, succeed
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._types import IStreamTransport
from ..endpoints import Address, client_endpoint
from ..wire import codec, errors
from ..wire.codec import (
    CHUNK,
    END,
    ERROR,
    RESPONSE,
    RESPONSE_CHUNK,
    RESPONSE_END,
    RESPONSE_START,
    ROLE_CONSUMER,
    ROLE_PROVIDER,
    ROUTING_SIZE,
    START,
    FrameDecoder,
)
from ..wire.deadlines import Deadlines
from ..wire.errors import (
    PREFIX_PERMISSION_DENIED,
    ConnectionLostError,
    PermissionDenied,
    ProtocolError,
    RequestTimeout,
    error_from_message,
)
from ..wire.printable import printable
from ..writer import ImmediateWriter

__all__ = [
    "Consumer",
    "Provider",
    "Request",
    "ChannelId",
    "DEFAULT_BACKOFF",
    "DEFAULT_MAX_INCOMPLETE",
    "DEFAULT_INCOMPLETE_TIMEOUT",
]

ChannelId = Union[uuid.UUID, str, bytes]
Handler = Callable[[bytes], Union[bytes, "Deferred[bytes]", Awaitable[bytes]]]
# reconnect=True, or a policy: attempt number (0, 1, ...) -> seconds to wait before it.
Reconnect = Union[bool, Callable[[int], float]]
# 0.1 s doubling to 5 s, plus up to 0.25 s of jitter so a restarted server is not hit by all at once.
DEFAULT_BACKOFF = backoffPolicy(initialDelay=0.1, maxDelay=5.0, factor=2.0, jitter=lambda: random.uniform(0, 0.25))

_write_request = codec.write_request
_write_response = codec.write_response
_ZERO_ID = bytes(16)

# A Provider's backstop for requests whose END never comes (a server that does
# not say it gave up on them, or a consumer that stalls with no deadline):
DEFAULT_MAX_INCOMPLETE = 64 << 20  # bytes held across all incomplete requests
DEFAULT_INCOMPLETE_TIMEOUT = 60.0  # seconds an incomplete request may go without a frame


def _worth_logging(count: int) -> bool:
    """Log the 1st, 2nd, 4th, 8th... occurrence: what a peer can repeat costs log2(N) lines, with no timer."""
    return count & (count - 1) == 0


def channel_bytes(channel: ChannelId) -> bytes:
    """The 16 raw bytes of a channel id given as UUID, string or bytes."""
    if isinstance(channel, uuid.UUID):
        return channel.bytes
    if isinstance(channel, bytes) and len(channel) == 16:
        return channel
    if isinstance(channel, str):
        return uuid.UUID(channel).bytes
    raise TypeError(f"channel id must be a UUID, a UUID string or 16 bytes, not {channel!r}")


def _check_token(token: str) -> str:
    """A token as it goes on the wire: ASCII (a JWT is), at most 8 KiB, no surrounding space."""
    token = token.strip()
    if not token or len(token) > 8192 or not token.isascii() or not token.isprintable():
        raise ValueError("a token is a JWT: 1 to 8192 printable ASCII characters")
    return token


def _new_id() -> bytes:
    """A random (version 4) UUID as 16 bytes, without building a UUID object."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    return bytes(raw)


def _random_ids(batch: int = 256) -> Iterator[bytes]:
    """Unpredictable 16-byte request ids, read from the OS a batch at a time.

    Random, not a counter: providers see a consumer's ids, and must not be
    able to guess (and claim first) the ones it will use next. One system
    call per ``batch`` requests keeps that cheap.
    """
    size = 16 * batch
    while True:
        block = os.urandom(size)
        for offset in range(0, size, 16):
            yield block[offset : offset + 16]


def _id_source() -> Callable[[], bytes]:
    """The request id generator of one client."""
    return _random_ids().__next__


def _when(done: bool, value: Any, waiters: list[Deferred[Any]]) -> "Deferred[Any]":
    """Fires with ``value``: at once if ``done``, else when the owner fires ``waiters``."""
    if done:
        return succeed(value)
    d: Deferred[Any] = Deferred()
    waiters.append(d)
    return d


class _ClientProtocol(Protocol):
    """Frames in, frames out; the owning client decides what they mean."""

    transport: IStreamTransport  # set before connectionMade, never None after
    writer: ImmediateWriter  # made by connectionMade

    def __init__(self, owner: "_Client") -> None:
        self.owner = owner
        self.decoder = FrameDecoder()

    def connectionMade(self) -> None:
        for option in ("setTcpNoDelay", "setTcpKeepAlive"):
            setter = getattr(self.transport, option, None)
            if setter is not None:
                setter(True)
        self.writer = ImmediateWriter(self.transport)

    def dataReceived(self, data: bytes) -> None:
        owner = self.owner
        # Until the registration probe is answered, frames pass its check first (one test per read, not per frame).
        frame_received = owner._frame_received if owner._registration is None else owner._await_registration
        writer = self.writer
        writer.hold()  # what the frames of this read cause to be sent leaves in one send
        try:
            for ftype, flags, request_id, payload in self.decoder.frames(data):
                frame_received(ftype, flags, request_id, payload)
        except ProtocolError as error:
            self.owner._protocol_error(error)
            self.transport.loseConnection()
        finally:
            writer.release()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.owner._connection_lost(reason)


class _Client:
    """What Consumer and Provider share: connect, register, close."""

    role: int
    log = Logger()

    def __init__(self, channel_id: ChannelId, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.channel_id = uuid.UUID(bytes=channel_bytes(channel_id))
        self._channel = self.channel_id.bytes
        self.client_id = uuid.UUID(bytes=_new_id())
        self._client = self.client_id.bytes
        self._protocol: Optional[_ClientProtocol] = None
        self._write: Callable[[bytes], None] = self._write_closed
        self._closed: Optional[Exception] = None
        self._lost = False
        self._lost_waiters: list[Deferred[None]] = []
        # While a Provider waits for its probe's answer: (probe id, fired when answered, the wait's timer).
        self._registration: Optional[tuple[bytes, Deferred[None], IDelayedCall]] = None
        self._address: Optional[Address] = None
        self._backoff: Optional[Callable[[int], float]] = None  # set: reconnect when the line drops
        self._attempts = 0
        self._retry: Union[IDelayedCall, Deferred[Any], None] = None  # the pending reconnect attempt
        self._given_up = False  # closed or refused: never reconnect again
        self._reconnect_hooks: list[Callable[[Any], Any]] = []
        self._connected_waiters: list[Deferred[Any]] = []
        self.reconnects = 0
        self._server_said = ""  # the server's last word (an ERROR on the zero id) before it closes the line
        self._unmatched = 0  # ERRORs no call waited for (logged at powers of two)
        # Tokens (docs/security.md): presented in an AUTH frame before registering, on every (re)connect.
        self.token: Optional[str] = None
        self.token_subject: Optional[str] = None  # as the server read it (None: not checked)
        self.token_expires: Optional[float] = None
        self._auth_pending: Optional[bytes] = None  # the first AUTH's id until the server answers it
        self._auth_waiters: dict[bytes, Deferred[None]] = {}  # refresh() calls waiting for their answer

    @classmethod
    def _connect(
        cls, address: Address, client: "_Client", reconnect: Reconnect = False, token: Optional[str] = None
    ) -> "Deferred[Any]":
        if token is not None:
            client.token = _check_token(token)
        if reconnect:
            client._address = address
            client._backoff = DEFAULT_BACKOFF if reconnect is True else reconnect
        endpoint = client_endpoint(client.reactor, address)
        d = connectProtocol(endpoint, _ClientProtocol(client))

        def connected(proto: _ClientProtocol) -> Any:
            registered = client._attach(proto)
            if registered is None:
                return client
            return registered.addCallback(lambda _: client)

        return d.addCallback(connected)

    # -- reconnecting (opt-in: connect(..., reconnect=True)) -------------------

    @property
    def reconnecting(self) -> bool:
        """True while this client has lost its connection and is trying again."""
        return self._backoff is not None and self._protocol is None and not self._given_up

    def on_reconnect(self, callback: Callable[[Any], Any]) -> None:
        """Call ``callback(client)`` each time a lost connection is back and registered.

        consumer.on_reconnect(lambda c: log.info("back"))
        """
        self._reconnect_hooks.append(callback)

    def when_connected(self) -> "Deferred[Any]":
        """Fires with this client once it is connected (at once if it is)."""
        return _when(self.connected, self, self._connected_waiters)

    def _lost_and_retrying(self, reason: Failure) -> bool:
        """The line dropped: fail what was in flight at once, then reconnect with backoff."""
        if self._backoff is None or self._given_up:
            return False
        if self._server_said.startswith(PREFIX_PERMISSION_DENIED):
            return False  # refused, not lost: the same token would be refused again (no reconnect storm)
        why = self._server_said or reason.getErrorMessage()
        self._server_said = ""
        error = ConnectionLostError(f"connection to the server lost: {why} (reconnecting)")
        self._protocol = None
        self._closed = error  # sends fail at once until the line is back
        self._write = self._write_closed
        self.log.info("connection to {a} lost: {why}; reconnecting", a=self._address, why=why)
        self._schedule_reconnect()  # first: a callback below may close() for good
        self._registered(error)
        self._fail_pending(error)
        return True

    def _schedule_reconnect(self) -> None:
        assert self._backoff is not None  # reconnecting is on: connect(..., reconnect=...) set both
        delay = self._backoff(self._attempts)
        self._attempts += 1
        self._retry = self.reactor.callLater(delay, self._reconnect)

    def _reconnect(self) -> None:
        assert self._address is not None  # reconnecting is on: connect(..., reconnect=...) set both
        endpoint = client_endpoint(self.reactor, self._address)
        self._retry = attempt = connectProtocol(endpoint, _ClientProtocol(self))

        def connected(proto: _ClientProtocol) -> Any:
            self._retry = None
            self._closed = None
            self._lost = False
            registered = self._attach(proto)
            return registered.addCallback(lambda _: self._reconnected()) if registered else self._reconnected()

        def failed(failure: Failure) -> None:
            if self._retry is attempt:
                self._retry = None
                self._schedule_reconnect()

        attempt.addCallbacks(connected, failed)
        attempt.addErrback(lambda failure: None)  # a registration that died is retried via _connection_lost

    def _reconnected(self) -> None:
        self._attempts = 0
        self.reconnects += 1
        self.log.info("reconnected to {a}", a=self._address)
        for hook in list(self._reconnect_hooks):
            maybeDeferred(hook, self).addErrback(
                lambda failure: self.log.failure("on_reconnect callback failed", failure)
            )
        self._fire_connected()

    def _fire_connected(self) -> None:
        waiters, self._connected_waiters = self._connected_waiters, []
        for d in waiters:
            d.callback(self)

    def _stop_reconnecting(self) -> bool:
        """No more attempts; True if the client was between connections."""
        retry, self._retry = self._retry, None
        self._given_up = True
        if self._backoff is None:
            return False
        if retry is not None:
            retry.cancel()
        return self._protocol is None

    # Providers wait until the server has processed their registration, so a
    # request sent right after connect() fires finds them. Consumers need not:
    # their first request registers them anyway.
    confirm_registration = False
    registration_wait = 2.0  # seconds to wait for a server that never answers the probe

    def _attach(self, proto: _ClientProtocol) -> Optional["Deferred[None]"]:
        self._protocol = proto
        self._write = proto.writer.write
        request_id = _new_id()
        frames = codec.encode_registration(self.role, self._client, self._channel, request_id)
        if self.token is not None:
            # The token first, on the registration's id: a refusal answers there and fails connect().
            frames = codec.encode_frame(codec.AUTH, request_id, self.token.encode("ascii")) + frames
            self._auth_pending = request_id
        elif not self.confirm_registration:
            self._write(frames)
            return None
        registered: Deferred[None] = Deferred()
        timer = self.reactor.callLater(self.registration_wait, self._registered, None)
        self._registration = (request_id, registered, timer)  # until it is None, reads go through _await_registration
        self._write(frames + codec.encode_frame(codec.PROBE, request_id))
        return registered

    def _await_registration(self, ftype: int, flags: int, request_id: bytes, payload: bytes) -> None:
        registration = self._registration  # None once answered: the rest of the same read is ordinary frames
        if registration is not None and ftype == ERROR and request_id == registration[0]:
            # The probe's answer (``invalid message type``): registered. A
            # refusal comes first with the same id, and the server closes the line.
            message = codec.error_message(payload)
            error = error_from_message(message)
            if isinstance(error, PermissionDenied):
                self._refused(error)
            elif self._auth_pending == request_id and message == errors.MSG_BAD_TYPE:
                # The answer to the AUTH from a server that does not check tokens: the probe's follows.
                self._auth_pending = None
            else:
                self._registered(None)
        elif registration is not None and ftype == codec.AUTH and request_id == registration[0]:
            self._auth_pending = None
            self._token_accepted(payload)
        else:
            self._frame_received(ftype, flags, request_id, payload)

    def _refused(self, error: PermissionDenied) -> None:
        """The server refused the registration: fail connect() with its reason, never come back."""
        self.log.warn("server refused the registration on {c}: {e}", c=self.channel_id, e=error)
        self._stop_reconnecting()
        self._closed = error
        self._write = self._write_closed
        self._registered(error)
        if self._protocol is not None:
            self._protocol.transport.loseConnection()

    def _registered(self, error: Optional[Exception]) -> None:
        """End the wait for the probe's answer: with ``error`` if the line died."""
        registration, self._registration = self._registration, None
        if registration is None:
            return
        _, registered, timer = registration
        if timer.active():
            timer.cancel()
        if error is None:
            registered.callback(None)
        else:
            registered.errback(error)

    @property
    def connected(self) -> bool:
        return self._protocol is not None and self._closed is None

    def _write_closed(self, data: bytes) -> None:
        raise self._closed or ConnectionLostError("not connected")

    def when_lost(self) -> "Deferred[None]":
        """Fires once the connection is gone, whoever closed it (used by the broker)."""
        return _when(self._lost, None, self._lost_waiters)

    def close(self) -> "Deferred[None]":
        """Close the connection; fires once it is gone. Pending calls fail."""
        if self._stop_reconnecting():
            self._closed = ConnectionLostError("connection closed by the client")
            self._connection_lost(Failure(self._closed))
            return succeed(None)
        if self._protocol is None or self._lost:
            return succeed(None)
        d = self.when_lost()
        if self._closed is None:
            self._closed = ConnectionLostError("connection closed by the client")
            self._fail_pending(self._closed)
            self._protocol.transport.loseConnection()
        return d

    def _protocol_error(self, error: ProtocolError) -> None:
        self.log.error("protocol error from server: {error}", error=error)
        if self._closed is None:
            self._closed = ConnectionLostError(f"protocol error from the server: {error}")
            self._fail_pending(self._closed)

    def _unmatched_error(self, request_id: bytes, payload: bytes) -> None:
        """An ERROR no call waits for; one on the zero request id says why the server closes the line."""
        message = codec.error_message(payload)
        waiter = self._auth_waiters.pop(request_id, None)
        if waiter is not None:
            if message == errors.MSG_BAD_TYPE:
                waiter.callback(None)  # a server that does not check tokens: nothing to refresh
            else:
                waiter.errback(error_from_message(message))  # refused: the connection keeps the rights it had
            return
        if request_id == _ZERO_ID or message.startswith(PREFIX_PERMISSION_DENIED):
            self._server_said = message
        self._unmatched += 1
        if _worth_logging(self._unmatched):  # the network decides how many: a bounded number of lines
            self.log.info("server error for request {r}: {m} ({n} such errors so far)",
                          r=uuid.UUID(bytes=request_id), m=printable(message, 200), n=self._unmatched)  # fmt: skip

    def _connection_lost(self, reason: Failure) -> None:
        if self._lost_and_retrying(reason):
            return
        self._lost = True
        if self._closed is None:
            why = self._server_said or reason.getErrorMessage()
            if why.startswith(PREFIX_PERMISSION_DENIED):
                self._closed = PermissionDenied(why)  # refused, not lost (and not reconnected)
            else:
                self._closed = ConnectionLostError(f"connection to the server lost: {why}")
        for waiter in list(self._auth_waiters.values()):
            waiter.errback(self._closed)
        self._auth_waiters.clear()
        self._write = self._write_closed
        self._registered(self._closed)
        self._fail_pending(self._closed)
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(None)
        waiters, self._connected_waiters = self._connected_waiters, []
        for d in waiters:
            d.errback(self._closed)

    def _fail_pending(self, error: Exception) -> None:
        raise NotImplementedError

    # -- tokens ------------------------------------------------------------------

    def refresh(self, token: str) -> "Deferred[None]":
        """Present a new token on the live connection (and on every reconnect from now on).

        Fires once the server accepted it; fails with
        :class:`~pulsyflux.errors.PermissionDenied` if it refused it (the
        connection keeps the rights of the token it had, until that one
        expires). Rights the new token no longer grants end now.
        """
        token = _check_token(token)
        if self._protocol is None or self._closed is not None:
            self.token = token
            return succeed(None)  # presented when the line is back
        request_id = _new_id()
        d: Deferred[None] = Deferred()

        def accepted(_: None) -> None:
            self.token = token  # also what a reconnect presents from now on

        self._auth_waiters[request_id] = d
        self._write(codec.encode_frame(codec.AUTH, request_id, token.encode("ascii")))
        return d.addCallback(accepted)

    def _token_accepted(self, payload: bytes) -> None:
        try:
            answer = json.loads(payload)
            self.token_subject = str(answer.get("subject"))
            expires = answer.get("expires")
            self.token_expires = float(expires) if expires is not None else None
        except (ValueError, TypeError, AttributeError):
            self.token_subject = self.token_expires = None

    def _auth_frame(self, request_id: bytes, payload: bytes) -> None:
        """An AUTH answer outside registration: a refresh() accepted."""
        waiter = self._auth_waiters.pop(request_id, None)
        if waiter is not None:
            self._token_accepted(payload)
            waiter.callback(None)

    def _frame_received(self, ftype: int, flags: int, request_id: bytes, payload: bytes) -> None:
        raise NotImplementedError


class _Pending:
    __slots__ = ("deferred", "chunks")

    def __init__(self, deferred: "Deferred[bytes]") -> None:
        self.deferred = deferred
        self.chunks: list[bytes] = []


class Consumer(_Client):
    """Sends requests on one channel; any number may be in flight.

    consumer = await Consumer.connect("127.0.0.1:9090", channel)
    reply = await consumer.send(b"ping")
    """

    role = ROLE_CONSUMER

    def __init__(self, channel_id: ChannelId, reactor: Any = None) -> None:
        super().__init__(channel_id, reactor)
        self._pending: dict[bytes, _Pending] = {}
        self._deadlines = Deadlines(self.reactor, self._pending, self._expire)
        self._next_id = _id_source()

    @classmethod
    def connect(
        cls,
        address: Address,
        channel_id: ChannelId,
        reactor: Any = None,
        *,
        reconnect: Reconnect = False,
        token: Optional[str] = None,
    ) -> "Deferred[Consumer]":
        """Connect to the server at ``address`` and register on ``channel_id``.

        With ``reconnect`` (True or a backoff policy) a lost connection is
        re-established and re-registered; requests in flight when it drops,
        and sends while it is down, fail at once with ConnectionLostError.
        With ``token`` (a JWT, docs/security.md) the connection presents it
        first and ``connect`` waits for the server's answer: a refused token
        or a missing right fails it with PermissionDenied.
        """
        return cls._connect(address, cls(channel_id, reactor), reconnect, token)

    @property
    def pending(self) -> int:
        """Requests sent whose response has not arrived."""
        return len(self._pending)

    def send(self, payload: bytes = b"", timeout: float = 5.0) -> "Deferred[bytes]":
        """Send one request; fires with the response body.

        Fails with :class:`~pulsyflux.wire.errors.NoProviderError`,
        :class:`~pulsyflux.wire.errors.RemoteError`,
        :class:`~pulsyflux.wire.errors.RequestTimeout` (nothing complete within
        ``timeout`` seconds) or :class:`~pulsyflux.wire.errors.ConnectionLostError`.
        """
        if self._closed is not None or self._protocol is None:
            return fail(self._closed or ConnectionLostError("not connected"))
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
        request_id = self._next_id()

        def cancel(_: object) -> None:
            self._drop(request_id)  # a late answer is ignored

        d: Deferred[bytes] = Deferred(cancel)
        pending = _Pending(d)
        self._pending[request_id] = pending
        timeout_ms = max(int(timeout * 1000), 1) if timeout else 0
        # One write for a small request; a large one piece by piece (never copied to join it).
        _write_request(self._write, request_id, timeout_ms, self._client, self._channel, payload)
        if timeout:
            self._deadlines.add(request_id, pending, timeout)
        return d

    def _drop(self, request_id: bytes) -> Optional[_Pending]:
        return self._pending.pop(request_id, None)  # its deadline, if any, is skipped when due

    def _expire(self, request_id: bytes, pending: _Pending) -> None:
        del self._pending[request_id]
        pending.deferred.errback(RequestTimeout(errors.MSG_TIMED_OUT))

    def _frame_received(self, ftype: int, flags: int, request_id: bytes, payload: bytes) -> None:
        if ftype == RESPONSE_CHUNK:
            pending = self._pending.get(request_id)
            if pending is not None:
                pending.chunks.append(payload)
        elif ftype == RESPONSE_END:
            pending = self._pending.pop(request_id, None)
            if pending is not None:
                chunks = pending.chunks
                pending.deferred.callback(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        elif ftype == RESPONSE_START:
            pass  # routing only; the body follows
        elif ftype == ERROR:
            pending = self._drop(request_id)
            if pending is not None:
                pending.deferred.errback(error_from_message(codec.error_message(payload)))
            else:
                self._unmatched_error(request_id, payload)
        elif ftype == RESPONSE:
            pending = self._drop(request_id)
            if pending is not None:
                pending.deferred.callback(payload[ROUTING_SIZE:])
        elif ftype == codec.AUTH:
            self._auth_frame(request_id, payload)
        # Anything else is not for a consumer: ignore it, as Go clients do.

    def _fail_pending(self, error: Exception) -> None:
        self._deadlines.clear()
        for request_id in list(self._pending):
            pending = self._drop(request_id)
            if pending is not None:
                pending.deferred.errback(error)


class _Incoming:
    """A request whose START has come and whose END has not."""

    __slots__ = ("routing", "parts", "size", "seen")

    def __init__(self, routing: bytes, seen: int) -> None:
        self.routing = routing
        self.parts: list[bytes] = []
        self.size = 0
        self.seen = seen  # the provider's sweep count at its last frame


_UNKNOWN: Any = object()


class Request:
    """A complete request as a provider sees it.

    ``id`` is the request's UUID; ``payload`` its whole body.
    """

    __slots__ = ("id", "payload", "_raw_id")

    def __init__(self, raw_id: bytes, payload: bytes) -> None:
        self._raw_id = raw_id
        self.id = uuid.UUID(bytes=raw_id)
        self.payload = payload

    def __repr__(self) -> str:
        return f"Request(id={self.id}, payload={self.payload[:32]!r}{'...' if len(self.payload) > 32 else ''})"


class Provider(_Client):
    """Answers requests sent on one channel.

    Either pull them: ``req = await provider.receive()`` then
    ``provider.respond(req.id, b"answer")``; or give a ``handler`` that maps
    the payload to the response (bytes, a Deferred or a coroutine). A handler
    that raises answers with an ERROR carrying the exception's text (its
    first 4 KiB: ``codec.MAX_ERROR_TEXT``).

    When the server gives up on a request (its consumer left, its deadline
    passed), it says so with an ERROR: the provider frees the partial body,
    and ``respond()`` to it does nothing. As a backstop, requests still
    arriving may hold ``max_incomplete`` bytes in all (the request that
    would pass it is refused: ``request too large``) and may go
    ``incomplete_timeout`` seconds without a frame (then dropped, answered
    ``request timed out``, within 1.5 times that; None: no age limit);
    ``incomplete_dropped`` counts both.

        provider = Provider(channel, max_incomplete=8 << 20)
    """

    role = ROLE_PROVIDER
    confirm_registration = True

    def __init__(
        self,
        channel_id: ChannelId,
        reactor: Any = None,
        handler: Optional[Handler] = None,
        *,
        max_incomplete: int = DEFAULT_MAX_INCOMPLETE,
        incomplete_timeout: Optional[float] = DEFAULT_INCOMPLETE_TIMEOUT,
    ) -> None:
        if max_incomplete <= 0:
            raise ValueError(f"max_incomplete must be a positive number of bytes, not {max_incomplete!r}")
        super().__init__(channel_id, reactor)
        self.handler = handler
        self.max_incomplete = max_incomplete
        self.incomplete_timeout = incomplete_timeout
        self.incomplete_dropped = 0
        self._incoming: dict[bytes, _Incoming] = {}  # requests still arriving
        self._incomplete_bytes = 0
        self._sweeps = 0  # one timer for every incomplete request: see _sweep
        self._sweeper: Optional[IDelayedCall] = None
        self._lost_ids: frozenset[bytes] = frozenset()  # in flight when the line dropped: respond() ignores them
        # request id -> routing until answered; None once the server gave up on it (respond() is a no-op)
        self._routing: dict[bytes, Optional[bytes]] = {}
        self._handling: Optional[bytes] = None  # the request id whose handler call is running
        self._queue: DeferredQueue[Request] = DeferredQueue()

    @classmethod
    def connect(
        cls,
        address: Address,
        channel_id: ChannelId,
        handler: Optional[Handler] = None,
        reactor: Any = None,
        *,
        reconnect: Reconnect = False,
        max_incomplete: int = DEFAULT_MAX_INCOMPLETE,
        incomplete_timeout: Optional[float] = DEFAULT_INCOMPLETE_TIMEOUT,
        token: Optional[str] = None,
    ) -> "Deferred[Provider]":
        """Connect to the server at ``address`` and register on ``channel_id``.

        With ``reconnect`` (True or a backoff policy) a lost connection is
        re-established and re-registered; requests it was answering are
        dropped (their consumers were told), ``receive()`` keeps waiting.
        ``max_incomplete`` and ``incomplete_timeout``: see :class:`Provider`.
        ``token``: presented before registering, as for :meth:`Consumer.connect`.
        """
        provider = cls(
            channel_id, reactor, handler, max_incomplete=max_incomplete, incomplete_timeout=incomplete_timeout
        )
        return cls._connect(address, provider, reconnect, token)

    def receive(self) -> "Deferred[Request]":
        """The next complete request (fails with ConnectionLostError once closed)."""
        if self._closed is not None and not self._queue.pending and not self.reconnecting:
            return fail(self._closed)
        return self._queue.get()

    @property
    def unanswered(self) -> int:
        """Requests received (or arriving) that have not been responded to."""
        return len(self._routing)

    @property
    def current_client_id(self) -> Optional[uuid.UUID]:
        """The client id of the consumer whose request the ``handler`` is being called with; else None.

        Set only during the synchronous handler call (read it before any
        await). The server refuses a request whose client id is not the one
        its connection registered with, so this names one connection of the
        sender's: enough to share limits fairly between clients, not an
        identity (anyone may open more connections; docs/security.md).
        """
        request_id = self._handling
        if request_id is None:
            return None
        routing = self._routing.get(request_id)
        return None if routing is None else uuid.UUID(bytes=routing[:16])

    @property
    def current_request_id(self) -> Optional[bytes]:
        """The raw id of the request the ``handler`` is being called with (during that call only); else None.

        The broker beside the server asks the server who sent it (pulsyflux.auth).
        """
        return self._handling

    @property
    def incomplete_bytes(self) -> int:
        """Bytes held for requests whose END has not arrived (at most ``max_incomplete``)."""
        return self._incomplete_bytes

    def respond(
        self,
        request_id: Union[uuid.UUID, bytes, Request],
        payload: bytes = b"",
        error: Union[str, BaseException, None] = None,
    ) -> None:
        """Answer a request with ``payload``, or with ``error`` (an ERROR frame)."""
        if isinstance(request_id, Request):
            raw = request_id._raw_id
        elif isinstance(request_id, uuid.UUID):
            raw = request_id.bytes
        else:
            raw = request_id
        routing = self._routing.pop(raw, _UNKNOWN)
        if routing is _UNKNOWN:
            if raw in self._lost_ids:
                return  # its connection dropped; the consumer was told
            raise KeyError(f"no unanswered request {uuid.UUID(bytes=raw)}")
        self._send_answer(raw, routing, payload, error)

    def _send_answer(
        self, raw: bytes, routing: Optional[bytes], payload: bytes, error: Union[str, BaseException, None]
    ) -> None:
        """Answer request ``raw``, whose entry was just taken from ``_routing`` (``routing``: its value)."""
        if routing is None or self._closed is not None:
            return  # the server gave up on it, or the line is dead: the consumer was told
        if error is not None:
            message = error if isinstance(error, str) else (str(error) or type(error).__name__)
            # error_payload bounds the text: an error of any size fits one frame and keeps the connection.
            self._write(codec.encode_frame(ERROR, raw, codec.error_payload(message, routing)))
            return
        # One write for a small response; a large one piece by piece (never copied to join it).
        _write_response(self._write, raw, routing, payload)

    def _frame_received(self, ftype: int, flags: int, request_id: bytes, payload: bytes) -> None:
        if ftype == CHUNK:
            held = self._incoming.get(request_id)
            if held is not None:
                size = len(payload)
                if self._incomplete_bytes + size > self.max_incomplete:
                    message = errors.too_large(
                        "request", f"the provider holds {self.max_incomplete} bytes of requests at most"
                    )
                    self._drop_incomplete(request_id, held, message)
                    return
                held.parts.append(payload)
                held.size += size
                held.seen = self._sweeps
                self._incomplete_bytes += size
        elif ftype == END:
            held = self._incoming.pop(request_id, None)
            if held is None:
                return
            self._incomplete_bytes -= held.size
            parts = held.parts
            body = parts[0] if len(parts) == 1 else b"".join(parts)
            self._routing[request_id] = held.routing
            self._dispatch(request_id, body)
        elif ftype == START:
            if len(payload) != ROUTING_SIZE:
                self.log.warn("START with a {n}-byte routing ignored", n=len(payload))
                return
            old = self._incoming.get(request_id)
            if old is not None:
                self._incomplete_bytes -= old.size
            self._incoming[request_id] = _Incoming(payload, self._sweeps)
            if self._sweeper is None and self.incomplete_timeout:  # None or 0: no age limit
                self._sweeper = self.reactor.callLater(self.incomplete_timeout / 2, self._sweep)
        elif ftype == ERROR:
            # The server gave up on a request (its consumer left, its deadline
            # passed, too large, ...): free its partial body, ignore its answer.
            held = self._incoming.pop(request_id, None)
            if held is not None:
                self._incomplete_bytes -= held.size
            if request_id in self._routing:
                self._routing[request_id] = None  # respond() becomes a no-op; it removes the entry
            elif held is None:
                self._unmatched_error(request_id, payload)
                return
            self.log.debug(
                "server gave up on request {r}: {m}", r=uuid.UUID(bytes=request_id), m=codec.error_message(payload)
            )
        elif ftype == codec.AUTH:
            self._auth_frame(request_id, payload)

    def _sweep(self) -> None:
        """Every ``incomplete_timeout / 2`` s while requests are incomplete: drop those idle for 3 sweeps.

        One timer per provider, not one per request: a frame only records
        the sweep count, so a request is dropped 1 to 1.5 times
        ``incomplete_timeout`` after its last frame.
        """
        self._sweeper = None
        self._sweeps += 1
        oldest = self._sweeps - 3
        stale = [(request_id, held) for request_id, held in self._incoming.items() if held.seen <= oldest]
        for request_id, held in stale:
            self._drop_incomplete(request_id, held, errors.MSG_TIMED_OUT)
        if self._incoming and self.incomplete_timeout:  # a sweep runs only with a timeout
            self._sweeper = self.reactor.callLater(self.incomplete_timeout / 2, self._sweep)

    def _drop_incomplete(self, request_id: bytes, held: _Incoming, message: str) -> None:
        """Free an incomplete request and answer it with ``message`` (the consumer may still wait)."""
        del self._incoming[request_id]
        self._incomplete_bytes -= held.size
        self.incomplete_dropped += 1
        if _worth_logging(self.incomplete_dropped):  # consumers decide how many: a bounded number of lines
            self.log.warn(
                "dropped incomplete request {r} ({n} bytes held): {m} ({d} dropped so far)",
                r=uuid.UUID(bytes=request_id),
                n=held.size,
                m=message,
                d=self.incomplete_dropped,
            )
        if self._closed is None:
            self._write(codec.encode_frame(ERROR, request_id, codec.error_payload(message, held.routing)))

    def _dispatch(self, request_id: bytes, body: bytes) -> None:
        handler = self.handler
        if handler is None:
            self._queue.put(Request(request_id, body))
            return
        outer, self._handling = self._handling, request_id  # outer: a handler re-entered in-process
        try:
            result = handler(body)
        except BaseException:  # as maybeDeferred does: any exception answers with an ERROR
            self._answer_error(Failure(), request_id)
            return
        finally:
            self._handling = outer
        if isinstance(result, Deferred):
            result.addCallback(self._answer, request_id)
            result.addErrback(self._answer_error, request_id)
        elif isinstance(result, Failure):
            self._answer_error(result, request_id)
        else:
            self._answer(result, request_id)  # bytes (no Deferred at all), or an awaitable

    def _answer(self, result: Any, request_id: bytes) -> None:
        if type(result) is not bytes:
            if hasattr(result, "__await__"):
                d = Deferred.fromCoroutine(result) if hasattr(result, "send") else Deferred.fromFuture(result)
                d.addCallback(self._answer, request_id)
                d.addErrback(self._answer_error, request_id)
                return
            if result is None:
                result = b""
            elif not isinstance(result, (bytearray, memoryview)):
                error = TypeError(f"handler returned {type(result).__name__}, not bytes")
                self._answer_error(Failure(error), request_id)
                return
            result = bytes(result)
        routing = self._routing.pop(request_id, _UNKNOWN)  # unknown: answered already, or its line dropped
        if routing is not _UNKNOWN:
            self._send_answer(request_id, routing, result, None)

    def _answer_error(self, failure: Failure, request_id: bytes) -> None:
        routing = self._routing.pop(request_id, _UNKNOWN)
        if routing is not _UNKNOWN:
            self._send_answer(request_id, routing, b"", failure.value)

    def _fail_pending(self, error: Exception) -> None:
        self._incoming.clear()
        self._incomplete_bytes = 0
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None and sweeper.active():
            sweeper.cancel()
        self._lost_ids = frozenset(self._routing)  # respond() to these is a no-op, not a KeyError
        self._routing.clear()
        if self.reconnecting:
            return  # receive() waits for the next connection
        while self._queue.waiting:
            self._queue.waiting.pop(0).errback(error)
