"""The caller's side: a :class:`Consumer` sends requests and waits for their responses."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from ..endpoints import Address
from ..wire import codec, errors
from ..wire.codec import ERROR, RESPONSE, RESPONSE_CHUNK, RESPONSE_END, RESPONSE_START, ROLE_CONSUMER, ROUTING_SIZE
from ..wire.deadlines import Deadlines
from ..wire.errors import ConnectionLostError, ProtocolError, RequestTimeout, error_from_message
from .connection import ChannelId, Client, Reconnect

__all__ = ["Consumer", "Answer"]


_write_request = codec.write_request
_MAX_PAYLOAD = codec.MAX_PAYLOAD


_MAX_TIMEOUT_MS = 2**64 - 1  # the START frame's timeout field (docs/protocol.md)


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


class _Pending(Deferred):  # type: ignore[type-arg]  # fires with bytes (a response) or a float (ping)
    """The Deferred a request's caller holds, and all the consumer keeps of the request: one object, not three.

    ``request_id`` says what to forget when the caller cancels it (the
    consumer's one canceller); ``body`` is the response so far: None, its one
    chunk (the usual case: no list), or a list of its chunks.
    """

    __slots__ = ("request_id", "body")

    def __init__(self, canceller: Callable[["Deferred[Any]"], None], request_id: bytes) -> None:
        super().__init__(canceller)
        self.request_id = request_id
        self.body: Union[bytes, list[bytes], None] = None


class Answer:
    """What the package's own callers hand :meth:`Consumer.send_for` (or ``send_parts_for``) instead of holding a Deferred.

    The consumer calls :meth:`callback` with the response body or
    :meth:`errback` with the exception, once, as it would fire a request's
    Deferred. A publisher one message at a time otherwise pays a Deferred,
    its callbacks and their firing per message for a result it hands straight
    on. Neither method may raise (the consumer is reading the line when it calls).
    """

    __slots__ = ("request_id", "body")

    def __init__(self) -> None:
        self.request_id = b""
        self.body: Union[bytes, list[bytes], None] = None  # the response so far, as _Pending.body

    def callback(self, result: bytes) -> None:
        raise NotImplementedError

    def errback(self, error: BaseException) -> None:
        raise NotImplementedError


class Consumer(Client):
    """Sends requests on one channel; any number may be in flight.

    consumer = await Consumer.connect("127.0.0.1:9090", channel)
    reply = await consumer.send(b"ping")
    """

    role = ROLE_CONSUMER

    def __init__(self, channel_id: ChannelId, reactor: Optional[IReactorTime] = None) -> None:
        super().__init__(channel_id, reactor)
        self._pending: dict[bytes, Union[_Pending, Answer]] = {}
        self._deadlines = Deadlines(self.reactor, self._pending, self._expire)
        self._cancel = self._cancelled  # one bound method for every request's Deferred
        self._next_id = _id_source()

    @classmethod
    def connect(
        cls,
        address: Address,
        channel_id: ChannelId,
        reactor: Optional[IReactorTime] = None,
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
        return cls(channel_id, reactor).open(address, reconnect, token)

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
        Raises ValueError at once for a timeout the frame cannot carry (not finite, or past 2^64 ms).
        """
        return self._send(payload, None, timeout)

    def send_parts(self, parts: Iterable[bytes], timeout: float = 5.0) -> "Deferred[bytes]":
        """:meth:`send` of ``b"".join(parts)`` (bytes objects), joined once, where its frames are made.

        Over an in-process link the router writes the pieces into the
        provider's frames (:mod:`pulsyflux.server.inproc`): the broker forwards
        a batch of records so, where joining them into a body first would copy
        the whole batch once more. Raises TypeError unless every part is ``bytes``.
        """
        pieces = list(parts)  # read once: checked here, then measured and sent
        for part in pieces:
            # Before the request is registered: a str part failed only in the join, leaving a pending
            # request forever over TCP, and over an in-process link it ended the provider's connection.
            if type(part) is not bytes:
                raise TypeError(f"every part must be bytes, not {type(part).__name__}")
        return self._send(None, pieces, timeout)

    def send_for(self, payload: bytes, timeout: float, answer: Answer) -> None:
        """:meth:`send`, whose outcome goes to ``answer`` instead of a Deferred (for the package's publishers).

        A consumer that is closed or not connected calls ``answer.errback`` at once.
        """
        self._send(payload, None, timeout, answer)

    def send_parts_for(self, parts: Sequence[bytes], timeout: float, answer: Answer) -> None:
        """:meth:`send_parts`, whose outcome goes to ``answer`` (the broker's forwards)."""
        self._send(None, parts, timeout, answer)

    def _send(
        self,
        payload: Optional[bytes],
        parts: Optional[Sequence[bytes]],
        timeout: float,
        answer: Optional[Answer] = None,
    ) -> "Deferred[bytes]":
        protocol = self._protocol
        if self._closed is not None or protocol is None:
            if answer is not None:
                answer.errback(self._closed or ConnectionLostError("not connected"))
                return None  # type: ignore[return-value]  # send_for returns nothing
            return fail(self._closed or ConnectionLostError("not connected"))
        if parts is None and not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
        # The START frame's timeout is 64-bit milliseconds: a value that does not fit is the caller's
        # mistake, refused before the request is registered, so that it leaves nothing behind.
        try:
            timeout_ms = max(int(timeout * 1000), 1) if timeout else 0
        except (OverflowError, ValueError):
            raise ValueError(f"timeout must be a finite number of seconds, not {timeout!r}") from None
        if timeout_ms > _MAX_TIMEOUT_MS:
            raise ValueError(f"timeout must be at most {_MAX_TIMEOUT_MS // 1000:,} seconds")
        request_id = self._next_id()
        pending: Union[_Pending, Answer]
        if answer is None:
            pending = _Pending(self._cancel, request_id)
        else:
            pending = answer
            answer.request_id = request_id
        self._pending[request_id] = pending
        route = self._route_request  # an in-process link: the server routes it as values, no frames
        if parts is not None:
            size = sum(map(len, parts))
        else:
            size = len(payload)  # type: ignore[arg-type]  # checked above
            parts = (payload,) if type(payload) is bytes else None  # the router writes bytes only
        if (
            route is None
            or parts is None
            or size > _MAX_PAYLOAD
            or protocol.writer.waiting
            or not route(request_id, timeout_ms, self._client, self._channel, parts, size)
        ):
            if payload is None:
                payload = b"".join(parts)  # type: ignore[arg-type]  # given when payload is not
            # One write for a small request; a large one piece by piece (never copied to join it).
            _write_request(self._write, request_id, timeout_ms, self._client, self._channel, payload)
        if timeout:
            self._deadlines.add(request_id, pending, timeout)
        return pending  # type: ignore[return-value]  # a _Pending unless send_for gave an Answer (and ignores this)

    def ping(self, timeout: float = 5.0) -> "Deferred[float]":
        """One round trip to the server itself, no provider involved; fires with the seconds it took.

        Sends one frame of type 0x00 (no such type exists), which every
        server, Go's and ours, answers with an ERROR on the same request id
        (``invalid message type``) after everything sent before it
        (docs/protocol.md, "Ping"). Fails with RequestTimeout or ConnectionLostError.
        """
        if self._closed is not None or self._protocol is None:
            return fail(self._closed or ConnectionLostError("not connected"))
        request_id = self._next_id()
        self._pending[request_id] = pending = _Pending(self._cancel, request_id)
        started = self.reactor.seconds()
        self._write(codec.encode_frame(codec.PROBE, request_id))
        if timeout:
            self._deadlines.add(request_id, pending, timeout)

        def answered(result: Any) -> float:
            if isinstance(result, Failure):
                result.trap(ProtocolError)  # "invalid message type": the answer a ping waits for
            return self.reactor.seconds() - started

        return pending.addBoth(answered)

    def _cancelled(self, pending: "Deferred[Any]") -> None:
        """A caller cancelled a request's Deferred: a late answer is ignored."""
        self._drop(pending.request_id)  # type: ignore[attr-defined]  # only ever given a _Pending

    def _drop(self, request_id: bytes) -> Union[_Pending, Answer, None]:
        return self._pending.pop(request_id, None)  # its deadline, if any, is skipped when due

    def _expire(self, request_id: bytes, pending: Union[_Pending, Answer]) -> None:
        del self._pending[request_id]
        pending.errback(RequestTimeout(errors.MSG_TIMED_OUT))

    def _frame_received(self, ftype: int, flags: int, request_id: bytes, payload: bytes) -> None:
        if ftype == RESPONSE_CHUNK:
            pending = self._pending.get(request_id)
            if pending is not None:
                body = pending.body
                if body is None:
                    pending.body = payload
                elif type(body) is list:
                    body.append(payload)
                else:
                    pending.body = [body, payload]  # type: ignore[list-item]  # bytes here
        elif ftype == RESPONSE_END:
            pending = self._pending.pop(request_id, None)
            if pending is not None:
                body = pending.body
                pending.callback(b"" if body is None else b"".join(body) if type(body) is list else body)  # type: ignore[arg-type]  # bytes: type() is not narrowed
        elif ftype == RESPONSE_START:
            pass  # routing only; the body follows
        elif ftype == ERROR:
            pending = self._pending.pop(request_id, None)  # _drop, inline: once per response
            if pending is not None:
                pending.errback(error_from_message(codec.error_message(payload)))
            else:
                self._unmatched_error(request_id, payload)
        elif ftype == RESPONSE:
            pending = self._pending.pop(request_id, None)
            if pending is not None:
                pending.callback(payload[ROUTING_SIZE:])
        elif ftype == codec.AUTH:
            self._auth_frame(request_id, payload)
        # Anything else is not for a consumer: ignore it, as Go clients do.

    def _fail_pending(self, error: Exception) -> None:
        self._deadlines.clear()
        for request_id in list(self._pending):
            pending = self._drop(request_id)
            if pending is not None:
                pending.errback(error)
