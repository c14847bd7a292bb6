"""pulsyflux.testing.MemoryServer: server and clients in memory, time on a clock that moves only when told."""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred

from pulsyflux import Broker, BrokerClient, ConnectionLostError, Consumer, Provider, RequestTimeout, ServerOverloaded
from pulsyflux.testing import MemoryServer, hang, reset
from pulsyflux.wire import codec

from .helpers import clocked, later


@clocked
async def test_a_round_trip_takes_no_time_on_the_clock(memory, channel):
    provider = await memory.connect(Provider, channel, handler=bytes.upper)
    consumer = await memory.connect(Consumer, channel)
    assert await consumer.send(b"hi") == b"HI"
    assert memory.now() == 0
    assert memory.stats.requests_routed == 1
    assert {str(conn.transport.getPeer()) for conn in memory.connections} == {"inproc:memory#1", "inproc:memory#2"}
    await consumer.close()
    await provider.close()


@clocked
async def test_run_jumps_the_clock_to_the_next_timer(memory, channel):
    provider = await memory.connect(Provider, channel, handler=lambda data: later(30.0, b"late", memory.clock))
    consumer = await memory.connect(Consumer, channel)
    with pytest.raises(RequestTimeout):
        await consumer.send(b"slow", timeout=2.5)
    assert memory.now() == 2.5  # exactly the timeout, however loaded the machine
    assert await consumer.send(b"again", timeout=60) == b"late"
    assert memory.now() == 32.5
    await consumer.close()
    await provider.close()


def test_advance_runs_each_timer_at_its_own_time(memory):
    seen = []
    for delay in (3.0, 1.0, 2.0):
        memory.clock.callLater(delay, lambda d=delay: seen.append((d, memory.now())))
    memory.clock.callLater(0, lambda: memory.clock.callLater(0.5, lambda: seen.append((0.5, memory.now()))))
    memory.advance(2.5)
    assert seen == [(0.5, 0.5), (1.0, 1.0), (2.0, 2.0)]
    assert memory.now() == 2.5
    memory.advance(10)
    assert seen[-1] == (3.0, 3.0) and memory.now() == 12.5
    with pytest.raises(ValueError):
        memory.advance(-1)


def test_run_fails_at_once_on_what_can_never_fire(memory):
    with pytest.raises(AssertionError, match="never comes"):
        memory.run(Deferred())
    with pytest.raises(AssertionError, match="after 60 seconds"):
        memory.run(later(61, clock=memory.clock), timeout=60)


def test_run_raises_the_error_it_ends_with(memory, channel):
    consumer = memory.run(memory.connect(Consumer, channel))
    with pytest.raises(Exception, match="peer disappeared"):
        memory.run(consumer.send(b"nobody there"))
    assert memory.now() == 0


@clocked
async def test_drop_cuts_a_client_and_the_server_lets_go(memory, channel):
    provider = await memory.connect(Provider, channel, handler=bytes.upper)
    consumer = await memory.connect(Consumer, channel)
    reply = consumer.send(b"x")
    memory.drop(provider)  # before the request reaches it
    assert not provider.connected
    with pytest.raises(Exception, match="peer disappeared"):
        await reply
    assert len(memory.registry) == 1
    gone = consumer.when_lost()
    [conn] = memory.connections
    assert memory.drop(conn).called  # the server's own end works too
    await gone
    with pytest.raises(ConnectionLostError):
        await consumer.send(b"y")
    assert memory.registry == {}
    with pytest.raises(ValueError, match="not connected|no connection"):
        memory.drop(consumer)


def test_memory_clients_are_strangers_and_the_limits_apply(channel):
    server = MemoryServer(broker=False, max_body=100)
    provider = server.run(server.connect(Provider, channel, handler=bytes.upper))
    consumer = server.run(server.connect(Consumer, channel))
    assert not any(conn.trusted for conn in server.connections)
    with pytest.raises(ServerOverloaded, match="too large"):
        server.run(consumer.send(b"x" * 101))
    assert server.run(consumer.send(b"x" * 100)) == b"X" * 100
    server.close()
    assert not provider.connected and not consumer.connected


def test_the_broker_runs_beside_it_and_heartbeats_cost_nothing():
    server = MemoryServer()
    assert server.broker is not None and server.broker_channel is not None
    subscriber = server.run(server.connect(BrokerClient, heartbeat=5.0))
    publisher = server.run(server.connect(BrokerClient))
    sub = server.run(subscriber.subscribe("orders"))
    server.advance(3600)  # an hour of heartbeats
    assert not sub.closed
    server.run(publisher.publish("orders", b"42", {"k": "v"}))
    message = server.run(sub.get())
    assert (message.topic, message.payload, message.headers) == ("orders", b"42", {"k": "v"})
    server.run(publisher.close())
    server.run(subscriber.close())
    server.close()
    assert server.connections == [] and server.clock.getDelayedCalls() == []


