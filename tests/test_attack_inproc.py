"""Issue 8, items 16, 14, 15 (server side) and 1 (recovery): the broker beside the server.

Its link is in-process (:mod:`pulsyflux.server.inproc`), so it works behind TLS;
the server owns its channel (a foreign provider there is refused); only it
may deliver on a subscriber's channel; and it comes back if its link drops.
Attacks run over real TCP (or TLS) on 127.0.0.1; the transport itself is
also tested alone under a ``task.Clock``.
"""

from __future__ import annotations

import uuid

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor, task
from twisted.internet.defer import gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.internet.protocol import Factory, Protocol
from zope.interface.verify import verifyObject

from pulsyflux import (
    Broker,
    BrokerClient,
    BrokerService,
    Consumer,
    NoProviderError,
    PermissionDenied,
    Provider,
)
from pulsyflux.broker import DEFAULT_BROKER_CHANNEL
from pulsyflux.server.inproc import InProcessAddress, InProcessEndpoint, InProcessTransport, connect_in_process
from pulsyflux.wire import codec, messages
from pulsyflux.wire.errors import MSG_CHANNEL_RESERVED

from .helpers import collect_unless_refcounted, eventually, within_turns
from .test_tls import PKI, client
from .wire import RawClient, register_frames

ensure = pytest_twisted.ensureDeferred


@pytest.fixture
def broker_service():
    """Start a BrokerService on a listen description; stopped (and its connections gone) after."""
    services = []

    async def start(listen: str = "tcp:0:interface=127.0.0.1", **options) -> BrokerService:
        svc = BrokerService(listen, reactor=reactor, grace=0, **options)
        services.append(svc)
        svc.startService()
        await svc.whenReady()
        return svc

    yield start
    for svc in services:
        pytest_twisted.blockon(svc.stopService())


def tcp_address(svc: BrokerService) -> str:
    return f"127.0.0.1:{svc.server.port.getHost().port}"


async def pubsub_round_trip(address, topic: str = "orders") -> None:
    subscriber = await BrokerClient.connect(address, reactor=reactor, heartbeat=None)
    publisher = await BrokerClient.connect(address, reactor=reactor, heartbeat=None)
    try:
        sub = await subscriber.subscribe(topic)
        await publisher.publish(topic, b"over tls", {"k": "v"})
        msg = await sub.get()
        assert (msg.topic, msg.payload, msg.headers) == (topic, b"over tls", {"k": "v"})
    finally:
        await publisher.close()
        await subscriber.close()


# -- item 16: the built-in broker behind TLS ----------------------------------------


@ensure
async def test_attack_broker_starts_behind_ssl_endpoint(tmp_path, broker_service):
    pki = PKI(tmp_path)
    svc = await broker_service(f"ssl:0:interface=127.0.0.1:privateKey={pki.server_key}:certKey={pki.server_cert}")
    assert not svc.broker.closed
    await pubsub_round_trip(client(svc.server.port.getHost().port, pki.ca_dir))


@ensure
async def test_attack_broker_starts_behind_mtls_endpoint(tmp_path, broker_service):
    pki = PKI(tmp_path)
    svc = await broker_service(
        f"mtls:0:privateKey={pki.server_key}:certKey={pki.server_cert}:caCerts={pki.ca_file}:interface=127.0.0.1"
    )
    port = svc.server.port.getHost().port
    await pubsub_round_trip(client(port, pki.ca_dir, pki.client_key, pki.client_cert))


@ensure
async def test_broker_links_are_in_process_and_trusted(broker_service):
    svc = await broker_service()
    sub = await svc.subscribe("local")  # 2 + 2 connections, none over a socket
    trusted = [conn for conn in svc.factory.router.connections if conn.trusted]
    assert len(trusted) == 4
    assert all(isinstance(conn.transport, InProcessTransport) for conn in trusted)
    await svc.publish("local", b"x")
    assert (await sub.get()).payload == b"x"


# -- item 14: the broker channel cannot be hijacked ----------------------------------


