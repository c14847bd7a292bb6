"""Orderly ends: what a closing broker's subscribers refuse is counted, and a server's shutdown drains."""

from __future__ import annotations

import base64
import json
import uuid

import pytest
import pytest_twisted
from twisted.application.service import MultiService
from twisted.logger import LogLevel, capturedLogs, formatEvent

from pulsyflux import Broker, BrokerClient, Consumer, Provider, SubscriptionClosed
from pulsyflux.service import BrokerService
from pulsyflux.testing import MemoryServer
from pulsyflux.wire import messages
from pulsyflux.wire.errors import PulsyfluxError, ServerOverloaded

from .helpers import clocked, eventually

ensure = pytest_twisted.ensureDeferred


async def _raw_member(memory, broker_channel, topic, group=None):
    """A subscriber by hand (as a Go provider is): announced, probe answered; it answers nothing else itself."""
    channel = uuid.uuid4()
    provider = await memory.connect(Provider, channel)
    announcer = await memory.connect(Consumer, broker_channel)
    fields = {"group": group} if group is not None else {}
    answer = announcer.send(messages.control(messages.SUBSCRIBE, topic=topic, channel=str(channel), **fields).encode())
    probe = await provider.receive()
    provider.respond(probe, b"ok")
    assert await answer == b"ok"
    return provider, announcer


@clocked
async def test_a_group_members_refusal_while_the_broker_closes_is_counted_lost(memory):
    """Closing, the broker waits for a queue group member's answers; one it refuses has no member to go to."""
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)
    member, announcer = await _raw_member(memory, channel, "jobs", group="g")
    await broker.publish("jobs", b"1")
    forward = await member.receive()  # held: the forward is in flight
    closed = broker.close()
    await memory.quiet()
    assert not closed.called  # it waits for the member's answer (at most 2 s)
    member.respond(forward, error="subscription closed")
    await closed
    assert broker.fanout.lost == 1  # it was neither delivered nor handed to anyone: counted, not silent
    await member.close()
    await announcer.close()


@clocked
async def test_a_refusal_reaching_a_closed_plain_outlet_is_counted_lost(memory):
    """The outlet ended while its forward was on its way, and the subscriber refused it: lost, and counted."""
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)
    subscriber, announcer = await _raw_member(memory, channel, "news")
    await broker.publish("news", b"1")
    forward = await subscriber.receive()
    (outlet,) = broker.fanout.outlets.values()
    outlet.open = False  # as close() leaves it before it cuts the line: ended, its forward still in flight
    subscriber.respond(forward, error="subscription closed")
    await memory.quiet()
    assert (outlet.lost, broker.fanout.lost, outlet.requests) == (1, 1, 0)
    await broker.close()
    await subscriber.close()
    await announcer.close()


@ensure
async def test_stopping_a_broker_service_delivers_what_it_accepted_over_tcp():
    """stopService under a MultiService: the server stops accepting, its broker forwards its backlog to
    a subscriber that reads only now, then closes. Every publish is delivered or refused as shutting down."""
    parent = MultiService()
    service = BrokerService("tcp:0:interface=127.0.0.1", grace=60.0, window=1, batch=1)
    service.setServiceParent(parent)
    parent.startService()
    port = await service.server.whenListening()
    await service.whenReady()
    address = f"127.0.0.1:{port.getHost().port}"
    subscriber = await BrokerClient.connect(address)
    subscription = await subscriber.subscribe("orders", buffer=2)  # unread: the broker keeps a backlog for it
    publisher = await BrokerClient.connect(address)
    outcomes: dict[int, object] = {}
    for n in range(300):
        publisher.publish("orders", str(n).encode()).addBoth(lambda result, n=n: outcomes.__setitem__(n, result))
    await eventually(lambda: service.stats()["backlog_bytes"] > 0 and len(outcomes) == 300, timeout=60)
    stopping = parent.stopService()  # the backlog is not forwarded yet
    for n in range(300, 320):  # sent while the server drains: new work, refused
        publisher.publish("orders", str(n).encode()).addBoth(lambda result, n=n: outcomes.__setitem__(n, result))
    received = []
    while True:
        try:
            received.append(int((await subscription.get()).payload))
        except SubscriptionClosed:
            break
    await stopping
    await eventually(lambda: len(outcomes) == 320, timeout=60)
    accepted = sorted(n for n, result in outcomes.items() if not isinstance(result, Exception) and result is None)
    refused = {n: result for n, result in outcomes.items() if n not in accepted}
    assert accepted == list(range(300)) and received == accepted  # each accepted one delivered, in order
    assert sorted(refused) == list(range(300, 320))
    for result in refused.values():  # refused: they arrived after the server stopped accepting
        error = getattr(result, "value", result)
        assert isinstance(error, ServerOverloaded) and "shutting down" in str(error), repr(error)
    assert service.shutdown_stats == {"finished": True, "requests_failed": 0, "messages_lost": 0}
    await publisher.close(timeout=0)
    await subscriber.close(timeout=0)


