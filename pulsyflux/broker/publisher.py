"""Publishing over one Consumer, several requests in flight, batched while busy."""

from __future__ import annotations

import json
from typing import Any, Optional

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from ..client import Consumer
from ..wire import messages
from ..wire.messages import Position

__all__ = ["Publisher"]


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
        self._waiters: list[Deferred[Optional[Position]]] = []
        self._deadlines: list[float] = []  # when each waiting publish times out
        self._closed: Optional[Exception] = None
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
        self._deadlines.append(self._seconds() + timeout if timeout and timeout > 0 else _NEVER)
        self._texts.append(text)
        self._waiters.append(d)
        if self.requests < self.window:
            self._flush()
        return d

    def _flush(self) -> None:
        while self._texts and self.requests < self.window:
            batch = self.batch
            texts, waiters, deadline = self._texts[:batch], self._waiters[:batch], min(self._deadlines[:batch])
            del self._texts[:batch], self._waiters[:batch], self._deadlines[:batch]
            self.requests += 1
            timeout = 0.0  # the batch's request times out with its earliest publish
            if deadline != _NEVER:
                timeout = max(deadline - self.consumer.reactor.seconds(), 0.001)
            # Always a batch to our broker (even of one): it answers a batch with the positions.
            if self.binary:
                body = messages.encode_records(texts)
            else:
                body = texts[0].encode("utf-8") if self.go else ("[" + ",".join(texts) + "]").encode("utf-8")
            d = self.consumer.send(body, timeout=timeout)
            d.addCallbacks(self._answered, self._failed, callbackArgs=(waiters,), errbackArgs=(waiters,))

    def _answered(self, result: bytes, waiters: list[Deferred[Optional[Position]]]) -> None:
        self.requests -= 1
        if result[:1] == b"[":
            for d, position in zip(waiters, _positions(result, len(waiters))):
                d.callback(position)
        else:  # "ok": no history (or a Go broker)
            for d in waiters:
                d.callback(None)
        self._flush()

    def _failed(self, failure: Failure, waiters: list[Deferred[Optional[Position]]]) -> None:
        self.requests -= 1
        for d in waiters:
            d.errback(failure.value)
        self._flush()

    def close(self, error: Exception) -> "Deferred[None]":
        self._closed = error
        waiters, self._waiters, self._texts, self._deadlines = self._waiters, [], [], []
        for d in waiters:
            d.errback(error)
        return self.consumer.close()
