"""A remote subscriber notices a broker that died while the server runs (heartbeat), over real TCP.

A killed broker here is what a crashed broker process looks like to the
server: every connection of the broker is reset at once, with no
``$pulsyflux/closed`` notice, while the server and the subscriber's own
connections stay up.
"""

from __future__ import annotations

import uuid

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, DeferredList

from pulsyflux import Broker, BrokerClient, NoProviderError, SubscriptionClosed

ensure = pytest_twisted.ensureDeferred
BEAT = 0.05


def fast_backoff(attempt: int) -> float:
    return 0.05


def within(d: Deferred, seconds: float = 10.0) -> Deferred:
    """``d``, failing with TimeoutError rather than hanging the test."""
    return d.addTimeout(seconds, reactor)


def resumed(sub) -> Deferred:
    """Fires the next time ``sub`` is forwarded to again after a gap."""
    d: Deferred = Deferred()
    sub.on_resume(lambda s: None if d.called else d.callback(s))
    return d


async def kill(broker: Broker) -> None:
    """Reset every connection of ``broker``: its forwarding ones first, so no closing notice gets out."""
    clients = [outlet.consumer for outlet in broker._router.outlets.values()]
    clients += [broker._publisher.consumer, broker._provider]
    gone = DeferredList([client.when_lost() for client in clients])
    for client in clients:
        client._protocol.transport.abortConnection()
    await within(gone)
    assert broker.closed


async def eventually(condition, timeout: float = 5.0, step: float = 0.01) -> None:
    """Wait (bounded) until ``condition()`` is true; for states no Deferred announces."""
    for _ in range(int(timeout / step)):
        if condition():
            return
        await task.deferLater(reactor, step, lambda: None)
    raise AssertionError(f"condition not met within {timeout} s")


def count_announces(broker: Broker, wanted: int) -> Deferred:
    """Fires once ``broker`` has handled ``wanted`` more ``$pulsyflux/subscribe`` messages."""
    router = broker._router
    control = router._control
    seen = []
    d: Deferred = Deferred()

    def counting(kind, headers):
        result = control(kind, headers)
        seen.append(kind)
        if len(seen) >= wanted and not d.called:
            router._control = control
            d.callback(len(seen))
        return result

    router._control = counting
    return d


@ensure
async def test_a_subscription_ends_with_a_clear_reason_when_its_broker_dies(server):
    channel = uuid.uuid4()
    broker = await Broker.connect(server.address, channel)
    client = await BrokerClient.connect(server.address, channel, heartbeat=BEAT)
    sub = await client.subscribe("news")
    await client.publish("news", b"before")
    started = reactor.seconds()

    await kill(broker)
    assert sub._provider.connected  # the server still runs: nothing else would tell the subscriber
    assert (await within(sub.get())).payload == b"before"  # what arrived stays readable
    with pytest.raises(SubscriptionClosed, match=f"closed: the broker on channel {channel} disappeared"):
        await within(sub.get())
    assert reactor.seconds() - started < 1.0  # a few heartbeats, not forever
    assert sub.closed_reason == f"the broker on channel {channel} disappeared"
    assert client.subscriptions == []
    await within(sub._provider.when_lost())  # its connection is closed too
    assert client._beat is None  # nothing left to keep alive: no timer either
    with pytest.raises(NoProviderError):
        await client.publish("news", b"nobody")
    await client.close()


@ensure
async def test_a_broker_that_hangs_is_taken_for_gone_after_two_unanswered_beats(server):
    channel = uuid.uuid4()
    broker = await Broker.connect(server.address, channel)
    client = await BrokerClient.connect(server.address, channel, heartbeat=BEAT)
    sub = await client.subscribe("news")
    started = reactor.seconds()

    broker._provider._protocol.transport.stopReading()  # alive and connected, but answers nothing
    with pytest.raises(SubscriptionClosed, match="the broker on channel .* disappeared"):
        await within(sub.get())
    assert 2.0 <= reactor.seconds() - started < 4.0  # two beats that each waited 1 s (the floor) for an answer
    broker._provider._protocol.transport.startReading()
    await client.close()
    await broker.close()