@ensure
async def test_attack_foreign_provider_on_broker_channel_is_refused(broker_service):
    svc = await broker_service()
    address = tcp_address(svc)
    stolen = []
    with pytest.raises(PermissionDenied, match="^channel reserved: the server's own broker serves it$"):
        await Provider.connect(address, DEFAULT_BROKER_CHANNEL, handler=lambda body: stolen.append(body) or b"ok")

    subscriber = await BrokerClient.connect(address, heartbeat=None)
    publisher = await BrokerClient.connect(address, heartbeat=None)
    sub = await subscriber.subscribe("payments")
    for i in range(20):
        await publisher.publish("payments", str(i).encode())
    received = [(await sub.get()).payload for _ in range(20)]
    assert received == [str(i).encode() for i in range(20)]
    assert stolen == []
    assert svc.broker.published == 20
    await publisher.close()
    await subscriber.close()


@ensure
async def test_attack_second_broker_on_the_broker_channel_fails_clearly(broker_service):
    svc = await broker_service()
    with pytest.raises(PermissionDenied, match="channel reserved"):
        await Broker.connect(tcp_address(svc), DEFAULT_BROKER_CHANNEL)
    await svc.publish("still", b"mine")  # the real one still serves
    assert svc.broker.published == 1


@ensure
async def test_attack_reconnecting_thief_is_refused_once_and_does_not_retry(broker_service):
    svc = await broker_service()
    thief = Provider(DEFAULT_BROKER_CHANNEL)
    with pytest.raises(PermissionDenied):
        await thief.open(tcp_address(svc), reconnect=True)
    await thief.when_lost()
    assert not thief.reconnecting and isinstance(thief.closed_reason, PermissionDenied)  # for good: no retry loop
    with pytest.raises(PermissionDenied):
        await thief.receive()  # says why, ever after


@ensure
async def test_attack_raw_provider_on_broker_channel_gets_error_then_close(broker_service):
    """What a Go broker.NewBroker sees: one ERROR naming the refusal, then the connection closes."""
    svc = await broker_service()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", svc.server.port.getHost().port)
    raw = await connectProtocol(endpoint, RawClient())
    request_id = uuid.uuid4().bytes
    raw.send(
        register_frames(codec.ROLE_PROVIDER, uuid.uuid4().bytes, DEFAULT_BROKER_CHANNEL.bytes, request_id),
        codec.encode_frame(codec.PROBE, request_id),
    )
    await raw.lost
    assert len(raw.frames) == 1  # the refusal only: the probe after it was never routed
    (frame,) = raw.frames
    assert (frame.type, frame.request_id) == (codec.ERROR, request_id)
    assert codec.error_message(frame.payload) == MSG_CHANNEL_RESERVED
    assert not any(
        key[1] == DEFAULT_BROKER_CHANNEL.bytes and not conn.trusted for key, conn in svc.factory.registry.items()
    )


@ensure
async def test_publishers_on_the_broker_channel_stay_allowed(broker_service):
    svc = await broker_service()
    consumer = await Consumer.connect(tcp_address(svc), DEFAULT_BROKER_CHANNEL)
    body = messages.encode_batch([messages.encode_text("raw", b"payload", None)])
    assert await consumer.send(body) == b"ok"
    assert svc.broker.published == 1
    await consumer.close()


@ensure
async def test_attack_publish_burst_does_not_cut_the_broker_link(broker_service):
    """Many publishers at once: the broker's link is never closed as a slow reader.

    In-process, the broker takes everything on the next reactor turn, with no
    kernel buffer in between; a burst past ``max_unsent`` in one turn must not
    end pub/sub for everyone (over TCP, main cut the broker's provider here).
    """
    svc = await broker_service()
    svc.factory.router.flow_control.max_unsent = 64 * 1024  # small, so a modest burst passes it
    address = tcp_address(svc)
    publishers = [await Consumer.connect(address, DEFAULT_BROKER_CHANNEL) for _ in range(30)]
    body = messages.encode_batch([messages.encode_text("burst", b"x" * 150_000, None)])
    answers = await gatherResults([p.send(body, timeout=10) for p in publishers])
    assert answers == [b"ok"] * 30
    assert svc.factory.stats.slow_consumers == 0 and not svc.broker.closed
    await gatherResults([p.close() for p in publishers])


# -- item 15 (server side): only the broker delivers on a subscriber's channel ----------


