"""A remote subscriber notices a broker that died while the server runs (heartbeat), on the clock.

On the in-memory harness (:class:`pulsyflux.testing.MemoryServer`): every
heartbeat and timeout runs at its own time on the clock, so "within two
beats" is checked exactly and costs nothing.

A killed broker here is what a crashed broker process looks like to the
server: every connection of the broker is reset at once, with no
``$pulsyflux/closed`` notice, while the server and the subscriber's own
connections stay up.
"""

from __future__ import annotations

import uuid

import pytest
from twisted.internet.defer import Deferred

from pulsyflux import Broker, BrokerClient, NoProviderError, SubscriptionClosed
from pulsyflux.testing import hang

from .helpers import clocked, later

BEAT = 0.05


def fast_backoff(attempt: int) -> float:
    return 0.05


def resumed(sub) -> Deferred:
    """Fires the next time ``sub`` is forwarded to again after a gap."""
    d: Deferred = Deferred()
    sub.on_resume(lambda s: None if d.called else d.callback(s))
    return d


async def kill(memory, broker: Broker) -> None:
    """Reset every connection of ``broker``: its forwarding ones first, so no closing notice gets out."""
    await memory.drop(broker)  # fired on return: both ends have seen it
    assert broker.closed


@clocked
async def test_a_subscription_ends_with_a_clear_reason_when_its_broker_dies(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)
    client = await memory.connect(BrokerClient, channel, heartbeat=BEAT)
    sub = await client.subscribe("news")
    await client.publish("news", b"before")
    started = memory.now()

    await kill(memory, broker)
    assert sub.provider_connected()  # the server still runs: nothing else would tell the subscriber
    assert (await sub.get()).payload == b"before"  # what arrived stays readable
    with pytest.raises(SubscriptionClosed, match=f"closed: the broker on channel {channel} disappeared"):
        await sub.get()
    assert memory.now() - started <= 2 * BEAT  # within two heartbeats, not forever
    assert sub.closed_reason == f"the broker on channel {channel} disappeared"
    assert client.subscriptions == []
    await sub.provider.when_lost()  # its connection is closed too
    assert client.next_heartbeat is None  # nothing left to keep alive: no timer either
    with pytest.raises(NoProviderError):
        await client.publish("news", b"nobody")
    await client.close()


@clocked
async def test_a_broker_that_hangs_is_taken_for_gone_after_two_unanswered_beats(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)
    client = await memory.connect(BrokerClient, channel, heartbeat=BEAT)
    sub = await client.subscribe("news")
    started = memory.now()

    resume = hang(broker)  # alive and connected, but answers nothing
    with pytest.raises(SubscriptionClosed, match="the broker on channel .* disappeared"):
        await sub.get()
    assert memory.now() - started == pytest.approx(2 * (BEAT + 1.0))  # two beats that each waited 1 s (the floor)
    resume()
    await client.close()
    await broker.close()


@clocked
async def test_with_reconnect_a_subscription_waits_for_a_new_broker_and_resumes(memory):
    channel = uuid.uuid4()
    old = await memory.connect(Broker, channel)
    client = await memory.connect(BrokerClient, channel, reconnect=fast_backoff, heartbeat=BEAT)
    sub = await client.subscribe("news")
    await client.publish("news", b"before")
    assert (await sub.get()).payload == b"before"
    back = resumed(sub)

    await kill(memory, old)
    await later(2 * BEAT, clock=memory.clock)
    await memory.quiet()  # the second beat (due now too) has run: noticed within two beats
    assert not sub.closed and sub.gaps == 1  # a gap, not an end
    with pytest.raises(NoProviderError):
        await client.publish("news", b"during")

    fresh = await memory.connect(Broker, channel)  # the broker process restarted; the server never did
    assert await back is sub
    assert fresh.stats()["topics"] == {"news": 1}
    for i in range(3):
        await client.publish("news", b"after %d" % i)
    assert [(await sub.get()).payload for _ in range(3)] == [b"after %d" % i for i in range(3)]
    assert sub.gaps == 1 and not sub.closed and sub.pending == 0
    await client.close()
    await fresh.close()


@clocked
async def test_a_broker_restarted_between_two_heartbeats_is_told_and_the_gap_is_counted(memory):
    channel = uuid.uuid4()
    old = await memory.connect(Broker, channel)
    client = await memory.connect(BrokerClient, channel, heartbeat=BEAT)  # no reconnect needed
    started = memory.now()
    sub = await client.subscribe("news")  # its first beat is due BEAT from now
    back = resumed(sub)

    await kill(memory, old)
    fresh = await memory.connect(Broker, channel)
    assert memory.now() == started  # the broker is back before any beat: the next one finds the new one
    assert await back is sub
    assert sub.gaps == 1 and fresh.stats()["topics"] == {"news": 1}
    await client.publish("news", b"after")
    assert (await sub.get()).payload == b"after"
    await client.close()
    await fresh.close()


@clocked
async def test_heartbeats_to_a_live_broker_change_nothing(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)
    local = await broker.subscribe("news")
    client = await memory.connect(BrokerClient, channel, heartbeat=BEAT)
    subs = [await client.subscribe("news"), await client.subscribe("other")]
    connections = len(memory.connections)
    for i in range(5):
        await client.publish("news", b"%d" % i)
    await memory.quiet()
    assert broker.delivered == 10  # forwarded and answered: the counters are still
    before = broker.stats()
    routed = memory.stats.requests_routed

    # Three beats: each re-announces every subscription, one request each (this broker is a client).
    await memory.until(lambda: memory.stats.requests_routed >= routed + 3 * len(subs))
    after = broker.stats()
    assert after == before  # no new subscription, no gap, nothing published, refused or lost
    assert after["topics"] == {"news": 2, "other": 1} and after["rejected"] == 0
    assert len(memory.connections) == connections  # no connection opened
    for i in range(5, 10):
        await client.publish("news", b"%d" % i)
    for sub in (subs[0], local):  # each message once, in order
        assert [(await sub.get()).payload for _ in range(10)] == [b"%d" % i for i in range(10)]
        assert sub.pending == 0 and sub.gaps == 0 and not sub.closed
    assert subs[1].pending == 0 and subs[1].gaps == 0
    await client.close()
    assert client.next_heartbeat is None
    await broker.close()


@clocked
async def test_no_heartbeat_when_disabled(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)
    client = await memory.connect(BrokerClient, channel, heartbeat=0)
    await client.subscribe("news")
    assert client.heartbeat is None and client.next_heartbeat is None
    with pytest.raises(ValueError, match="heartbeat"):
        BrokerClient(memory.address, channel, heartbeat=-1)
    await client.close()
    await broker.close()
