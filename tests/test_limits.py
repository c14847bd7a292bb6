"""The server's configurable limits, each over real TCP on 127.0.0.1."""

from __future__ import annotations

import os

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults

from pulsyflux import ConnectionLostError, Consumer, Provider, ServerOverloaded
from pulsyflux.server import ServerFactory

from .helpers import eventually

ensure = pytest_twisted.ensureDeferred

MiB = 1 << 20


def test_defaults_are_the_documented_ones():
    router = ServerFactory(reactor).router
    assert (router.max_body, router.max_in_flight, router.max_connections) == (64 * MiB, 10_000, 10_000)


@ensure
async def test_request_body_over_the_limit_fails_and_is_freed_on_both_sides(limited, channel):
    server = limited(max_body=2 * MiB)
    provider = await Provider.connect(server.address, channel)
    consumer = await Consumer.connect(server.address, channel)
    with pytest.raises(ServerOverloaded, match="^request too large"):
        await consumer.send(os.urandom(MiB) * 3, timeout=10)  # two 1 MiB chunks pass, the third does not
    assert server.factory.router.requests == {}
    assert consumer.pending == 0

    exactly = os.urandom(2 * MiB)  # at the limit is allowed
    reply = consumer.send(exactly, timeout=10)
    request = await provider.receive()  # the first request the provider ever sees
    assert request.payload == exactly
    assert provider.incomplete == 0  # the ERROR, sent before this request, freed the partial one
    provider.respond(request, b"fits")
    assert await reply == b"fits"
    await consumer.close()
    await provider.close()


@ensure
async def test_response_body_over_the_limit_fails_the_request(limited, channel):
    server = limited(max_body=2 * MiB)
    big = os.urandom(MiB) * 3
    provider = await Provider.connect(server.address, channel, handler=lambda data: big if data == b"big" else data)
    consumer = await Consumer.connect(server.address, channel)
    with pytest.raises(ServerOverloaded, match="^response too large"):
        await consumer.send(b"big", timeout=10)
    assert server.factory.router.requests == {}
    assert consumer.pending == 0
    assert await consumer.send(b"small") == b"small"  # the rest of the big response was dropped
    await consumer.close()
    await provider.close()


@ensure
async def test_requests_in_flight_per_connection(limited, channel):
    server = limited(max_in_flight=3)
    provider = await Provider.connect(server.address, channel)
    consumer = await Consumer.connect(server.address, channel)
    replies = [consumer.send(b"%d" % i) for i in range(3)]
    with pytest.raises(ServerOverloaded, match="^server overloaded: more than 3 requests in flight"):
        await consumer.send(b"one too many")
    other = await Consumer.connect(server.address, channel)  # the limit is per connection
    other_reply = other.send(b"other")
    for _ in range(4):
        request = await provider.receive()
        provider.respond(request, request.payload)
    assert await gatherResults(replies) == [b"0", b"1", b"2"]
    assert await other_reply == b"other"
    again = consumer.send(b"room again")  # answered requests free their places
    request = await provider.receive()
    provider.respond(request, request.payload)
    assert await again == b"room again"
    await consumer.close()
    await other.close()
    await provider.close()


@ensure
async def test_connections(limited, channel):
    server = limited(max_connections=3)
    provider = await Provider.connect(server.address, channel, handler=lambda data: data)
    first = await Consumer.connect(server.address, channel)
    second = await Consumer.connect(server.address, channel)
    refused = await Consumer.connect(server.address, channel)
    with pytest.raises(ConnectionLostError, match="server overloaded: more than 3 connections"):
        await refused.send(b"x")
    assert await first.send(b"still served") == b"still served"
    with pytest.raises(ConnectionLostError, match="server overloaded"):
        await Provider.connect(server.address, channel)

    await first.close()
    await eventually(lambda: len(server.factory.router.connections) == 2)
    again = await Consumer.connect(server.address, channel)
    assert await again.send(b"room again") == b"room again"
    for client in (second, again, refused, provider):
        await client.close()
