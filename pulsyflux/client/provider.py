"""The callee's side: a :class:`Provider` answers the requests of its channel."""

from __future__ import annotations

import uuid
from typing import Any, Awaitable, Callable, Optional, Union

from twisted.internet.defer import Deferred, DeferredQueue, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..endpoints import Address
from ..wire import codec, errors
from ..wire.codec import CHUNK, END, ERROR, ROLE_PROVIDER, ROUTING_SIZE, START
from .connection import ChannelId, Client, Reconnect, worth_logging

__all__ = [
    "Handler",
    "DEFAULT_MAX_INCOMPLETE",
    "DEFAULT_INCOMPLETE_TIMEOUT",
    "DEFAULT_CLOSE_TIMEOUT",
    "check_close_timeout",
    "MSG_CLOSING",
    "MSG_CLOSED_UNANSWERED",
    "Request",
    "Provider",
]

log = Logger()


Handler = Callable[[bytes], Union[bytes, "Deferred[bytes]", Awaitable[bytes]]]
_write_response = codec.write_response
# A Provider's backstop for requests whose END never comes (a server that does
# not say it gave up on them, or a consumer that stalls with no deadline):
DEFAULT_MAX_INCOMPLETE = 64 << 20  # bytes held across all incomplete requests
DEFAULT_INCOMPLETE_TIMEOUT = 60.0  # seconds an incomplete request may go without a frame

# close(): seconds the requests being handled get to be answered, and what the consumers of
# the others are told (a RemoteError's message; the wire has no "stop sending me requests").
DEFAULT_CLOSE_TIMEOUT = 5.0
MSG_CLOSING = "provider closing: it takes no new requests"
MSG_CLOSED_UNANSWERED = "provider closed before it answered this request"
_UNKNOWN: Any = object()


class _Incoming:
    """A request whose START has come and whose END has not."""

    __slots__ = ("routing", "parts", "size", "seen")

    def __init__(self, routing: bytes, seen: int) -> None:
        self.routing = routing
        self.parts: list[bytes] = []
        self.size = 0
        self.seen = seen  # the provider's sweep count at its last frame


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


def check_close_timeout(timeout: object) -> None:
    """The one rule for a close's ``timeout`` (Provider's and BrokerClient's): finite seconds, 0 at once."""
    if type(timeout) not in (int, float) or not 0 <= timeout < float("inf"):  # type: ignore[operator]
        raise ValueError(f"timeout must be a finite number of seconds >= 0 (0: close at once), not {timeout!r}")


