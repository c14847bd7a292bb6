"""Provider.close(timeout): refuse new requests, let the running handlers answer, then close."""

from __future__ import annotations

import uuid

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from pulsyflux import Consumer, NoProviderError, Provider, RemoteError, RequestTimeout
from pulsyflux.client.provider import MSG_CLOSED_UNANSWERED, MSG_CLOSING

from .helpers import clocked, eventually

ensure = pytest_twisted.ensureDeferred


async def _slow_pair(memory, channel):
    """A provider whose handler answers when the test says (one Deferred per request), and a consumer."""
    running: list[Deferred[bytes]] = []

    def handler(payload: bytes) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        running.append(d)
        return d

    provider = await memory.connect(Provider, channel, handler=handler)
    consumer = await memory.connect(Consumer, channel)
    return provider, consumer, running


@clocked
async def test_close_lets_a_running_handler_answer_and_refuses_new_requests(memory):
    channel = uuid.uuid4()
    provider, consumer, running = await _slow_pair(memory, channel)
    first = consumer.send(b"1")
    await memory.until(lambda: len(running) == 1)
    closing = provider.close()
    late = consumer.send(b"2")  # arrives while the provider closes: refused at once, with why
    with pytest.raises(RemoteError, match=MSG_CLOSING):
        await late
    assert not closing.called and len(running) == 1  # the refused one never reached the handler
    running[0].callback(b"answer 1")
    assert await first == b"answer 1"  # answered, not 'peer disappeared'
    await closing
    assert (provider.refused_closing, provider.closed_unanswered) == (1, 0)
    assert memory.now() == 0  # nothing waited for a timer
    await consumer.close()


@clocked
async def test_close_gives_up_at_its_timeout_and_tells_the_consumer(memory):
    channel = uuid.uuid4()
    provider, consumer, running = await _slow_pair(memory, channel)
    pending = consumer.send(b"1")
    await memory.until(lambda: len(running) == 1)
    await provider.close(timeout=2.0)  # the handler never answers
    assert memory.now() == 2.0
    with pytest.raises(RemoteError, match=MSG_CLOSED_UNANSWERED):
        await pending
    assert provider.closed_unanswered == 1
    running[0].callback(b"too late")  # answers nothing: the line is gone
    await consumer.close()


@clocked
async def test_close_with_timeout_zero_is_immediate(memory):
    channel = uuid.uuid4()
    provider, consumer, running = await _slow_pair(memory, channel)
    pending = consumer.send(b"1")
    await memory.until(lambda: len(running) == 1)
    await provider.close(timeout=0)
    with pytest.raises(NoProviderError):  # as before: the server says 'peer disappeared'
        await pending
    assert memory.now() == 0
    await consumer.close()


@clocked
async def test_a_second_close_with_timeout_zero_stops_the_wait(memory):
    channel = uuid.uuid4()
    provider, consumer, running = await _slow_pair(memory, channel)
    pending = consumer.send(b"1")
    await memory.until(lambda: len(running) == 1)
    first = provider.close(timeout=30.0)
    await provider.close(timeout=0)
    await first
    assert memory.now() == 0
    with pytest.raises(RemoteError, match=MSG_CLOSED_UNANSWERED):
        await pending
    await consumer.close()


@clocked
async def test_a_second_close_with_a_shorter_timeout_ends_the_drain_sooner_and_a_longer_one_not_later(memory):
    channel = uuid.uuid4()
    provider, consumer, running = await _slow_pair(memory, channel)
    pending = consumer.send(b"1")
    await memory.until(lambda: len(running) == 1)
    first = provider.close(timeout=30.0)
    later = provider.close(timeout=60.0)  # longer: the first close's deadline stands
    await provider.close(timeout=2.0)  # shorter: as BrokerClient.close, it moves the deadline
    await first
    await later
    assert memory.now() == 2.0
    with pytest.raises(RemoteError, match=MSG_CLOSED_UNANSWERED):
        await pending
    await consumer.close()


@clocked
async def test_close_refuses_a_timeout_it_cannot_keep(memory):
    provider = await memory.connect(Provider, uuid.uuid4())
    for bad in (-1, -0.5, float("inf"), float("nan"), "5", None, True):
        with pytest.raises(ValueError, match="finite number of seconds"):
            provider.close(bad)
    assert provider.connected  # refused, nothing closed
    await provider.close(timeout=0)
    assert not provider.connected


@clocked
async def test_pulled_requests_are_waited_for_and_a_consumer_that_gives_up_ends_the_wait(memory):
    channel = uuid.uuid4()
    provider = await memory.connect(Provider, channel)
    consumer = await memory.connect(Consumer, channel)
    answered = consumer.send(b"a")
    abandoned = consumer.send(b"b", timeout=1.0)
    one, two = await provider.receive(), await provider.receive()
    closing = provider.close(timeout=60.0)
    provider.respond(one, b"A")
    assert await answered == b"A"
    assert not closing.called  # the second is still being handled
    with pytest.raises(RequestTimeout):
        await abandoned  # its consumer's deadline passes: the server gives up on it
    await closing  # nothing left to answer: closed then, not at 60 s
    assert memory.now() < 60.0 and provider.closed_unanswered == 0
    provider.respond(two, b"B")  # does nothing (the server gave up on it), raises nothing
    await consumer.close()


