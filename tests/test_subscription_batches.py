"""Reading a subscription in batches: Subscription.take() and Subscription.batches(), and async for without Deferreds."""

from __future__ import annotations

import uuid

import pytest
import pytest_twisted
from twisted.internet import defer

from pulsyflux import Broker, BrokerClient, BrokerService, Message

from .helpers import clocked

ensure = pytest_twisted.ensureDeferred


@clocked
async def test_batches_read_every_message_in_order_past_a_small_buffer_then_end(memory):
    """A buffer of 10 holds the subscriber's answers: batches must release them, or the flood stalls."""
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel, batch=50)
    client = await memory.connect(BrokerClient, channel)
    sub = await client.subscribe("t", buffer=10)
    published = defer.gatherResults([client.publish("t", b"%d" % i) for i in range(2000)])
    got: list[int] = []
    wakeups = 0
    async for msgs in sub.batches():
        wakeups += 1
        got.extend(int(msg.payload) for msg in msgs)
        if len(got) == 2000:
            await client.unsubscribe("t")
    await published
    assert got == list(range(2000))
    assert sub.dropped == 0 and broker.dropped == 0
    assert wakeups < 2000 / 5  # one per delivery, not one per message
    await client.close()
    await broker.close()


@clocked
async def test_batches_respect_the_limit_and_end_after_what_arrived_before_the_close(memory):
    broker = await memory.connect(Broker, uuid.uuid4())
    sub = await broker.subscribe("t")
    await defer.gatherResults([broker.publish("t", b"%d" % i) for i in range(7)])
    await broker.unsubscribe("t")  # closed, with 7 messages still to read
    sizes = []
    payloads = []
    async for msgs in sub.batches(limit=3):
        sizes.append(len(msgs))
        payloads += [msg.payload for msg in msgs]
    assert sizes == [3, 3, 1]
    assert payloads == [b"%d" % i for i in range(7)]
    with pytest.raises(ValueError, match="at least 1"):
        sub.batches(limit=0)
    await broker.close()


@clocked
async def test_take_returns_what_has_arrived_without_waiting(memory):
    broker = await memory.connect(Broker, uuid.uuid4())
    sub = await broker.subscribe("t")
    assert sub.take() == []
    await defer.gatherResults([broker.publish("t", b"%d" % i, {"n": str(i)}) for i in range(5)])
    assert sub.pending == 5
    assert sub.take(2) == [Message("t", b"0", {"n": "0"}), Message("t", b"1", {"n": "1"})]
    assert [msg.payload for msg in sub.take()] == [b"2", b"3", b"4"]
    assert sub.take() == [] and sub.pending == 0
    await broker.unsubscribe("t")
    assert sub.take() == []  # never fails, also after the end
    await broker.close()


@clocked
async def test_async_for_and_get_interleave_in_order(memory):
    """async for takes a waiting message without a Deferred; get() and it still share one queue."""
    broker = await memory.connect(Broker, uuid.uuid4())
    sub = await broker.subscribe("t")
    await defer.gatherResults([broker.publish("t", b"%d" % i) for i in range(6)])
    got = []
    async for msg in sub:
        got.append(msg.payload)
        got.append((await sub.get()).payload)
        if len(got) == 6:
            break
    assert got == [b"%d" % i for i in range(6)]
    await broker.close()


@ensure
async def test_batches_over_tcp_from_a_remote_publisher():
    service = BrokerService("tcp:0:interface=127.0.0.1", broker_channel=uuid.uuid4(), grace=0)
    service.startService()
    try:
        await service.whenReady()
        address = f"127.0.0.1:{service.server.port.getHost().port}"
        publisher = await BrokerClient.connect(address, service.broker_channel)
        subscriber = await BrokerClient.connect(address, service.broker_channel)
        sub = await subscriber.subscribe("tcp", buffer=20)
        published = defer.gatherResults([publisher.publish("tcp", b"%d" % i) for i in range(1000)])
        got: list[int] = []
        async for msgs in sub.batches():
            got.extend(int(msg.payload) for msg in msgs)
            if len(got) >= 1000:
                break
        await published
        assert got == list(range(1000)) and sub.dropped == 0
        await publisher.close()
        await subscriber.close()
    finally:
        await service.stopService()
