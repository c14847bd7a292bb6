"""pulsyflux.testing under pytest-twisted: the fixture, and a clean teardown."""

from __future__ import annotations

import pytest
import pytest_twisted
import treq
from twisted.internet import error, reactor

from pulsyflux import Consumer, Provider
from pulsyflux.testing import start_server

ensure = pytest_twisted.ensureDeferred


@ensure
async def test_the_fixture_serves_requests(pulsyflux_server, pulsyflux_channel):
    provider = await Provider.connect(pulsyflux_server.address, pulsyflux_channel, handler=lambda data: data * 2)
    consumer = await Consumer.connect(pulsyflux_server.address, pulsyflux_channel)
    before = pulsyflux_server.stats.requests_routed
    assert await consumer.send(b"ab") == b"abab"
    assert pulsyflux_server.stats.requests_routed == before + 1
    assert pulsyflux_server.address == f"127.0.0.1:{pulsyflux_server.port}"
    await consumer.close()
    await provider.close()


@ensure
async def test_stop_closes_everything_even_clients_left_open():
    readers_before = set(reactor.getReaders())
    server = await start_server(http=True)
    forgotten = await Consumer.connect(server.address, "6c2d1c5a-6d9b-4a53-9a4e-4d0f6b1f3e11")
    response = await treq.get(server.http_url + "/healthz")  # a pooled keep-alive HTTP connection
    assert response.code == 200
    await response.content()

    await server.stop()
    assert not forgotten.connected
    await forgotten.when_lost()
    assert set(reactor.getReaders()) == readers_before  # no listener, no connection left behind
    with pytest.raises(error.ConnectionRefusedError):
        await Consumer.connect(server.address, "6c2d1c5a-6d9b-4a53-9a4e-4d0f6b1f3e11")
    await server.stop()  # twice is fine


@ensure
async def test_drop_resets_one_client_over_tcp(pulsyflux_server, pulsyflux_channel):
    address = pulsyflux_server.address
    provider = await Provider.connect(address, pulsyflux_channel, handler=bytes.upper)
    consumer = await Consumer.connect(address, pulsyflux_channel)
    assert await consumer.send(b"x") == b"X"
    lost = provider.when_lost()
    before = len(pulsyflux_server.connections)
    await pulsyflux_server.drop(provider)
    await lost
    assert len(pulsyflux_server.connections) == before - 1
    assert consumer.connected  # only that one
    [conn] = [c for c in pulsyflux_server.connections if not c.trusted]  # the broker's link is trusted
    lost = consumer.when_lost()
    await pulsyflux_server.drop(conn)  # the server's own end works too
    await lost
    await consumer.close()


def test_the_plugin_is_registered_for_users(request, pulsyflux_memory_server, pulsyflux_channel):
    """A user's own test file gets the fixtures without importing anything.

    pytest loads ``pulsyflux.pytest_plugin`` through its ``pytest11`` entry
    point, as it did for this very session (nothing here names it: no
    ``-p``, no ``pytest_plugins``), and its fixtures come with it.
    """
    from importlib.metadata import distribution

    import pulsyflux.pytest_plugin as plugin

    # The distribution's own entry points: entry_points(group=...) needs Python 3.10 (CI runs PyPy 3.9 too).
    eps = distribution("pulsyflux").entry_points
    [entry] = [ep for ep in eps if ep.group == "pytest11" and ep.name == "pulsyflux"]
    assert entry.load() is plugin
    assert request.config.pluginmanager.get_plugin("pulsyflux") is plugin
    assert pulsyflux_memory_server.run(pulsyflux_memory_server.connect(Consumer, pulsyflux_channel)).connected


@ensure
async def test_the_servers_own_broker_is_the_same_everywhere():
    # BrokerService, start_server and MemoryServer run their server's own broker through one
    # function: the channel reserved, linked in-process, the in-process setup cap (once 64 in two of them).
    from pulsyflux.broker import DEFAULT_BROKER_CHANNEL
    from pulsyflux.service import INPROC_MAX_SETUPS, BrokerService
    from pulsyflux.testing import MemoryServer

    memory = MemoryServer()
    tcp = await start_server()
    service = BrokerService("tcp:0:interface=127.0.0.1", reactor=reactor)
    service.startService()
    try:
        own = await service.whenReady()
        for server, broker in ((memory, memory.broker), (tcp, tcp.broker), (service, own)):
            assert DEFAULT_BROKER_CHANNEL.bytes in server.factory.router.reserved
            assert broker.fanout.max_setups == INPROC_MAX_SETUPS
    finally:
        await service.stopService()
        await tcp.stop()
        memory.close()
