"""Consumer.send_for: a request whose outcome goes to an Answer instead of a Deferred (the publisher's)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest_twisted
from twisted.logger import globalLogPublisher

from pulsyflux import Broker, BrokerClient, ConnectionLostError, Consumer, Provider, RequestTimeout
from pulsyflux.client.consumer import Answer
from pulsyflux.testing import start_server

from .helpers import clocked, eventually, later


class Kept(Answer):
    __slots__ = ("outcomes",)

    def __init__(self) -> None:
        super().__init__()
        self.outcomes: list[Any] = []

    def callback(self, result: bytes) -> None:
        self.outcomes.append(result)

    def errback(self, error: BaseException) -> None:
        self.outcomes.append(error)


@clocked
async def test_an_answer_gets_the_response_or_the_timeout_once(memory, channel):
    provider = await memory.connect(Provider, channel, handler=lambda data: later(30.0, data.upper(), memory.clock))
    consumer = await memory.connect(Consumer, channel)
    quick, slow = Kept(), Kept()
    consumer.send_for(b"hi", 60.0, quick)
    consumer.send_for(b"late", 2.5, slow)
    assert consumer.pending == 2
    await later(31.0, None, memory.clock)
    assert quick.outcomes == [b"HI"]
    [error] = slow.outcomes
    assert isinstance(error, RequestTimeout)
    assert consumer.pending == 0
    await consumer.close()
    closed = Kept()
    consumer.send_for(b"x", 1.0, closed)  # at once, no exception raised here
    [error] = closed.outcomes
    assert isinstance(error, ConnectionLostError)
    await provider.close()


@clocked
async def test_an_answer_cut_by_the_close_fails_once(memory, channel):
    provider = await memory.connect(Provider, channel, handler=lambda data: later(30.0, data, memory.clock))
    consumer = await memory.connect(Consumer, channel)
    kept = Kept()
    consumer.send_for(b"hi", 60.0, kept)
    await consumer.close()
    [error] = kept.outcomes
    assert isinstance(error, ConnectionLostError)
    await provider.close()


@pytest_twisted.ensureDeferred
async def test_a_publish_answer_that_fails_is_logged_and_the_line_keeps_working(server):
    """Over TCP: an error while the publisher handles the broker's answer is logged; it never reaches
    the consumer reading the line (a Deferred kept such errors; the answer is called from the read)."""
    broker = await Broker.connect(server.address, uuid.uuid4())
    client = await BrokerClient.connect(server.address, broker.channel, heartbeat=None)
    sub = await client.subscribe("t")
    publisher = client._publisher
    answered = publisher._answered
    calls = []

    def broken(result: bytes, waiters: list) -> None:
        calls.append(result)
        if len(calls) == 1:
            publisher.requests -= 1  # what the real one does first
            raise RuntimeError("boom")
        answered(result, waiters)

    publisher._answered = broken
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        client.publish("t", b"one")
        assert (await sub.get()).payload == b"one"
        assert await client.publish("t", b"two") is None  # the line still works: the next answer arrives
        assert (await sub.get()).payload == b"two"
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert len(calls) == 2
    [failure] = [e["log_failure"] for e in events if "log_failure" in e]
    assert failure.check(RuntimeError)
    await client.close()
    await broker.close()


def test_an_answered_publish_request_lets_go_of_its_waiters():
    """A timed request stays in the consumer's deadline heap until a compaction: once answered, its
    Answer must not keep the publishes' fired Deferreds alive (a flood paid ~10% more CPU for them)."""
    from twisted.internet.task import Clock

    from pulsyflux.broker.publisher import Publisher

    class FakeConsumer:
        def __init__(self) -> None:
            self.reactor = Clock()
            self.answers: list[Any] = []

        def send_for(self, body: bytes, timeout: float, answer: Any) -> None:
            self.answers.append(answer)

    consumer = FakeConsumer()
    publisher = Publisher(consumer, window=1)
    first = publisher.publish("t", b"a", None, timeout=5.0)
    second = publisher.publish("t", b"b", None, timeout=5.0)
    consumer.answers[0].callback(b"ok")
    consumer.answers[1].errback(ConnectionLostError("gone"))
    assert first.called and second.called
    second.addErrback(lambda failure: None)
    assert [answer.waiters for answer in consumer.answers] == [[], []]


@pytest_twisted.ensureDeferred
async def test_a_forward_answer_whose_handling_fails_is_logged_and_the_broker_line_keeps_working(monkeypatch):
    """Over TCP (997f1be): a forward's answer goes straight to its outlet, called from the read of the
    broker's forwarding connection; an error there is logged once and never reaches that read, so every
    connection of the broker stays up and keeps forwarding (to the subscriber whose answer failed too)."""
    from pulsyflux.broker.outlet import Outlet

    server = await start_server(broker=False)
    broker = await Broker.connect(server.address, uuid.uuid4())
    first = await BrokerClient.connect(server.address, broker.channel, heartbeat=None)
    second = await BrokerClient.connect(server.address, broker.channel, heartbeat=None)
    publisher = await BrokerClient.connect(server.address, broker.channel, heartbeat=None)
    subs = [await first.subscribe("t"), await second.subscribe("t")]
    answered = Outlet._answered
    calls = []

    def broken(self: Outlet, result: bytes, count: int) -> None:
        calls.append(count)
        answered(self, result, count)  # its work done, then the error
        if len(calls) == 1:
            raise RuntimeError("boom")

    monkeypatch.setattr(Outlet, "_answered", broken)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        await publisher.publish("t", b"one")
        assert [(await sub.get()).payload for sub in subs] == [b"one", b"one"]
        await eventually(lambda: len(calls) == 2)  # both forwards answered: the first raised
        for n in range(3):  # the line still works for both subscribers
            await publisher.publish("t", b"%d" % n)
        for sub in subs:
            assert [(await sub.get()).payload for _ in range(3)] == [b"0", b"1", b"2"]
        await eventually(lambda: len(calls) == 2 + 2 * 3)
        [failure] = [e["log_failure"] for e in events if "log_failure" in e]
        assert failure.check(RuntimeError)
        assert all(connection.connected for connection in broker.connections())
    finally:
        globalLogPublisher.removeObserver(events.append)
        for client in (publisher, first, second):
            await client.close()
        await broker.close()
        await server.stop()
