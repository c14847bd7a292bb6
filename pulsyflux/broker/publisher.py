"""Publishing over one Consumer, several requests in flight, batched while busy."""

from __future__ import annotations

import json
from typing import Any, Optional

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from ..client import Consumer
from ..client.consumer import Answer
from ..wire import messages
from ..wire.errors import ConnectionLostError
from ..wire.messages import Position

__all__ = ["Publisher", "PublishUnconfirmed"]

log = Logger()


class PublishUnconfirmed(ConnectionLostError):
    """The publisher closed before the broker confirmed this publish (``BrokerClient.close()``).

    ``sent`` is False for a publish that never left (it was not published),
    True for one sent whose answer had not come (it may or may not have been
    delivered). A :class:`~pulsyflux.wire.errors.ConnectionLostError`, as
    every failure of a closing client is.
    """

    def __init__(self, message: str, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


_PUBLISH_BATCH = 512
_PUBLISH_WINDOW = 4
_NEVER = float("inf")


def _positions(answer: bytes, count: int) -> list[Optional[Position]]:
    """The positions a broker with history answers to a batch (a JSON array of "EPOCH:SEQ")."""
    try:
        texts = json.loads(answer)
        if type(texts) is not list or len(texts) != count:
            raise ValueError("not one position per message")
        positions: list[Optional[Position]] = []
        for text in texts:
            epoch, _, seq = text.rpartition(":")
            positions.append(Position(epoch, int(seq)))
        return positions
    except (ValueError, TypeError, AttributeError):
        return [None] * count  # not a broker of ours after all: the publishes were accepted, without positions


class _Batch:
    """The one Deferred of a :meth:`Publisher.publish_many`: fires with every position once all are accepted."""

    __slots__ = ("deferred", "positions", "left", "failed")

    def __init__(self, count: int) -> None:
        self.deferred: Deferred[list[Optional[Position]]] = Deferred()
        self.positions: list[Optional[Position]] = [None] * count
        self.left = count
        self.failed = False

    def done(self, index: int, position: Optional[Position]) -> None:
        if self.failed:
            return
        self.positions[index] = position
        self.left -= 1
        if not self.left:
            self.deferred.callback(self.positions)

    def fail(self, error: BaseException) -> None:
        if not self.failed:
            self.failed = True
            self.deferred.errback(error)


def _accepted(waiter: Any, position: Optional[Position]) -> None:
    if type(waiter) is tuple:  # (batch, index): one message of a publish_many
        waiter[0].done(waiter[1], position)
    else:
        waiter.callback(position)


def _refused(waiter: Any, error: BaseException) -> None:
    if type(waiter) is tuple:
        waiter[0].fail(error)
    else:
        waiter.errback(error)


class _Request(Answer):
    """One request of publishes in flight: the consumer hands its answer straight to the publisher
    (no Deferred and callbacks per request, which cost a publisher one message at a time ~4 us each)."""

    __slots__ = ("publisher", "waiters")

    def __init__(self, publisher: "Publisher", waiters: list[Any]) -> None:
        self.request_id = b""
        self.body = None
        self.publisher = publisher
        self.waiters = waiters

    # Each lets go of its waiters first: a timed request stays in the consumer's deadline heap until
    # the next compaction, and must not keep hundreds of fired Deferreds alive there (more for the
    # collector to walk: a flood 1 -> 1 took ~10% more CPU per delivery).

    def callback(self, result: bytes) -> None:
        waiters, self.waiters = self.waiters, []
        try:
            self.publisher._answered(result, waiters)
        except Exception:  # as a Deferred would keep it: never into the consumer reading the line
            log.failure("publish answer failed")

    def errback(self, error: BaseException) -> None:
        waiters, self.waiters = self.waiters, []
        try:
            self.publisher._failed(error, waiters)
        except Exception:
            log.failure("publish failure failed")


class Publisher:
    """Publishes over one Consumer, many requests in flight.

    A publish goes out at once while fewer than ``window`` requests are in
    flight; otherwise it waits and leaves with the others in one batch when
    an answer comes back, so a busy publisher sends few large requests and
    an idle one adds no delay. A publish's timeout counts from the call,
    also while it waits for its turn.
    """

    def __init__(self, consumer: Consumer, window: int = _PUBLISH_WINDOW, batch: int = _PUBLISH_BATCH) -> None:
        self.consumer = consumer
        self._seconds = consumer.reactor.seconds  # read per publish: its timeout counts from the call
        self.window = window
        self.batch = batch
        self.requests = 0
        self._texts: list[Any] = []  # each waiting publish, encoded: JSON text, or a binary record
        # Per waiting publish: its Deferred, or (batch, index) for a message of a publish_many.
        self._waiters: list[Any] = []
        self._deadlines: list[float] = []  # when each waiting publish times out
        self._closed: Optional[Exception] = None  # set: new publishes fail with it
        self._flushing = False  # _flush is running (see there)
        self._idle_waiters: list[Deferred[None]] = []  # when_idle() calls: nothing waiting, nothing in flight
        # Once given up (a close that stopped waiting): what an answer that never comes fails with.
        self._unconfirmed: Optional[Exception] = None
        self.unconfirmed = 0  # publishes failed unconfirmed by give_up (not sent, or sent and not answered)
        self.go = False  # the broker is Go's: see use_go_broker
        self.binary = False  # the broker reads the binary encoding: see use_binary

    def use_binary(self) -> None:
        """The broker said it reads the binary encoding (its answer to the empty batch): publish in it."""
        self.binary = True

    def use_go_broker(self) -> None:
        """Talk to a Go broker: one plain JSON message per request (it refuses arrays), one at a time
        (it handles each request in its own goroutine, so two in flight could swap)."""
        self.go = True
        self.window = 1
        self.batch = 1

    def publish(
        self, topic: str, payload: bytes, headers: Optional[dict[str, str]], timeout: float
    ) -> "Deferred[Optional[Position]]":
        if self._closed is not None:
            return fail(self._closed)
        text = (messages.encode_record if self.binary else messages.encode_text)(topic, payload, headers)
        d: Deferred[Optional[Position]] = Deferred()
        if self.requests < self.window and not self._texts:  # not busy: it leaves at once, alone (no queue)
            self._send([text], [d], max(timeout, 0.001) if timeout and timeout > 0 else 0.0)
            return d
        self._deadlines.append(self._seconds() + timeout if timeout and timeout > 0 else _NEVER)
        self._texts.append(text)
        self._waiters.append(d)
        if self.requests < self.window:
            self._flush()
        return d

    def publish_many(self, items: list[tuple[str, bytes, Optional[dict[str, str]]]], timeout: float) -> "Deferred[Any]":
        """Publish ``(topic, payload, headers)`` in order; one Deferred for all of them.

        Fires with their positions (or Nones) once the broker accepted every
        one; fails with the first error (messages of the same call sent in
        another request may have been accepted). One Deferred per call
        instead of one per message: what a batch publisher saves.
        """
        if self._closed is not None:
            return fail(self._closed)
        encode = messages.encode_record if self.binary else messages.encode_text
        texts = [encode(topic, payload, headers) for topic, payload, headers in items]  # raises before queueing
        if not texts:
            return succeed([])
        batch = _Batch(len(texts))
        deadline = self._seconds() + timeout if timeout and timeout > 0 else _NEVER
        self._texts += texts
        self._waiters += [(batch, index) for index in range(len(texts))]
        self._deadlines += [deadline] * len(texts)
        if self.requests < self.window:
            self._flush()
        return batch.deferred

    def _flush(self) -> None:
        # Not re-entered: a consumer that is down fails a request inside send_for, whose _failed
        # flushes again; nested, one level per queued batch, a few hundred queued publishes ended
        # in a RecursionError and the rest never settled. The inner call returns, this loop goes on.
        if self._flushing:
            return
        self._flushing = True
        try:
            while self._texts and self.requests < self.window:
                batch = self.batch
                texts, waiters, deadline = self._texts[:batch], self._waiters[:batch], min(self._deadlines[:batch])
                del self._texts[:batch], self._waiters[:batch], self._deadlines[:batch]
                timeout = 0.0  # the batch's request times out with its earliest publish
                if deadline != _NEVER:
                    timeout = max(deadline - self._seconds(), 0.001)
                self._send(texts, waiters, timeout)
        finally:
            self._flushing = False

    def _send(self, texts: list[Any], waiters: list[Any], timeout: float) -> None:
        """One request for ``texts``; its answer settles ``waiters``."""
        self.requests += 1
        # Always a batch to our broker (even of one): it answers a batch with the positions.
        if self.binary:
            body = messages.encode_records(texts)
        else:
            body = texts[0].encode("utf-8") if self.go else ("[" + ",".join(texts) + "]").encode("utf-8")
        self.consumer.send_for(body, timeout, _Request(self, waiters))

    def _answered(self, result: bytes, waiters: list[Any]) -> None:
        self.requests -= 1
        if result[:1] == b"[":
            for waiter, position in zip(waiters, _positions(result, len(waiters))):
                _accepted(waiter, position)
        else:  # "ok": no history (or a Go broker)
            for waiter in waiters:
                _accepted(waiter, None)
        self._flush()
        if self._idle_waiters and not self.requests:
            self._idle()

    def _failed(self, error: BaseException, waiters: list[Any]) -> None:
        self.requests -= 1
        if self._unconfirmed is not None and isinstance(error, ConnectionLostError):
            error = self._unconfirmed  # our own close cut the line: say so, not "connection closed"
            self.unconfirmed += len(waiters)
        for waiter in waiters:
            _refused(waiter, error)
        self._flush()
        if self._idle_waiters and not self.requests:
            self._idle()

    # -- closing: stop, drain, give up, close ----------------------------------

    def stop(self, error: Exception) -> None:
        """Take no new publish (they fail with ``error``); those waiting still go out as answers come."""
        if self._closed is None:
            self._closed = error

    @property
    def busy(self) -> bool:
        """Publishes are waiting for their turn or for the broker's answer."""
        return bool(self.requests or self._texts)

    def when_idle(self) -> "Deferred[None]":
        """Fires once every publish has its answer (at once when none is waiting or in flight)."""
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        if not self.busy:
            self._idle()
        return d

    def _idle(self) -> None:
        if self._texts:
            return  # more leave once an answer makes room
        waiters, self._idle_waiters = self._idle_waiters, []
        for d in waiters:
            d.callback(None)

    def give_up(self, why: str) -> None:
        """Stop waiting: fail the publishes not sent yet now, and those in flight when the line closes,
        each with a :class:`PublishUnconfirmed` that says ``why`` (so none is lost without a word)."""
        self._unconfirmed = PublishUnconfirmed(
            f"not confirmed: the broker client closed ({why}) before the broker acknowledged this publish; "
            "it may or may not have been delivered",
            sent=True,
        )
        waiters, self._waiters, self._texts, self._deadlines = self._waiters, [], [], []
        if waiters:
            self.unconfirmed += len(waiters)
            unsent = PublishUnconfirmed(
                f"not published: the broker client closed ({why}) before this publish could be sent", sent=False
            )
            for waiter in waiters:
                _refused(waiter, unsent)

    def close(self, error: Exception) -> "Deferred[None]":
        """Fail what still waits with ``error`` (unless :meth:`give_up` said why) and close the line;
        those in flight fail with ``error`` too, not with a bare ``connection closed by the client``."""
        self.stop(error)
        if self._unconfirmed is None:
            self._unconfirmed = error
        waiters, self._waiters, self._texts, self._deadlines = self._waiters, [], [], []
        for waiter in waiters:
            _refused(waiter, error)
        return self.consumer.close()
