"""publish_many: several messages, one Deferred (docs/broker.md, API)."""

from __future__ import annotations

import uuid

import pytest
import pytest_twisted

from pulsyflux import Broker, BrokerClient, Message
from pulsyflux.broker.publisher import PublishUnconfirmed
from pulsyflux.testing import start_server
from pulsyflux.wire.errors import ConnectionLostError
from pulsyflux.wire.messages import Position

from .helpers import clocked


@clocked
async def test_publish_many_delivers_in_order_and_fires_once_with_every_position(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel, history=100)
    client = await memory.connect(BrokerClient, channel, heartbeat=None)
    sub = await broker.subscribe("many")
    # More than one request's worth (512 per request), so the answers of several requests make one result.
    sent = [Message("many", b"%d" % n, {"n": str(n)} if n % 3 else None) for n in range(1200)]
    positions = await client.publish_many(sent)
    assert [await sub.get() for _ in sent] == sent
    assert len(positions) == len(sent) and all(isinstance(p, Position) for p in positions)
    assert [p.seq for p in positions] == list(range(1, len(sent) + 1))
    assert await client.publish_many([]) == []
    await client.close()
    await broker.close()


@clocked
async def test_publish_many_refuses_a_bad_message_at_once_and_publishes_none(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)
    client = await memory.connect(BrokerClient, channel, heartbeat=None)
    sub = await broker.subscribe("ok")
    with pytest.raises(ValueError, match="wildcards are for subscribing"):
        client.publish_many([Message("ok", b"1"), Message("orders.*", b"2")])
    with pytest.raises(TypeError, match="Message objects"):
        client.publish_many([("ok", b"1", None)])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="payload must be bytes"):
        client.publish_many([Message("ok", b"1"), Message("ok", "text")])  # type: ignore[arg-type]
    await client.publish("ok", b"after")
    assert (await sub.get()).payload == b"after"  # nothing of the refused calls went out
    assert sub.pending == 0
    await client.close()
    await broker.close()


@clocked
async def test_publish_many_fails_once_when_the_client_closes_at_once(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)
    client = await memory.connect(BrokerClient, channel, heartbeat=None)
    d = client.publish_many([Message("gone", b"x")] * 3000)  # most of it waits behind the window
    await client.close(timeout=0)
    with pytest.raises(PublishUnconfirmed, match=r"close\(timeout=0\)") as failed:
        await d
    assert isinstance(failed.value, ConnectionLostError)  # what it was before close() drained
    assert client.unconfirmed == 3000
    await broker.close()


@clocked
async def test_publish_many_is_drained_by_close(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)
    sub = await broker.subscribe("kept")
    client = await memory.connect(BrokerClient, channel, heartbeat=None)
    d = client.publish_many([Message("kept", b"x")] * 3000)  # most of it waits behind the window
    await client.close()
    assert await d == [None] * 3000
    assert client.unconfirmed == 0
    assert broker.published == 3000
    assert [(await sub.get()).payload for _ in range(3000)] == [
        b"x"
    ] * 3000  # the broker holds what the buffer does not
    await broker.close()


@pytest_twisted.ensureDeferred
async def test_publish_many_over_tcp():
    running = await start_server()
    try:
        client = await BrokerClient.connect(running.address, heartbeat=None)
        sub = await client.subscribe("tcp-many")
        sent = [Message("tcp-many", bytes([n % 256]) * 10) for n in range(700)]
        assert await client.publish_many(sent) == [None] * len(sent)  # no history: no positions
        assert [await sub.get() for _ in sent] == sent
        await client.close()
    finally:
        await running.stop()