def test_close_ends_every_connection_and_leaves_no_timer(channel):
    server = MemoryServer(broker=False)
    consumer = server.run(server.connect(Consumer, channel))
    server.close()
    assert server.connections == [] and not consumer.connected
    assert server.clock.getDelayedCalls() == []


def test_the_plugin_fixture(pulsyflux_memory_server, pulsyflux_channel):
    server = pulsyflux_memory_server
    provider = server.run(server.connect(Provider, pulsyflux_channel, handler=lambda data: data * 2))
    consumer = server.run(server.connect(Consumer, pulsyflux_channel))
    assert server.run(consumer.send(b"ab")) == b"abab"
    assert server.broker is not None
    server.run(consumer.close())
    server.run(provider.close())


def test_drop_refuses_what_is_no_connection():
    with pytest.raises(ValueError):
        MemoryServer(broker=False).drop(object())


@clocked
async def test_quiet_fires_once_everything_due_now_has_run(memory, channel):
    provider = await memory.connect(Provider, channel, handler=bytes.upper)
    consumer = await memory.connect(Consumer, channel)
    consumer.send(b"x")
    assert memory.stats.requests_routed == 0  # not delivered yet: that takes reactor turns
    memory.clock.callLater(1.0, lambda: None)
    await memory.quiet()
    assert memory.stats.requests_routed == 1 and memory.now() == 0
    await consumer.close()
    await provider.close()


def test_restart_resets_everyone_and_reconnecting_clients_come_back(channel):
    server = MemoryServer()
    old_factory, old_broker = server.factory, server.broker
    provider = server.run(server.connect(Provider, channel, handler=bytes.upper, reconnect=lambda attempt: 2.0))
    consumer = server.run(server.connect(Consumer, channel, reconnect=lambda attempt: 2.0))
    plain = server.run(server.connect(Consumer, channel))
    server.restart()
    assert server.factory is not old_factory and old_factory.router.connections == set()
    assert old_broker.closed and server.broker is not old_broker and not server.broker.closed
    assert not plain.connected and not consumer.connected
    assert [key for key in server.registry if key[1] == channel.bytes] == []  # only the new broker is known
    server.run(consumer.when_connected())
    server.run(provider.when_connected())
    assert server.now() == 2.0  # on their own backoff
    assert server.run(consumer.send(b"back")) == b"BACK"
    server.close()


@clocked
async def test_hang_and_reset_inject_a_clients_faults(memory, channel):
    provider = await memory.connect(Provider, channel, handler=bytes.upper)
    consumer = await memory.connect(Consumer, channel)
    resume = hang(provider)
    with pytest.raises(RequestTimeout):
        await consumer.send(b"anyone?", timeout=3.0)  # the provider is connected but reads nothing
    assert provider.connected and memory.now() == 3.0
    resume()
    assert await consumer.send(b"back") == b"BACK"
    reset(provider)
    await provider.when_lost()
    with pytest.raises(Exception, match="peer disappeared"):
        await consumer.send(b"gone")
    with pytest.raises(ValueError, match="not connected"):
        reset(provider)
    await consumer.close()


@clocked
async def test_until_waits_for_a_state_in_clock_time(memory, channel):
    provider = await memory.connect(Provider, channel, handler=bytes.upper)
    consumer = await memory.connect(Consumer, channel)
    for n in range(3):  # a request every 2 s, on the clock
        memory.clock.callLater(2.0 * (n + 1), consumer.send, b"x")
    await memory.until(lambda: memory.stats.requests_routed == 3)
    assert memory.now() == 6.0  # checked as each timer ran: not before, not after
    assert memory.until(lambda: True).called  # already true: at once
    never = memory.until(lambda: False)
    with pytest.raises(AssertionError, match="never comes"):
        memory.run(never)  # nothing left that could make it true: a deadlock, not a hang
    await consumer.close()
    await provider.close()


def test_faults_of_the_brokers_objects_reach_every_connection_they_hold(channel):
    server = MemoryServer(broker=False)
    broker = server.run(server.connect(Broker, channel))
    client = server.run(server.connect(BrokerClient, channel, heartbeat=None))
    sub = server.run(client.subscribe("news"))
    assert len(server.connections) == 5  # broker: provider, publisher, forwarder; client: consumer, subscription

    resume = hang(broker)  # the broker's process hangs: nothing is answered
    with pytest.raises(RequestTimeout):
        server.run(client.publish("news", b"lost?", timeout=1.0))
    resume()
    server.run(client.publish("news", b"back"))
    while server.run(sub.get()).payload != b"back":  # (the timed-out one may arrive too: read once resumed)
        pass

    reset(sub)  # the subscriber's own connection, and no other
    server.flush()
    assert not [key for key in server.registry if key[1] == sub.channel.bytes and key[0] == codec.ROLE_PROVIDER]
    assert not broker.closed and server.run(client.publish("news", b"still here")) is None

    server.drop(broker)  # the broker's process dies: every connection it held, at once
    assert broker.closed
    reset(client)
    server.flush()
    assert server.connections == []
    with pytest.raises(ValueError, match="not connected"):
        hang(sub)
    server.close()