@ensure
async def test_attack_forged_delivery_on_a_subscriber_channel_is_refused(broker_service):
    svc = await broker_service()
    address = tcp_address(svc)
    subscriber = await BrokerClient.connect(address, heartbeat=None)
    publisher = await BrokerClient.connect(address, heartbeat=None)
    sub = await subscriber.subscribe("alerts")
    attacker = await Consumer.connect(address, sub.channel)  # the id leaked (stats, heartbeats, ...)
    forged = messages.encode_batch([messages.encode_text("alerts", b"forged", None)])
    with pytest.raises(NoProviderError):  # as if nobody served it: existence is not revealed
        await attacker.send(forged)
    dropped = messages.encode_batch([messages.control(messages.DROPPED, dropped="999")])
    with pytest.raises(NoProviderError):
        await attacker.send(dropped)

    await publisher.publish("alerts", b"real")
    assert (await sub.get()).payload == b"real"
    assert sub.pending == 0 and sub.dropped == 0

    assert sub.channel.bytes in svc.factory.router.guarded
    await subscriber.unsubscribe("alerts")
    await eventually(lambda: not svc.factory.router.guarded)  # the guard goes with the outlet
    await attacker.close()
    await publisher.close()
    await subscriber.close()


# -- item 1: the built-in broker comes back by itself ----------------------------------


@ensure
async def test_attack_broker_link_drop_is_recovered_by_the_service(broker_service):
    from pulsyflux.http import http_service

    svc = await broker_service()
    web = http_service("tcp:0:interface=127.0.0.1", svc)
    web.setServiceParent(svc)
    url = f"http://127.0.0.1:{(await web.whenListening()).getHost().port}/healthz"
    first = svc.broker
    publisher = await BrokerClient.connect(tcp_address(svc), heartbeat=None)

    # The server drops the broker's own connections (as item 1's oversized error frame did).
    router = svc.factory.router
    for conn in list(router.providers[DEFAULT_BROKER_CHANNEL.bytes]) + [
        c for c in router.connections if getattr(c, "trusted", False)
    ]:
        conn.transport.abortConnection()
    await eventually(lambda: first.closed)

    accepted = []

    async def publish_once() -> None:
        try:
            await publisher.publish("back", b"again", timeout=1.0)
            accepted.append(True)
        except NoProviderError:
            pass

    for _ in range(100):  # bounded: the restart is immediate, then backs off from 0.1 s
        await publish_once()
        if accepted:
            break
        await task.deferLater(reactor, 0.02, lambda: None)
    assert accepted
    broker = await svc.whenReady()  # publishes reach its Provider a moment before connect() is done
    assert broker is not first and not broker.closed
    assert svc.broker_restarts == 1
    response = await treq.get(url, persistent=False)
    assert response.code == 200
    await response.content()
    await publisher.close()


@ensure
async def test_restarts_back_off_while_failing_and_publish_keeps_its_timeout(broker_service):
    from pulsyflux import RequestTimeout

    svc = await broker_service()
    first = svc.broker
    router = svc.factory.router
    router.draining = True  # the in-process endpoint refuses: every restart fails
    for conn in [c for c in router.connections if c.trusted]:
        conn.transport.abortConnection()
    await eventually(lambda: first.closed and svc.restart_attempts >= 2)
    with pytest.raises(RequestTimeout, match="did not start"):
        await svc.publish("t", b"x", timeout=0.05)
    router.draining = False
    await svc.publish("t", b"back", timeout=5.0)  # the next attempt (within the backoff) succeeds
    assert svc.broker is not first and svc.broker_restarts == 1


@ensure
async def test_a_broker_closed_on_purpose_is_not_restarted(broker_service):
    svc = await broker_service()
    broker = svc.broker
    await broker.close()
    await within_turns(broker.when_closed())
    # No restart is scheduled at all (a lost link's first restart would be due at once).
    assert not [call for call in reactor.getDelayedCalls() if getattr(call.func, "__self__", None) is svc]
    assert svc.broker is broker and broker.closed and svc.broker_restarts == 0


# -- the in-process transport alone, under a task.Clock ----------------------------------


class Recorder(Protocol):
    def __init__(self) -> None:
        self.reads: list[bytes] = []
        self.lost = None

    def dataReceived(self, data: bytes) -> None:
        self.reads.append(data)

    def connectionLost(self, reason=None) -> None:
        self.lost = reason


class Producer:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


