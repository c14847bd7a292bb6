"""BrokerClient.close() drains: publishes made before it are confirmed, or fail saying why (docs/broker.md, Closing).

On the in-memory harness for the timeouts (the clock moves only when
nothing else can happen, so "finished at the timeout" is exact), and over
TCP for what a socket adds (acknowledgements still on their way back when
close() is called).
"""

from __future__ import annotations

import uuid

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from pulsyflux import Broker, BrokerClient, ConnectionLostError, Message, PublishUnconfirmed, SubscriptionClosed
from pulsyflux.testing import hang, start_server

from .helpers import clocked, eventually, later, within_turns


def outcomes(ds: list[Deferred]) -> list[object]:
    """What each Deferred fired with (a Failure's exception), without leaving one failing unhandled."""
    results: list[object] = []
    for d in ds:
        assert d.called, "still waiting after close()"
        d.addBoth(lambda result: results.append(result.value if isinstance(result, Failure) else result))
    return results


async def _pair(memory, **options):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)
    client = await memory.connect(BrokerClient, channel, heartbeat=None, **options)
    return broker, client


@clocked
async def test_fire_and_forget_publishes_are_all_delivered_by_close(memory):
    broker, client = await _pair(memory)
    sub = await broker.subscribe("orders")
    ds = [client.publish("orders", b"%d" % n) for n in range(1000)]  # none awaited
    assert client.consumer.pending  # some are in flight, most wait behind the window
    started = memory.now()
    await client.close()
    assert outcomes(ds) == [None] * 1000  # every one confirmed: none fails, none is left unhandled
    assert memory.now() == started  # no timer involved: it waited for the answers, not for time
    assert client.unconfirmed == 0
    assert [(await sub.get()).payload for _ in range(1000)] == [b"%d" % n for n in range(1000)]
    await broker.close()


@clocked
async def test_close_gives_up_at_its_timeout_when_the_broker_never_answers(memory):
    broker, client = await _pair(memory)
    resume = hang(broker)  # alive and connected, answering nothing
    ds = [client.publish("orders", b"%d" % n) for n in range(10)]  # 4 requests in flight, 6 waiting
    started = memory.now()
    await client.close(timeout=2.0)
    assert memory.now() - started == 2.0  # exactly its timeout (a publish's own is 5 s)
    errors = outcomes(ds)
    assert all(type(error) is PublishUnconfirmed for error in errors)
    assert [error.sent for error in errors] == [True] * 4 + [False] * 6
    assert "not confirmed: the broker client closed (close timeout of 2 s passed) before the broker" in str(errors[0])
    assert "may or may not have been delivered" in str(errors[0])
    assert str(errors[9]) == (
        "not published: the broker client closed (close timeout of 2 s passed) before this publish could be sent"
    )
    assert client.unconfirmed == 10
    assert not client.consumer.connected
    resume()
    await broker.close()


@clocked
async def test_the_unsubscribes_at_close_wait_only_for_what_is_left_of_the_timeout(memory):
    broker, client = await _pair(memory)
    sub = await client.subscribe("orders")
    resume = hang(broker)  # the unsubscribe is never answered
    started = memory.now()
    await client.close(timeout=0.5)
    assert memory.now() - started == pytest.approx(0.5)  # not the 1 s each unsubscribe used to wait at least
    assert sub.closed_reason == "the client closed"
    resume()
    await broker.close()


@clocked
async def test_a_huge_queue_at_close_is_still_bounded_by_the_timeout(memory):
    broker, client = await _pair(memory)
    resume = hang(broker)
    singles = [client.publish("flood", b"x") for _ in range(2000)]
    many = client.publish_many([Message("flood", b"x")] * 100_000)
    started = memory.now()
    await client.close(timeout=1.0)
    assert memory.now() - started == 1.0
    assert all(isinstance(error, PublishUnconfirmed) for error in outcomes(singles))
    [error] = outcomes([many])
    assert isinstance(error, PublishUnconfirmed) and not error.sent  # most of it never left
    assert client.unconfirmed == 102_000  # each message counted once, sent or not
    resume()
    await broker.close()


@clocked
async def test_publishing_or_subscribing_once_close_began_is_refused_clearly(memory):
    broker, client = await _pair(memory)
    resume = hang(broker)
    first = client.publish("t", b"before")
    closing = client.close(timeout=1.0)
    assert not closing.called  # draining: "before" is not answered yet
    late = [client.publish("t", b"after"), client.publish_many([Message("t", b"after")]), client.subscribe("t")]
    for error in outcomes(late):  # at once, while the drain still waits
        assert type(error) is ConnectionLostError
        assert str(error) == "the broker client is closed (close() was called): no new publish or subscribe"
    resume()
    await closing
    assert outcomes([first]) == [None]  # the broker woke up in time
    [error] = outcomes([client.publish("t", b"later")])
    assert "close() was called" in str(error)
    await broker.close()


