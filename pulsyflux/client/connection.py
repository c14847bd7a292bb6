"""What Consumers and Providers share: one server connection, its registration, and reconnecting.

:class:`Client` connects (``connect`` / ``open``), registers with a
first START and waits for the server to accept it, reconnects with backoff
when ``reconnect`` asks for it, and fails what is pending when the line
drops; :class:`~pulsyflux.client.consumer.Consumer` and
:class:`~pulsyflux.client.provider.Provider` add the frames of their role.
"""

from __future__ import annotations

import json
import os
import random
import uuid
from typing import Any, Callable, Optional, Sequence, TypeVar, Union

from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._reactor import default_reactor
from .._types import IStreamTransport
from ..endpoints import Address, client_endpoint
from ..wire import codec, errors
from ..wire.codec import ERROR, FrameDecoder
from ..wire.codec import HEADER_SIZE as _HEADER_SIZE
from ..wire.errors import (
    PREFIX_PERMISSION_DENIED,
    ConnectionLostError,
    PermissionDenied,
    ProtocolError,
    error_from_message,
)
from ..wire.printable import printable
from ..writer import ImmediateWriter

_unpack_header_from = codec.HEADER.unpack_from

__all__ = ["ChannelId", "Reconnect", "DEFAULT_BACKOFF", "NOT_PULSYFLUX", "worth_logging", "channel_bytes", "Client"]

log = Logger()


ChannelId = Union[uuid.UUID, str, bytes]
# reconnect=True, or a policy: attempt number (0, 1, ...) -> seconds to wait before it.
Reconnect = Union[bool, Callable[[int], float]]
# 0.1 s doubling to 5 s, plus up to 0.25 s of jitter so a restarted server is not hit by all at once.
DEFAULT_BACKOFF = backoffPolicy(initialDelay=0.1, maxDelay=5.0, factor=2.0, jitter=lambda: random.uniform(0, 0.25))
_ZERO_ID = bytes(16)


# What a client says when the other end answered in something else than
# pulsyflux frames: most often the HTTP API's port given as the server.
NOT_PULSYFLUX = "that port does not speak pulsyflux"


def _not_pulsyflux(data: bytes) -> str:
    """One line for a peer whose very first bytes are not a pulsyflux frame (an HTTP server, SSH, ...)."""
    first = data.split(b"\n", 1)[0].strip()
    said = printable(first[:60].decode("latin-1"), 80)
    if first.startswith(b"HTTP/"):
        return f"{NOT_PULSYFLUX}: it answered in HTTP ({said!r}); is that the HTTP API's port (--http)?"
    return f"{NOT_PULSYFLUX}: it answered {said!r}"


def worth_logging(count: int) -> bool:
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


_T = TypeVar("_T")


def _when(done: bool, value: _T, waiters: list[Deferred[_T]]) -> "Deferred[_T]":
    """Fires with ``value``: at once if ``done``, else when the owner fires ``waiters``."""
    if done:
        return succeed(value)
    d: Deferred[_T] = Deferred()
    waiters.append(d)
    return d


class _OneConnection(Factory):
    """Hands out one protocol (as ``connectProtocol`` does) without logging
    "Starting factory ..." for every connection: a broker makes one per subscription."""

    noisy = False

    def __init__(self, proto: _ClientProtocol) -> None:
        self._proto = proto

    def buildProtocol(self, addr: Optional[IAddress]) -> _ClientProtocol:
        return self._proto


def _connect_protocol(endpoint: IStreamClientEndpoint, proto: _ClientProtocol) -> "Deferred[_ClientProtocol]":
    return endpoint.connect(_OneConnection(proto))  # type: ignore[return-value]  # fires with the one it was given


class _ClientProtocol(Protocol):
    """Frames in, frames out; the owning client decides what they mean."""

    transport: IStreamTransport  # set before connectionMade, never None after
    writer: ImmediateWriter  # made by connectionMade

    def __init__(self, owner: "Client") -> None:
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
            # Not even a first frame (an HTTP server, say): tell what the other end is instead.
            foreign = data[:1] != b"\x01" and not self.decoder.partials
            self.owner._protocol_error(ProtocolError(_not_pulsyflux(data)) if foreign else error)
            self.transport.loseConnection()
        finally:
            writer.release()

    def frames(self, frames: list[bytes]) -> bool:
        """Whole frames from the server end of an in-process link, each as it is (:mod:`pulsyflux.server.inproc`).

        Handled as :meth:`dataReceived` would handle them joined, without
        joining and decoding them again. False when they must come as bytes
        instead: while this protocol handles a read (never re-entered) or
        holds part of a frame. An item that is not one whole frame goes, with
        the rest, through the decoder.
        """
        writer = self.writer
        if writer.holding or self.decoder.buffered:
            return False
        owner = self.owner
        rest = None
        writer.hold()  # as dataReceived: what these frames cause to be sent leaves in one send
        try:
            for index, frame in enumerate(frames):
                if len(frame) < _HEADER_SIZE:
                    rest = frames[index:]
                    break
                version, ftype, flags, request_id, length = _unpack_header_from(frame)
                if version != codec.VERSION or length != len(frame) - _HEADER_SIZE:
                    rest = frames[index:]
                    break
                (owner._frame_received if owner._registration is None else owner._await_registration)(
                    ftype, flags, request_id, frame[_HEADER_SIZE:]
                )
        finally:
            writer.release()
        if rest:
            self.dataReceived(b"".join(rest))
        return True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.owner._connection_lost(reason)


