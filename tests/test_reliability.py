"""Flow control, faults, reconnects and graceful shutdown over real TCP on 127.0.0.1."""

from __future__ import annotations

import os
import uuid

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Protocol

from pulsyflux import ConnectionLostError, Consumer, NoProviderError, Provider, ServerOverloaded
from pulsyflux._twisted_compat import unsent_bytes
from pulsyflux.server import ServerFactory
from pulsyflux.service import ServerService
from pulsyflux.testing import hang, reset
from pulsyflux.wire import codec
from pulsyflux.wire.codec import FrameDecoder

from .helpers import clocked, eventually, within_turns
from .wire import register_frames, request_frames

ensure = pytest_twisted.ensureDeferred

MiB = 1 << 20


async def registered(server, role: int, channel: uuid.UUID, client_id: uuid.UUID):
    """The server-side connection of a client, once its registration has arrived."""
    key = (role, channel.bytes, client_id.bytes)
    await eventually(lambda: key in server.registry)
    return server.registry[key]


def server_buffered(server) -> int:
    """Bytes the server process holds for its connections: unsent output and partial input frames."""
    total = 0
    for conn in server.factory.router.connections:
        total += unsent_bytes(conn.transport) + conn.decoder.buffered
    return total


class Sink(Protocol):
    """A raw consumer that collects one response without keeping the raw stream."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self.chunks: list[bytes] = []
        self.types: list[int] = []
        self.done: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        for frame in self.decoder.feed(data):
            self.types.append(frame.type)
            if frame.type == codec.RESPONSE_CHUNK:
                self.chunks.append(frame.payload)
            elif frame.type in (codec.RESPONSE_END, codec.ERROR) and not self.done.called:
                self.done.callback(frame.type)


async def connect_sink(server) -> Sink:
    return await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server.port), Sink())


async def other_channel_round_trips(server, count: int = 20) -> None:
    """``count`` 64 KiB round trips on a fresh channel, each within its own timeout.

    Callers check that the held connection is still held afterwards: these
    went through beside it, not after it was released. (Over TCP; in memory
    a 24 MiB write arrives in one read, so flow control is tested here.)
    """
    channel = uuid.uuid4()
    provider = await Provider.connect(server.address, channel, handler=lambda data: data)
    consumer = await Consumer.connect(server.address, channel)
    payload = os.urandom(65536)
    for _ in range(count):
        assert await consumer.send(payload, timeout=5) == payload
    await consumer.close()
    await provider.close()


def assert_nothing_held(server) -> None:
    for conn in server.factory.router.connections:
        assert not conn.flow.paused and not conn.flow.held and not conn.flow.blocked_by


@ensure
async def test_consumer_that_stops_reading_pauses_its_provider_only(server, channel):
    body = os.urandom(MiB) * 24
    provider = await Provider.connect(server.address, channel, handler=lambda data: body)
    sink = await connect_sink(server)
    client_id, rid = os.urandom(16), os.urandom(16)
    sink.transport.write(register_frames(codec.ROLE_CONSUMER, client_id, channel.bytes))
    sink.transport.pauseProducing()  # this consumer stops reading
    sink.transport.write(request_frames(rid, client_id, channel.bytes, b"big please", timeout_ms=30000))

    provider_conn = await registered(server, codec.ROLE_PROVIDER, channel, provider.client_id)
    await eventually(lambda: provider_conn.flow.reading_paused)
    peak = server_buffered(server)
    # Another channel is not held up; and these round trips are the time the provider's
    # response (all written out on its side already) would pile up in the server, were it not paused.
    await other_channel_round_trips(server)
    peak = max(peak, server_buffered(server))
    assert provider_conn.flow.reading_paused  # still held: the consumer reads nothing
    assert peak < 4 * MiB  # the 24 MiB response waits in the provider, not in the server

    sink.transport.resumeProducing()
    assert await sink.done == codec.RESPONSE_END
    assert sink.types[0] == codec.RESPONSE_START
    assert b"".join(sink.chunks) == body  # nothing dropped, nothing reordered
    assert_nothing_held(server)
    sink.transport.loseConnection()
    await provider.close()


@ensure
async def test_provider_that_stops_reading_pauses_the_consumer_feeding_it(server, channel):
    body = os.urandom(MiB) * 24
    provider = await Provider.connect(server.address, channel)
    consumer = await Consumer.connect(server.address, channel)
    resume = hang(provider)  # this provider stops reading
    reply = consumer.send(body, timeout=30)

    consumer_conn = await registered(server, codec.ROLE_CONSUMER, channel, consumer.client_id)
    await eventually(lambda: consumer_conn.flow.reading_paused)
    peak = server_buffered(server)
    await other_channel_round_trips(server)  # another channel is not held up
    peak = max(peak, server_buffered(server))
    assert consumer_conn.flow.reading_paused  # still held while the other channel went through
    assert peak < 4 * MiB

    resume()
    request = await provider.receive()
    assert request.payload == body
    provider.respond(request, b"got it")
    assert await reply == b"got it"
    assert_nothing_held(server)
    await consumer.close()
    await provider.close()


async def started_service(grace: float) -> tuple[ServerService, str]:
    service = ServerService("tcp:0:interface=127.0.0.1", reactor, grace=grace)
    service.startService()
    port = await service.whenListening()
    return service, f"127.0.0.1:{port.getHost().port}"


@ensure
async def test_graceful_shutdown_lets_requests_in_flight_finish(channel):
    service, address = await started_service(grace=10.0)
    provider = await Provider.connect(address, channel)
    consumer = await Consumer.connect(address, channel)
    reply = consumer.send(b"in flight", timeout=10)
    request = await provider.receive()

    stopped = service.stopService()
    done: list[bool] = []
    stopped.addBoth(lambda result: (done.append(True), result)[1])
    await eventually(lambda: service.factory.router.draining)
    with pytest.raises(ConnectError):
        await Consumer.connect(address, channel)  # no longer accepting
    with pytest.raises(ServerOverloaded, match="shutting down"):
        await consumer.send(b"new work")  # no new requests
    assert not done

    provider.respond(request, b"finished")
    assert await reply == b"finished"
    await stopped  # closes once nothing is in flight, well before the grace period
    assert service.factory.router.connections == set()
    await consumer.when_lost()
    await provider.when_lost()


@clocked
async def test_graceful_shutdown_closes_after_the_grace_period(memory, channel):
    service = ServerService("tcp:0:interface=127.0.0.1", memory.clock, factory=memory.factory, grace=0.3)
    service.startService()
    await service.whenListening()
    provider = await memory.connect(Provider, channel)
    consumer = await memory.connect(Consumer, channel)
    reply = consumer.send(b"never answered", timeout=10)
    await provider.receive()
    started = memory.now()
    await service.stopService()
    assert memory.now() - started == 0.3  # the grace period, then closed at once
    with pytest.raises(ServerOverloaded, match="shutting down"):
        await reply
    assert service.factory.router.connections == set()


@clocked
async def test_provider_killed_abruptly_fails_the_consumer_at_once(memory, channel):
    provider = await memory.connect(Provider, channel)
    consumer = await memory.connect(Consumer, channel)
    reply = consumer.send(b"work", timeout=30)
    await provider.receive()
    reset(provider)  # from the client's end, as when its process dies
    with pytest.raises(NoProviderError):
        await reply
    assert memory.now() == 0  # at once: no timer ran
    assert memory.factory.router.requests == {}
    await consumer.close()


def fast_backoff(attempt: int) -> float:
    return 0.05


async def restart(factory: ServerFactory, port, number: int):
    """Stop listening, drop every connection, listen again on the same port with a fresh server."""
    gone = DeferredList([conn.closed() for conn in list(factory.router.connections)])
    await port.stopListening()
    for conn in list(factory.router.connections):
        conn.transport.abortConnection()
    await gone
    fresh = ServerFactory(reactor)
    return fresh, reactor.listenTCP(number, fresh, interface="127.0.0.1")


@ensure
async def test_clients_reconnect_and_traffic_resumes_after_a_server_restart(channel):
    factory = ServerFactory(reactor)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    number = port.getHost().port
    address = f"127.0.0.1:{number}"
    providers = [
        await Provider.connect(address, channel, handler=lambda data: b"p:" + data, reconnect=True) for _ in range(2)
    ]
    consumers = [await Consumer.connect(address, channel, reconnect=fast_backoff) for _ in range(3)]
    back = [Deferred() for _ in providers + consumers]
    for client, d in zip(providers + consumers, back):
        client.on_reconnect(lambda c, d=d: d.callback(c))
    a_provider_back: Deferred = Deferred()
    for provider in providers:
        provider.on_reconnect(lambda _: None if a_provider_back.called else a_provider_back.callback(None))

    # A request held by a provider that never answers, in flight when the server goes.
    stuck_channel = uuid.uuid4()
    silent = await Provider.connect(address, stuck_channel, reconnect=True)
    asker = await Consumer.connect(address, stuck_channel, reconnect=fast_backoff)
    stuck = asker.send(b"hold", timeout=30)
    await silent.receive()
    quitter = await Consumer.connect(address, channel, reconnect=lambda attempt: 0.2)

    counts = {"ok": 0, "lost": 0, "no provider": 0}
    running = [True]

    async def traffic(consumer: Consumer) -> None:
        i = 0
        while running[0]:
            i += 1
            try:
                assert await consumer.send(b"%d" % i, timeout=5) == b"p:%d" % i
                counts["ok"] += 1
            except ConnectionLostError:
                counts["lost"] += 1
                await consumer.when_connected()
            except NoProviderError:  # consumers may be back before providers
                counts["no provider"] += 1
                await a_provider_back

    loops = [Deferred.fromCoroutine(traffic(c)) for c in consumers]
    await eventually(lambda: counts["ok"] >= 30)

    factory, port = await restart(factory, port, number)
    with pytest.raises(ConnectionLostError):
        await within_turns(stuck)  # in flight at the moment of loss: fails at once, never hangs
    with pytest.raises(ConnectionLostError, match="reconnecting"):
        await quitter.send(b"while down")  # no line: fails at once
    await quitter.close()  # closing for good stops the retries
    await quitter.when_lost()

    assert [c.client_id for c in await gatherResults(back)] == [c.client_id for c in providers + consumers]
    before = counts["ok"]
    await eventually(lambda: counts["ok"] >= before + 30)  # traffic resumed on the new server
    running[0] = False
    await gatherResults(loops)
    # Closing cancelled the quitter's retry: no timer of it is left to fire.
    assert not quitter.reconnecting
    assert not [call for call in reactor.getDelayedCalls() if getattr(call.func, "__self__", None) is quitter]
    assert counts["lost"] >= 1  # the restart was seen, and survived
    assert all(c.reconnects == 1 for c in providers + consumers)
    assert quitter.reconnects == 0 and not quitter.connected
    for client in providers + consumers + [silent, asker]:
        await client.close()
    await port.stopListening()


def test_twistd_grace_option_reaches_the_server_service():
    from pulsyflux.service import Options, makeService

    options = Options()
    options.parseOptions(["--port", "0", "--grace", "2.5", "--no-broker"])
    assert makeService(options).server.grace == 2.5
    options = Options()
    options.parseOptions(["--port", "0"])
    assert makeService(options).server.grace == 10.0


@ensure
async def test_a_provider_closed_while_reconnecting_fails_receive_instead_of_waiting(channel):
    factory = ServerFactory(reactor)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    number = port.getHost().port
    provider = await Provider.connect(f"127.0.0.1:{number}", channel, reconnect=lambda attempt: 5.0)
    gone = DeferredList([conn.closed() for conn in list(factory.router.connections)])
    await port.stopListening()
    for conn in list(factory.router.connections):
        conn.transport.abortConnection()
    await gone
    await eventually(lambda: provider.reconnecting)
    await provider.close()  # closed for good between two attempts
    assert not provider.reconnecting
    with pytest.raises(ConnectionLostError):
        await provider.receive().addTimeout(2, reactor)