@clocked
async def test_close_twice_and_a_second_close_at_once_cuts_the_drain_short(memory):
    broker, client = await _pair(memory)
    resume = hang(broker)
    ds = [client.publish("t", b"x") for _ in range(3)]
    started = memory.now()
    first = client.close()  # 5 s by default
    second = client.close(timeout=3.0)  # shorter: the drain ends at 3 s
    assert not first.called and not second.called
    await later(1.0, clock=memory.clock)
    third = client.close(timeout=0)  # now: stop waiting
    for closing in (first, second, third):
        await closing  # all three end with the one close
    assert memory.now() - started == 1.0
    assert all("close(timeout=0) cut the drain short" in str(error) for error in outcomes(ds))
    await client.close()  # once more, after the end: fires at once
    resume()
    await broker.close()


@clocked
async def test_a_shorter_timeout_in_a_second_close_moves_the_deadline(memory):
    broker, client = await _pair(memory)
    resume = hang(broker)
    [d] = [client.publish("t", b"x")]
    started = memory.now()
    client.close(timeout=30.0)
    await client.close(timeout=3.0)
    assert memory.now() - started == 3.0
    assert "close timeout of 3 s passed" in str(outcomes([d])[0])
    resume()
    await broker.close()


@clocked
async def test_close_with_nothing_to_send_takes_no_time_and_leaves_no_timer(memory):
    broker, client = await _pair(memory)
    await client.publish("t", b"confirmed")
    started = memory.now()
    await client.close()
    assert memory.now() == started
    assert not [call for call in memory.clock.getDelayedCalls() if "BrokerClient" in call.func.__qualname__]
    await broker.close()


@clocked
async def test_close_while_reconnecting_ends_at_once(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)
    client = await memory.connect(BrokerClient, channel, heartbeat=None, reconnect=lambda attempt: 10.0)
    sub = await client.subscribe("t")
    await memory.drop(client)  # every connection of the client: it retries in 10 s
    assert client.consumer.reconnecting
    [error] = outcomes([client.publish("t", b"while down")])  # fails at once, as before: nothing queued
    assert isinstance(error, ConnectionLostError) and "reconnecting" in str(error)
    started = memory.now()
    await client.close()
    assert memory.now() == started  # nothing to wait for
    assert not client.consumer.reconnecting and sub.closed
    with pytest.raises(SubscriptionClosed, match="the client closed"):
        await sub.get()
    assert client.unconfirmed == 0
    memory.advance(20.0)
    assert not client.consumer.connected  # no reconnect after close
    await broker.close()


@clocked
async def test_close_after_the_line_was_lost(memory):
    broker, client = await _pair(memory)
    await memory.drop(client.consumer)
    await client.close()
    [error] = outcomes([client.publish("t", b"x")])
    assert "close() was called" in str(error)
    await broker.close()


@clocked
async def test_messages_a_subscription_received_stay_readable_after_close(memory):
    broker, client = await _pair(memory)
    sub = await client.subscribe("t")
    await broker.publish("t", b"one")
    await broker.publish("t", b"two")
    await memory.until(lambda: sub.pending == 2)
    await client.close()
    assert [msg.payload for msg in sub.take()] == [b"one", b"two"]
    with pytest.raises(SubscriptionClosed, match="closed: the client closed"):
        await sub.get()
    await broker.close()


@clocked
async def test_forwards_on_their_way_when_close_begins_are_still_taken(memory):
    broker, client = await _pair(memory)
    sub = await client.subscribe("t")
    ds = [broker.publish("t", b"%d" % n) for n in range(50)]  # the first reach the broker before the unsubscribe
    assert sub.pending == 0
    await client.close()
    assert outcomes(ds) == [None] * 50
    got = [msg.payload for msg in sub.take()]
    assert got and got == [b"%d" % n for n in range(len(got))]  # what was forwarded before the unsubscribe, in order
    assert broker.stats()["lost"] == 0  # the others came after it: published to nobody
    await broker.close()


@clocked
async def test_a_queue_group_member_that_closes_leaves_its_forwards_to_the_others(memory):
    broker, client = await _pair(memory)
    leaving = await client.subscribe("jobs", group="workers")
    staying = await broker.subscribe("jobs", group="workers")
    ds = [broker.publish("jobs", b"%d" % n) for n in range(50)]
    await client.close()
    assert outcomes(ds) == [None] * 50
    kept = [msg.payload for msg in leaving.take()]
    await memory.until(lambda: len(kept) + staying.pending == 50)
    assert sorted(kept + [msg.payload for msg in staying.take()], key=int) == [b"%d" % n for n in range(50)]
    assert broker.stats()["lost"] == 0
    await broker.close()


@clocked
async def test_a_subscribe_still_starting_when_close_begins_ends_with_it(memory):
    broker, client = await _pair(memory)
    starting = client.subscribe("t")
    await client.close()
    with pytest.raises(ConnectionLostError):
        await starting
    await memory.until(lambda: not broker.fanout.outlets)  # the broker keeps nothing for it
    await broker.close()