class Client:
    """What Consumer and Provider share: connect, register, close.

    ``reactor``: its clock (``IReactorTime``: timeouts, backoff), which must
    also provide what the address's endpoint connects with (``IReactorTCP``
    for host:port, ``IReactorUNIX`` for ``unix:``); every Twisted reactor and
    ``MemoryReactorClock`` do. Only the clock is in the type: Twisted's
    ``clientFromString`` takes its reactor untyped.
    """

    role: int
    log = Logger()

    def __init__(self, channel_id: ChannelId, reactor: Optional[IReactorTime] = None) -> None:
        self.reactor: IReactorTime = default_reactor(reactor)
        self.channel_id = uuid.UUID(bytes=channel_bytes(channel_id))
        self._channel = self.channel_id.bytes
        self.client_id = uuid.UUID(bytes=_new_id())
        self._client = self.client_id.bytes
        self._protocol: Optional[_ClientProtocol] = None
        self._write: Callable[[bytes], None] = self._write_closed
        self._route_request: Optional[Callable[[bytes, int, bytes, bytes, Sequence[bytes], int], bool]] = None
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
        self._disconnect_hooks: list[Callable[[str], Any]] = []
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

    def open(self, address: Address, reconnect: Reconnect = False, token: Optional[str] = None) -> "Deferred[Any]":
        """Connect this client, made but not connected yet; fires with it once registered.

        What ``connect`` does after building the client; for an owner that must
        hold the client before its first request arrives (the broker's Provider).
        """
        client = self
        if token is not None:
            client.token = _check_token(token)
        if reconnect:
            client._address = address
            client._backoff = DEFAULT_BACKOFF if reconnect is True else reconnect
        endpoint = client_endpoint(client.reactor, address)
        d = _connect_protocol(endpoint, _ClientProtocol(client))

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

    def on_disconnect(self, callback: Callable[[str], Any]) -> None:
        """Call ``callback(why)`` each time the connection drops and reconnecting begins (reconnect=True).

        provider.on_disconnect(lambda why: print("lost the server:", why))
        """
        self._disconnect_hooks.append(callback)

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
        for hook in list(self._disconnect_hooks):
            try:
                hook(why)
            except Exception:
                self.log.failure("on_disconnect callback failed")
        return True

    def _schedule_reconnect(self) -> None:
        assert self._backoff is not None  # reconnecting is on: connect(..., reconnect=...) set both
        delay = self._backoff(self._attempts)
        self._attempts += 1
        self._retry = self.reactor.callLater(delay, self._reconnect)

    def _reconnect(self) -> None:
        assert self._address is not None  # reconnecting is on: connect(..., reconnect=...) set both
        endpoint = client_endpoint(self.reactor, self._address)
        self._retry = attempt = _connect_protocol(endpoint, _ClientProtocol(self))

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
        # An in-process link's client end takes a whole request as values (pulsyflux.server.inproc).
        self._route_request = getattr(proto.transport, "route_request", None)
        # The registration's id ends in CR LF: an HTTP server (someone gave the
        # HTTP API's port) reads the bytes before it as a bad request line and
        # answers 400 at once, so the mistake is told at once, not by a timeout.
        request_id = _new_id()[:14] + b"\r\n"
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

    @property
    def closed_reason(self) -> Optional[Exception]:
        """Why the connection ended for good, None until then.

        :class:`~pulsyflux.wire.errors.PermissionDenied` when the server
        refused it (a right missing, a token expired) after ``connect()``
        had succeeded, e.g. a provider registration the server held for a
        subscription that never came (docs/security.md); otherwise
        :class:`ConnectionLostError` saying why.
        """
        return self._closed if self._lost else None

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
            text = str(error)
            self._closed = ConnectionLostError(
                text if text.startswith(NOT_PULSYFLUX) else f"protocol error from the server: {text}"
            )
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
        if self._closed is not None:
            return  # closed (or given up) by us: its calls failed already, saying why; a late ERROR adds nothing
        if request_id == _ZERO_ID or message.startswith(PREFIX_PERMISSION_DENIED):
            self._server_said = message
        self._unmatched += 1
        if worth_logging(self._unmatched):  # the network decides how many: a bounded number of lines
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
                if self._registration is None:  # connect() had succeeded: nothing else tells the caller
                    self.log.warn("the server closed this connection: {why}", why=printable(why, 200))
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
        :class:`~pulsyflux.wire.errors.PermissionDenied` if it refused it (the
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