class Provider(Client):
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
        reactor: Optional[IReactorTime] = None,
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
        # With cancel_abandoned: the handler's pending Deferred per request, cancelled when the
        # server gives up on it (the cluster's relay uses it to free what it holds at once).
        self.cancel_abandoned = False
        self._abandonable: dict[bytes, Deferred[Any]] = {}
        self._queue: DeferredQueue[Request] = DeferredQueue()
        self._draining: Optional[Deferred[None]] = None  # close(timeout) waiting for answers: fires when all came
        self._drain_timer: Optional[IDelayedCall] = None
        # While draining: the requests still to be answered (counted once at close(), then one less per
        # answer or give-up), so that an answer costs no scan of every request held.
        self._drain_left = 0
        self._drain_recount = False  # one request was not counted: count them again when none seems left
        self._close_waiters: list[Deferred[None]] = []
        self.refused_closing = 0  # requests that arrived during close(timeout) and were refused (MSG_CLOSING)
        self.closed_unanswered = 0  # requests still unanswered when close(timeout) ran out (MSG_CLOSED_UNANSWERED)

    @classmethod
    def connect(
        cls,
        address: Address,
        channel_id: ChannelId,
        handler: Optional[Handler] = None,
        reactor: Optional[IReactorTime] = None,
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
        return provider.open(address, reconnect, token)

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

    @property
    def incomplete(self) -> int:
        """Requests whose START has arrived and whose END has not (their bytes: ``incomplete_bytes``)."""
        return len(self._incoming)

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
                routing = self._routing[request_id]
                self._routing[request_id] = None  # respond() becomes a no-op; it removes the entry
                pending = self._abandonable.pop(request_id, None)
                if pending is not None:
                    pending.cancel()  # its errback finds routing None: nothing is sent
                if self._draining is not None and routing is not None:
                    self._one_less()
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
        if worth_logging(self.incomplete_dropped):  # consumers decide how many: a bounded number of lines
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
        if type(result) is bytes:  # the usual answer: what _answer and _send_answer do with it, inline
            if self._abandonable:
                self._abandonable.pop(request_id, None)
            routing = self._routing.pop(request_id, _UNKNOWN)  # unknown: answered already (respond())
            if routing is not _UNKNOWN and routing is not None and self._closed is None:
                _write_response(self._write, request_id, routing, result)
            return
        if isinstance(result, Deferred):
            if self.cancel_abandoned and not result.called:
                self._abandonable[request_id] = result  # _answer / _answer_error take it out
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
        if self._abandonable:
            self._abandonable.pop(request_id, None)
        routing = self._routing.pop(request_id, _UNKNOWN)  # unknown: answered already, or its line dropped
        if routing is not _UNKNOWN:
            self._send_answer(request_id, routing, result, None)

    def _answer_error(self, failure: Failure, request_id: bytes) -> None:
        if self._abandonable:
            self._abandonable.pop(request_id, None)
        routing = self._routing.pop(request_id, _UNKNOWN)
        if routing is not _UNKNOWN:
            self._send_answer(request_id, routing, b"", failure.value)

    # -- closing: refuse new requests, let the running ones answer, close ------------

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> "Deferred[None]":
        """Stop taking requests, let those being handled answer (for at most ``timeout`` s), then close.

        A registration lasts until its connection closes, and the wire has no
        frame for "send me no more" (docs/protocol.md, Go's server neither):
        the server goes on routing requests here until the line closes. So
        each request that arrives meanwhile is answered at once with an
        ERROR, ``provider closing: it takes no new requests`` (a
        :class:`RemoteError` for its consumer, which may retry: another
        provider of the channel can take it). Requests already received
        (being handled, or queued for :meth:`receive`) may still be
        answered; those unanswered after ``timeout`` get an ERROR,
        ``provider closed before it answered this request``, and the line
        closes. Both are counted (``refused_closing``,
        ``closed_unanswered``). ``close(timeout=0)`` closes at once (the
        consumers of unanswered requests get ``peer disappeared``); called
        again meanwhile, it waits for the first close, and a shorter
        ``timeout`` (0: none) cuts the wait short, as BrokerClient.close does.
        A line lost during the drain ends it, and is not reconnected
        (``reconnect``). A ``timeout`` that is not a finite number >= 0 is
        refused with ValueError.
        """
        check_close_timeout(timeout)
        if self._draining is not None:
            d: Deferred[None] = Deferred()
            self._close_waiters.append(d)
            timer = self._drain_timer
            if timeout == 0:
                self._drain_over()
            elif timer is not None and timer.active() and self.reactor.seconds() + timeout < timer.getTime():
                timer.reset(timeout)
            return d
        if timeout == 0 or self._closed is not None or self._protocol is None:
            return super().close()
        pending = self._pending_answers()
        if not pending:
            return super().close()
        self._drain_left = pending
        self._drain_recount = self._handling is not None and self._routing.get(self._handling) is not None
        if self._drain_recount:
            # close() from inside a handler: its request may be answered by the return value, past
            # _send_answer (the inline path): not counted; the requests are counted again at the end.
            self._drain_left -= 1
        # Shadow the methods while closing (no test on the path of every request): refuse new
        # requests, and look whether the last answer has gone after each.
        self._dispatch = self._refuse_closing  # type: ignore[method-assign]
        self._send_answer = self._send_answer_closing  # type: ignore[method-assign]
        drained: Deferred[None] = Deferred()
        self._draining = drained
        self._drain_timer = self.reactor.callLater(timeout, self._drain_over)
        # Closing: a line that drops now is not reconnected (nor registered again), it ends the drain.
        self._stop_reconnecting()
        self.when_lost().addCallback(lambda _: self._drain_over())  # the line dropped: nothing left to wait for
        waiter: Deferred[None] = Deferred()
        self._close_waiters.append(waiter)
        return waiter

    def _pending_answers(self) -> int:
        """Requests received that still need an answer (not those the server gave up on): a scan."""
        return sum(routing is not None for routing in self._routing.values())

    def _refuse_closing(self, request_id: bytes, body: bytes) -> None:
        routing = self._routing.pop(request_id, None)
        self.refused_closing += 1
        Provider._send_answer(self, request_id, routing, b"", MSG_CLOSING)

    def _send_answer_closing(
        self, raw: bytes, routing: Optional[bytes], payload: bytes, error: Union[str, BaseException, None]
    ) -> None:
        Provider._send_answer(self, raw, routing, payload, error)
        if routing is not None:
            self._one_less()

    def _one_less(self) -> None:
        """A request counted by the drain was answered, or given up on by the server."""
        self._drain_left -= 1
        if self._drain_left <= 0 and self._drain_recount:
            self._drain_recount = False
            self._drain_left = self._pending_answers()
        if self._drain_left <= 0:
            self._drain_over()

    def _drain_over(self) -> None:
        """All answered, the timeout passed, or the line dropped: answer what is left, close the line."""
        drained, self._draining = self._draining, None
        if drained is None:
            return
        timer, self._drain_timer = self._drain_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        del self._dispatch, self._send_answer  # the methods again
        left = [(raw, routing) for raw, routing in self._routing.items() if routing is not None]
        if left and self._closed is None:
            self.closed_unanswered += len(left)
            for raw, routing in left:
                self._routing[raw] = None  # a late respond() sends nothing
                self._send_answer(raw, routing, b"", MSG_CLOSED_UNANSWERED)
            self.log.warn(
                "provider on channel {c} closed with {n} request(s) unanswered; their consumers were told",
                c=str(self.channel_id),
                n=len(left),
            )

        def closed(_: object) -> None:
            waiters, self._close_waiters = self._close_waiters, []
            for d in waiters:
                d.callback(None)

        super().close().addBoth(closed)

    def _fail_pending(self, error: Exception) -> None:
        self._abandonable.clear()
        self._incoming.clear()
        self._incomplete_bytes = 0
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None and sweeper.active():
            sweeper.cancel()
        if self._routing:  # (close() and then the lost line both come here: the second finds none)
            self._lost_ids = frozenset(self._routing)  # respond() to these is a no-op, not a KeyError
        self._routing.clear()
        if self.reconnecting:
            return  # receive() waits for the next connection
        while self._queue.waiting:
            self._queue.waiting.pop(0).errback(error)