def pair():
    clock = task.Clock()
    a, b = Recorder(), Recorder()
    ta, tb = connect_in_process(clock, a, b, InProcessAddress("a"), InProcessAddress("b"))
    return clock, a, b, ta, tb


def test_writes_are_delivered_on_a_later_turn_in_one_read():
    clock, a, b, ta, tb = pair()
    ta.write(b"one")
    ta.writeSequence([b"two", b"three"])
    assert b.reads == []  # never inside write()
    assert len(clock.getDelayedCalls()) == 1  # one delivery per direction per turn
    clock.advance(0)
    assert b.reads == [b"onetwothree"]
    assert str(ta.getPeer()) == "inproc:b" and str(ta.getHost()) == "inproc:a"
    for interface in (ITransport, IConsumer, IPushProducer):
        verifyObject(interface, ta)
    with pytest.raises(TypeError):
        ta.write("text")


def test_a_streaming_producer_is_paused_past_64_kib_and_resumed_when_read():
    clock, a, b, ta, tb = pair()
    producer = Producer()
    ta.registerProducer(producer, True)
    ta.write(b"x" * 65536)
    assert producer.events == []
    ta.write(b"y")
    assert producer.events == ["pause"]
    clock.advance(0)
    assert producer.events == ["pause", "resume"]
    assert sum(map(len, b.reads)) == 65537


def test_a_paused_reader_leaves_the_bytes_with_the_writer():
    clock, a, b, ta, tb = pair()
    producer = Producer()
    ta.registerProducer(producer, True)
    tb.pauseProducing()  # b stops reading
    ta.write(b"z" * 70000)
    clock.advance(0)
    assert b.reads == [] and producer.events == ["pause"]
    tb.resumeProducing()
    clock.advance(0)
    assert b.reads == [b"z" * 70000] and producer.events == ["pause", "resume"]


def test_lose_connection_delivers_first_then_both_sides_see_done():
    clock, a, b, ta, tb = pair()
    ta.write(b"last words")
    ta.loseConnection()
    clock.advance(0)
    clock.advance(0)
    clock.advance(0)
    assert b.reads == [b"last words"]
    assert a.lost.check(ConnectionDone) and b.lost.check(ConnectionDone)
    ta.write(b"after")  # dropped, as on a closed TCP connection
    assert clock.getDelayedCalls() == []


def test_abort_connection_drops_what_is_buffered():
    clock, a, b, ta, tb = pair()
    producer = Producer()
    tb.registerProducer(producer, True)
    ta.write(b"never")
    ta.abortConnection()
    clock.advance(0)
    assert b.reads == []
    assert a.lost.check(ConnectionAborted)
    assert b.lost.check(ConnectionLost) and not b.lost.check(ConnectionAborted)
    assert producer.events == ["stop"]


def test_the_endpoint_marks_server_protocols_trusted_and_refuses_while_draining():
    from pulsyflux.server import ServerFactory

    clock = task.Clock()
    factory = ServerFactory(clock)
    endpoint = InProcessEndpoint(factory, clock)
    proto = Recorder()
    connected = endpoint.connect(Factory.forProtocol(lambda: proto))
    assert connected.result is proto
    (conn,) = factory.router.connections
    assert conn.trusted
    factory.router.draining = True
    refused = endpoint.connect(Factory.forProtocol(Recorder))
    failure = []
    refused.addErrback(failure.append)
    assert failure and "shutting down" in failure[0].getErrorMessage()


def test_an_error_in_data_received_ends_that_connection_not_the_reactor():
    clock, a, b, ta, tb = pair()

    def broken(data: bytes) -> None:
        raise ValueError("bad read")

    b.dataReceived = broken
    ta.write(b"boom")
    clock.advance(0)
    clock.advance(0)
    assert b.lost.check(ValueError) and a.lost.check(ConnectionLost)


def test_a_closed_pair_is_freed_without_the_garbage_collector():
    import gc
    import weakref

    clock, a, b, ta, tb = pair()
    ta.write(b"bye")
    ta.loseConnection()
    for _ in range(4):
        clock.advance(0)
    refs = [weakref.ref(ta), weakref.ref(tb)]
    a.transport = b.transport = None
    del ta, tb
    gc.disable()
    try:
        collect_unless_refcounted()
        assert [ref() for ref in refs] == [None, None]
    finally:
        gc.enable()
