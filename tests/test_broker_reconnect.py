"""Subscriptions survive a server restart (reconnect=True): in memory (``MemoryServer.restart``), and over TCP.

A restart here is what a crash and a supervisor's restart look like to the
clients: the server stops listening, every connection is reset, and a fresh
server listens again on the same port.
"""

from __future__ import annotations

import uuid

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList

from pulsyflux import Broker, BrokerClient, BrokerService, ConnectionLostError, SubscriptionClosed
from pulsyflux.server import ServerFactory

from .helpers import clocked

ensure = pytest_twisted.ensureDeferred


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


async def crash(factory: ServerFactory, port) -> None:
    """Stop listening and reset every connection, as when the server's process dies."""
    await port.stopListening()
    await within(factory.router.close_all())


async def assert_fails_at_once_on_the_clock(memory, d: Deferred, error: type = ConnectionLostError) -> None:
    await memory.quiet()
    assert d.called  # before the clock moved: nothing waited for a line or a timer
    with pytest.raises(error):
        await d


@clocked
async def test_remote_and_local_subscriptions_resume_after_a_server_restart(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel, reconnect=fast_backoff)  # run apart from the server
    local = await broker.subscribe("news")
    subscriber = await memory.connect(BrokerClient, channel, reconnect=fast_backoff)
    remote = await subscriber.subscribe("news")
    publisher = await memory.connect(BrokerClient, channel, reconnect=fast_backoff)
    await publisher.publish("news", b"before")
    assert (await remote.get()).payload == b"before"
    assert (await local.get()).payload == b"before"
    back = [resumed(remote), resumed(local)]

    memory.restart()
    # Publishing while the server is down fails at once, from either side.
    await assert_fails_at_once_on_the_clock(memory, publisher.publish("news", b"during"))
    await assert_fails_at_once_on_the_clock(memory, broker.publish("news", b"during"))
    assert not remote.closed and not local.closed  # the streams do not end

    assert await DeferredList(back, fireOnOneErrback=True) == [(True, remote), (True, local)]
    await publisher.when_connected()
    for i in range(5):
        await publisher.publish("news", b"after %d" % i)
    for sub in (remote, local):  # the same Subscription objects, in order, nothing from the gap
        assert [(await sub.get()).payload for _ in range(5)] == [b"after %d" % i for i in range(5)]
        assert sub.gaps == 1 and not sub.closed and sub.pending == 0

    stats = broker.stats()
    assert stats["topics"] == {"news": 2}  # the remote subscriber's re-announce did not add a second one
    assert stats["reconnects"] == 1
    assert all(s["gaps"] == 1 for s in stats["subscriptions"])
    await subscriber.close()
    await publisher.close()
    await broker.close()
    with pytest.raises(SubscriptionClosed, match="the broker closed"):
        await local.get()


@clocked
async def test_a_slow_subscriber_keeps_its_place_and_what_was_in_flight_is_counted(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel, reconnect=fast_backoff)
    client = await memory.connect(BrokerClient, channel, reconnect=fast_backoff)
    sub = await client.subscribe("news", buffer=2)  # reads nothing until after the restart
    for i in range(10):
        await client.publish("news", b"%d" % i)
    # Two forwards answered, four held by the full buffer (the window), four waiting at the broker.
    await memory.quiet()
    assert sub.pending == 6
    [before] = broker.stats()["subscriptions"]
    assert (before["in_flight"], before["backlog"]) == (4, 4)
    back = resumed(sub)

    memory.restart()
    await back
    await client.when_connected()
    await client.publish("news", b"after")
    # The four held forwards had arrived, but their answers were lost with the line:
    # the broker counts them as lost (at most once, it never resends) and goes on.
    assert [(await sub.get()).payload for _ in range(11)] == [b"%d" % i for i in range(10)] + [b"after"]
    [after] = broker.stats()["subscriptions"]
    assert after["lost"] == broker.stats()["lost"] == 4 and after["dropped"] == 0
    assert after["gaps"] == 1 and sub.gaps == 1
    await client.close()
    await broker.close()


@ensure
async def test_a_restarted_broker_service_gets_its_subscriptions_back_from_the_clients():
    old = BrokerService("tcp:0:interface=127.0.0.1", broker_channel=uuid.uuid4())
    old.startService()
    await within(old.whenReady())
    number = old.server.port.getHost().port
    address = f"127.0.0.1:{number}"
    subscriber = await BrokerClient.connect(address, old.broker_channel, reconnect=fast_backoff)
    sub = await subscriber.subscribe("news")
    publisher = await BrokerClient.connect(address, old.broker_channel, reconnect=fast_backoff)
    await publisher.publish("news", b"before")
    assert (await within(sub.get())).payload == b"before"
    back = resumed(sub)

    await crash(old.factory, old.server.port)  # router and broker die together
    old.server.port = None
    fresh = BrokerService(f"tcp:{number}:interface=127.0.0.1", broker_channel=old.broker_channel)
    fresh.startService()
    broker = await within(fresh.whenReady())
    assert await within(back) is sub  # re-announced to a broker that had never heard of it
    assert broker.stats()["topics"] == {"news": 1}

    await within(publisher.when_connected())
    await publisher.publish("news", b"after")
    assert (await within(sub.get())).payload == b"after"
    assert sub.gaps == 1 and not sub.closed
    await subscriber.close()
    await publisher.close()
    await fresh.stopService()
    await old.stopService()


@clocked
async def test_a_subscription_ends_when_no_broker_takes_it_back(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)  # no reconnect: gone for good with the server
    subscriber = await memory.connect(BrokerClient, channel, reconnect=fast_backoff)
    subscriber.resubscribe_patience = 0.3
    sub = await subscriber.subscribe("news")

    memory.restart()
    with pytest.raises(SubscriptionClosed, match="resubscribe failed: no broker on channel"):
        await sub.get()
    assert sub.gaps == 1 and subscriber.subscriptions == []
    await sub.provider.when_lost()  # its connection is closed, not left retrying
    with pytest.raises(ConnectionLostError, match="the broker lost its connection"):
        await broker.publish("news", b"nobody")
    await subscriber.close()


@clocked
async def test_the_broker_drops_a_subscriber_that_does_not_come_back(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel, reconnect=fast_backoff, rejoin_patience=0.3)
    subscriber = await memory.connect(BrokerClient, channel)  # no reconnect: its subscription dies with the line
    sub = await subscriber.subscribe("news")
    assert broker.stats()["topics"] == {"news": 1}

    memory.restart()
    with pytest.raises(SubscriptionClosed, match="connection to the server lost"):
        await sub.get()
    [outlet] = broker.fanout.outlets.values()
    await outlet.consumer.when_lost()  # its forwarding connection back, then closed for good
    stats = broker.stats()
    assert stats["topics"] == {} and stats["subscriptions"] == [] and stats["reconnects"] == 1
    await broker.close()


@ensure
async def test_a_graceful_broker_stop_still_ends_reconnecting_subscriptions():
    service = BrokerService("tcp:0:interface=127.0.0.1", broker_channel=uuid.uuid4())
    service.startService()
    await within(service.whenReady())
    address = f"127.0.0.1:{service.server.port.getHost().port}"
    client = await BrokerClient.connect(address, service.broker_channel, reconnect=fast_backoff)
    sub = await client.subscribe("news")

    await within(service.stopService())  # an end, announced with $pulsyflux/closed, not a gap
    with pytest.raises(SubscriptionClosed, match="the broker closed"):
        await within(sub.get())
    assert sub.gaps == 0 and client.subscriptions == []
    await within(sub.provider.when_lost())  # closed for good, not retrying
    await client.close()