def test_a_shutdown_ends_at_the_grace_deadline_when_a_subscriber_never_answers():
    """On the memory harness's clock: a subscriber holds its forward forever; the shutdown does not wait
    past its grace period: the forward fails as shutting down, the backlog is counted lost, one warning."""
    memory = MemoryServer(broker=False)
    service = BrokerService("tcp:0", reactor=memory.clock, factory=memory.factory, grace=5.0, window=1, batch=1)
    service.startService()
    broker = memory.run(service.whenReady())
    subscriber, announcer = memory.run(_raw_member(memory, broker.channel, "news"))
    publisher = memory.run(memory.connect(BrokerClient))
    for n in range(3):
        memory.run(publisher.publish("news", str(n).encode()))  # accepted: one forwarded, two wait
    forward = memory.run(subscriber.receive())  # and never answered
    started = memory.now()
    with capturedLogs() as events:
        memory.run(service.stopService())
    assert memory.now() - started == 5.0  # the grace period, not a second more
    assert service.shutdown_stats == {"finished": False, "requests_failed": 1, "messages_lost": 2}
    warnings = [formatEvent(e) for e in events if e["log_level"] >= LogLevel.warn]
    assert len(warnings) == 1 and "1 request(s) failed with 'server overloaded: shutting down'" in warnings[0]
    assert "lost 2 message(s)" in warnings[0]
    # The broker's consumers closed after the router failed their forwards: its late ERRORs are no news.
    assert not [e for e in events if "server error for request" in formatEvent(e)]
    subscriber.respond(forward, b"ok")  # too late: its line is gone, nothing is sent
    later_publish = publisher.publish("news", b"late")
    memory.flush()
    with pytest.raises(PulsyfluxError):
        memory.run(later_publish)
    memory.run(announcer.close())
    memory.close()


def test_a_broker_kept_from_when_ready_publishes_nothing_new_while_the_service_drains():
    """The broker's own publishing connection is trusted (its forwards must finish), so the server would
    take its publishes during the drain: a publish on a Broker the application kept from whenReady()
    fails at once with 'the server is shutting down'; one sent before stopService is still accepted."""
    memory = MemoryServer(broker=False)
    service = BrokerService("tcp:0", reactor=memory.clock, factory=memory.factory, grace=5.0, window=1, batch=1)
    service.startService()
    broker = memory.run(service.whenReady())
    subscriber, announcer = memory.run(_raw_member(memory, broker.channel, "news"))
    memory.run(broker.publish("news", b"0"))
    first = memory.run(subscriber.receive())  # held: "1" waits in the backlog behind it
    queued = broker.publish("news", b"1")  # sent before the stop, not answered yet
    stopping = service.stopService()
    late = broker.publish("news", b"late")
    with pytest.raises(ConnectionError, match="the server is shutting down"):
        memory.run(late)
    assert memory.run(queued) is None  # accepted (no history)
    subscriber.respond(first, b"ok")
    second = memory.run(subscriber.receive())
    assert json.loads(second.payload)["Payload"] == base64.b64encode(b"1").decode()
    subscriber.respond(second, b"ok")
    memory.run(stopping)
    assert broker.published == 2
    assert service.shutdown_stats == {"finished": True, "requests_failed": 0, "messages_lost": 0}
    memory.run(announcer.close())
    memory.close()


def test_a_broker_service_refuses_new_work_while_it_drains():
    """During the grace period: a new publish from outside gets 'server overloaded: shutting down', one
    through the service fails at once with 'the server is shutting down'; the broker's forwards go on."""
    memory = MemoryServer(broker=False)
    service = BrokerService("tcp:0", reactor=memory.clock, factory=memory.factory, grace=5.0, window=1, batch=1)
    service.startService()
    broker = memory.run(service.whenReady())
    subscriber, announcer = memory.run(_raw_member(memory, broker.channel, "news"))
    publisher = memory.run(memory.connect(BrokerClient))
    memory.run(publisher.publish("news", b"0"))
    memory.run(publisher.publish("news", b"1"))  # waits in the backlog behind the first forward
    first = memory.run(subscriber.receive())
    stopping = service.stopService()
    memory.flush()
    with pytest.raises(ServerOverloaded, match="shutting down"):
        memory.run(publisher.publish("news", b"2"))
    with pytest.raises(ConnectionError, match="the server is shutting down"):
        memory.run(service.publish("news", b"3"))
    subscriber.respond(first, b"ok")
    second = memory.run(subscriber.receive())  # forwarded during the grace period
    assert json.loads(second.payload)["Payload"] == base64.b64encode(b"1").decode()
    subscriber.respond(second, b"ok")
    memory.run(stopping)
    assert memory.now() < 5.0
    assert service.shutdown_stats == {"finished": True, "requests_failed": 0, "messages_lost": 0}
    memory.run(announcer.close())
    memory.close()