def test_close_refuses_a_timeout_it_cannot_keep():
    client = BrokerClient("127.0.0.1:1")
    for bad in (-1, float("inf"), float("nan"), None, "5", True):
        with pytest.raises(ValueError, match="timeout must be a finite number of seconds >= 0"):
            client.close(timeout=bad)  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_over_tcp_fire_and_forget_publishes_then_close_deliver_every_one():
    running = await start_server()
    try:
        publisher = await BrokerClient.connect(running.address, heartbeat=None)
        subscriber = await BrokerClient.connect(running.address, heartbeat=None)
        sub = await subscriber.subscribe("tcp")
        ds = [publisher.publish("tcp", b"%d" % n) for n in range(500)]
        await publisher.close()  # the last answers are still on their way back
        assert outcomes(ds) == [None] * 500
        assert [(await sub.get()).payload for _ in range(500)] == [b"%d" % n for n in range(500)]
        await subscriber.close()
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_over_tcp_close_at_once_fails_what_a_hung_broker_did_not_answer():
    running = await start_server()
    try:
        client = await BrokerClient.connect(running.address, heartbeat=None)
        resume = hang(running.broker)
        ds = [client.publish("tcp", b"x") for _ in range(20)]
        await client.close(timeout=0)
        errors = outcomes(ds)
        assert all(type(error) is PublishUnconfirmed for error in errors)
        assert "close(timeout=0): no drain" in str(errors[0])
        assert client.unconfirmed == 20
        resume()
    finally:
        await running.stop()


class _DownConsumer:
    """A Consumer whose line drops: from then on send_for fails at once, inside the call (as Consumer's)."""

    def __init__(self) -> None:
        from twisted.internet.task import Clock

        self.reactor = Clock()
        self.answers: list = []
        self.down = False

    def send_for(self, body: bytes, timeout: float, answer) -> None:
        if self.down:
            answer.errback(ConnectionLostError("not connected"))
        else:
            self.answers.append(answer)

    def drop(self) -> None:
        self.down = True
        for answer in self.answers:
            answer.errback(ConnectionLostError("connection lost"))


@pytest.mark.parametrize("go", [True, False], ids=["go-broker-batch-1", "our-broker-batch-512"])
def test_a_dropped_line_settles_every_queued_publish_without_recursion(go):
    """Each failed request flushed the next batch from inside the last one's failure: one stack level
    per queued batch, a RecursionError at ~170, and every publish below it never settled (nor close())."""
    from twisted.logger import globalLogPublisher

    from pulsyflux.broker.publisher import Publisher

    consumer = _DownConsumer()
    publisher = Publisher(consumer)
    if go:
        publisher.use_go_broker()
    count = 3_000 if go else 200_000  # ~3,000 and ~390 batches queued behind the window
    ds = [publisher.publish("t", b"x", None, timeout=0) for _ in range(count)]
    idle = publisher.when_idle()
    logged: list = []
    observer = lambda event: logged.append(event) if "log_failure" in event else None  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        consumer.drop()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert not logged, [event["log_failure"].value for event in logged]
    errors = outcomes(ds)
    assert all(isinstance(error, ConnectionLostError) for error in errors)
    assert {str(error) for error in errors} == {"connection lost", "not connected"}
    assert publisher.requests == 0 and not publisher.busy and idle.called


@clocked
async def test_close_drains_after_a_dropped_line_with_thousands_queued(memory):
    broker, client = await _pair(memory)
    client._publisher.window = client._publisher.batch = 1  # one at a time, as to a Go broker: 1 batch per publish
    ds = [client.publish("t", b"%d" % n) for n in range(2_000)]
    await memory.drop(client.consumer)
    errors = outcomes(ds)
    assert all(isinstance(error, ConnectionLostError) for error in errors)
    assert client._publisher.requests == 0
    started = memory.now()
    await client.close()  # nothing left to wait for: at once
    assert memory.now() == started and client.unconfirmed == 0
    await broker.close()


@pytest_twisted.ensureDeferred
async def test_over_tcp_a_line_cut_by_the_server_settles_thousands_of_queued_publishes():
    """Over TCP (6148b56): the server cuts the publisher's line with 5,000 publishes queued one per request;
    each failed request used to flush the next from inside its own failure, a RecursionError at ~170
    levels, and the publishes below it never settled (nor did close()'s drain)."""
    running = await start_server()
    try:
        client = await BrokerClient.connect(running.address, heartbeat=None)
        client._publisher.window = client._publisher.batch = 1  # one request per publish, as to a Go broker
        ds = [client.publish("tcp", b"%d" % n) for n in range(5_000)]  # none awaited: 1 sent, 4,999 queued
        await running.drop(client.consumer)  # the server's end aborted before it read a request
        await eventually(lambda: not client.consumer.connected)
        errors = outcomes(ds)  # every one settled once the client saw the line go
        assert all(isinstance(error, ConnectionLostError) for error in errors), {type(e) for e in errors}
        assert client._publisher.requests == 0
        await within_turns(client.close())  # nothing left to wait for: no drain, no timeout
        assert client.unconfirmed == 0
    finally:
        await running.stop()