@ensure
async def test_with_reconnect_a_subscription_waits_for_a_new_broker_and_resumes(server):
    channel = uuid.uuid4()
    old = await Broker.connect(server.address, channel)
    client = await BrokerClient.connect(server.address, channel, reconnect=fast_backoff, heartbeat=BEAT)
    sub = await client.subscribe("news")
    await client.publish("news", b"before")
    assert (await within(sub.get())).payload == b"before"
    back = resumed(sub)

    await kill(old)
    await eventually(lambda: sub.gaps > 0, timeout=2.0)  # noticed within a few beats
    assert not sub.closed and sub.gaps == 1  # a gap, not an end
    with pytest.raises(NoProviderError):
        await client.publish("news", b"during")

    fresh = await Broker.connect(server.address, channel)  # the broker process restarted; the server never did
    assert await within(back) is sub
    assert fresh.stats()["topics"] == {"news": 1}
    for i in range(3):
        await client.publish("news", b"after %d" % i)
    assert [(await within(sub.get())).payload for _ in range(3)] == [b"after %d" % i for i in range(3)]
    assert sub.gaps == 1 and not sub.closed and sub.pending == 0
    await client.close()
    await fresh.close()


@ensure
async def test_a_broker_restarted_between_two_heartbeats_is_told_and_the_gap_is_counted(server):
    channel = uuid.uuid4()
    old = await Broker.connect(server.address, channel)
    client = await BrokerClient.connect(server.address, channel, heartbeat=BEAT)  # no reconnect needed
    sub = await client.subscribe("news")
    back = resumed(sub)
    client._stop_heartbeat()  # no beat while the broker is away: it comes back before the next one

    await kill(old)
    fresh = await Broker.connect(server.address, channel)
    client._schedule_heartbeat()
    assert await within(back) is sub
    assert sub.gaps == 1 and fresh.stats()["topics"] == {"news": 1}
    await client.publish("news", b"after")
    assert (await within(sub.get())).payload == b"after"
    await client.close()
    await fresh.close()


@ensure
async def test_heartbeats_to_a_live_broker_change_nothing(server):
    channel = uuid.uuid4()
    broker = await Broker.connect(server.address, channel)
    local = await broker.subscribe("news")
    client = await BrokerClient.connect(server.address, channel, heartbeat=BEAT)
    subs = [await client.subscribe("news"), await client.subscribe("other")]
    connections = len(server.factory.router.connections)
    for i in range(5):
        await client.publish("news", b"%d" % i)
    await eventually(lambda: broker.delivered == 10)  # forwarded and answered: the counters are still
    before = broker.stats()

    assert await within(count_announces(broker, 3 * len(subs))) >= 6  # three beats or more
    after = broker.stats()
    assert after == before  # no new subscription, no gap, nothing published, refused or lost
    assert after["topics"] == {"news": 2, "other": 1} and after["rejected"] == 0
    assert len(server.factory.router.connections) == connections  # no connection opened
    for i in range(5, 10):
        await client.publish("news", b"%d" % i)
    for sub in (subs[0], local):  # each message once, in order
        assert [(await within(sub.get())).payload for _ in range(10)] == [b"%d" % i for i in range(10)]
        assert sub.pending == 0 and sub.gaps == 0 and not sub.closed
    assert subs[1].pending == 0 and subs[1].gaps == 0
    await client.close()
    assert client._beat is None
    await broker.close()


@ensure
async def test_no_heartbeat_when_disabled(server):
    channel = uuid.uuid4()
    broker = await Broker.connect(server.address, channel)
    client = await BrokerClient.connect(server.address, channel, heartbeat=0)
    await client.subscribe("news")
    assert client.heartbeat is None and client._beat is None
    with pytest.raises(ValueError, match="heartbeat"):
        BrokerClient(server.address, channel, heartbeat=-1)
    await client.close()
    await broker.close()