@clocked
async def test_worst_input_a_flood_of_requests_while_closing_is_refused_and_holds_nothing(memory):
    channel = uuid.uuid4()
    provider, consumer, running = await _slow_pair(memory, channel)
    first = consumer.send(b"0")
    await memory.until(lambda: len(running) == 1)
    closing = provider.close(timeout=10.0)
    flood = [consumer.send(b"x" * 1000) for _ in range(500)]
    for d in flood:
        with pytest.raises(RemoteError, match=MSG_CLOSING):
            await d
    assert provider.refused_closing == 500 and provider.unanswered == 1 and len(running) == 1
    running[0].callback(b"done")
    assert await first == b"done"
    await closing
    await consumer.close()


@ensure
async def test_close_drains_over_tcp_while_another_provider_takes_the_retries(server):
    channel = uuid.uuid4()
    gate: Deferred[bytes] = Deferred()
    started: list[bytes] = []

    def slow(payload: bytes) -> Deferred[bytes]:
        started.append(payload)
        return gate

    closing_one = await Provider.connect(server.address, channel, handler=slow)
    consumer = await Consumer.connect(server.address, channel)
    in_flight = consumer.send(b"work")
    await eventually(lambda: started, timeout=60)
    other = await Provider.connect(server.address, channel, handler=lambda p: b"other:" + p)
    closing = closing_one.close()
    answers = []
    for n in range(4):  # the server alternates: the closing provider refuses its share, clearly
        try:
            answers.append(await consumer.send(str(n).encode()))
        except RemoteError as error:
            assert MSG_CLOSING in str(error)
            answers.append(await consumer.send(str(n).encode()))  # a retry
    assert all(answer.startswith(b"other:") for answer in answers)
    gate.callback(b"done")
    assert await in_flight == b"done"
    await closing
    assert closing_one.closed_unanswered == 0
    await consumer.close()
    await other.close()


@clocked
async def test_a_line_lost_while_closing_ends_the_close_and_is_not_reconnected(memory):
    """With reconnect=True: the line drops during the drain. The provider does not reconnect (it would
    register again and take requests while closing); the close ends then, not at its timeout."""
    channel = uuid.uuid4()
    running: list[Deferred[bytes]] = []

    def handler(payload: bytes) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        running.append(d)
        return d

    provider = await memory.connect(Provider, channel, handler=handler, reconnect=True)
    consumer = await memory.connect(Consumer, channel)
    pending = consumer.send(b"1", timeout=60)
    await memory.until(lambda: len(running) == 1)
    closing = provider.close(timeout=30.0)
    await memory.drop(provider)
    await closing
    assert memory.now() == 0  # not the 30 s timeout
    with pytest.raises(NoProviderError):  # the server tells the consumer its provider is gone
        await pending
    memory.advance(60)  # past any reconnect backoff
    assert not provider.connected and not provider.reconnecting
    assert memory.factory.router.pick_provider(channel.bytes) is None  # not registered again
    with pytest.raises(NoProviderError):
        await consumer.send(b"2")
    running[0].callback(b"too late")  # answers nothing, raises nothing
    await consumer.close()


class _CountedScans(dict):
    """A provider's request table that counts the scans of all of it."""

    scans = 0

    def values(self):  # type: ignore[override]
        self.scans += 1
        return super().values()

    def items(self):  # type: ignore[override]
        self.scans += 1
        return super().items()


@clocked
async def test_worst_input_a_drain_of_many_requests_scans_them_a_bounded_number_of_times(memory):
    """Hundreds of requests held (answered during the drain, or given up on by their consumers): each
    answer counts one down instead of scanning every request held (quadratic in the requests)."""
    channel = uuid.uuid4()
    provider = await memory.connect(Provider, channel)
    consumer = await memory.connect(Consumer, channel)
    provider._routing = table = _CountedScans()
    answered = [consumer.send(b"%d" % n, timeout=60) for n in range(300)]
    abandoned = [consumer.send(b"late", timeout=1.0) for _ in range(300)]
    requests = [await provider.receive() for _ in range(600)]
    closing = provider.close(timeout=30.0)
    for d in abandoned:
        with pytest.raises(RequestTimeout):
            await d  # the server gives up on each: its entry stays, as None, until respond()
    for request in requests[:299]:
        provider.respond(request, request.payload)
    assert not closing.called
    provider.respond(requests[299], b"last")
    await closing
    assert memory.now() < 30.0 and provider.closed_unanswered == 0
    assert table.scans <= 3  # at close(), at the end; not one per answer
    assert [await d for d in answered[:2]] == [b"0", b"1"]
    await consumer.close()


@clocked
async def test_close_called_by_a_handler_that_answers_by_its_return_value_still_ends_with_the_answers(memory):
    channel = uuid.uuid4()
    running: list[Deferred[bytes]] = []
    closing: list[Deferred[None]] = []

    def handler(payload: bytes):
        if payload == b"close":
            closing.append(provider.close(timeout=30.0))
            return b"closing"  # answered by the return value, inline
        d: Deferred[bytes] = Deferred()
        running.append(d)
        return d

    provider = await memory.connect(Provider, channel, handler=handler)
    consumer = await memory.connect(Consumer, channel)
    slow = consumer.send(b"slow")
    await memory.until(lambda: len(running) == 1)
    assert await consumer.send(b"close") == b"closing"
    assert not closing[0].called
    running[0].callback(b"done")
    assert await slow == b"done"
    await closing[0]
    assert memory.now() == 0
    await consumer.close()
