"""The Router driven with no Protocol and no transport of Twisted's: each peer
is a write callable and a stub transport, as h2's connection is driven with no
socket. What these tests show is the router's policy alone."""

from __future__ import annotations

import os

import pytest
from twisted.internet.task import Clock

from pulsyflux.server import Peer, Router
from pulsyflux.server.router import Refused
from pulsyflux.wire import codec
from pulsyflux.wire.codec import FrameDecoder

from .wire import register_frames, request_frames


class StubTransport:
    """What the router asks of a transport: pause and resume reading, close."""

    def __init__(self) -> None:
        self.paused = False
        self.closed = ""
        self.written: list[bytes] = []  # what the guard writes itself (a refusal, a timeout's ERROR)

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def loseConnection(self) -> None:
        self.closed = "lost"

    def abortConnection(self) -> None:
        self.closed = "aborted"

    def getPeer(self) -> str:
        return "stub"


def connect(router: Router) -> tuple[Peer, list[bytes]]:
    written: list[bytes] = []
    return router.connect(written.append, StubTransport()), written


def receive(router: Router, peer: Peer, data: bytes) -> None:
    """What ServerProtocol.dataReceived does with a read: route its frames, then flush."""
    router.reading = peer
    try:
        for ftype, flags, request_id, frame in FrameDecoder(with_header=True).frames(data):
            router.frame_received(peer, ftype, flags, request_id, frame)
    finally:
        router.flush()
        router.reading = None


def frames(written: list[bytes]) -> list[codec.Frame]:
    out = list(FrameDecoder().feed(b"".join(written)))
    written.clear()
    return out


def test_a_request_and_its_response_are_routed_between_two_peers():
    router = Router(Clock())
    channel, client_id, request_id = os.urandom(16), os.urandom(16), os.urandom(16)
    provider, to_provider = connect(router)
    receive(router, provider, register_frames(codec.ROLE_PROVIDER, os.urandom(16), channel))
    consumer, to_consumer = connect(router)
    receive(router, consumer, request_frames(request_id, client_id, channel, b"ping"))
    assert len(to_provider) == 1  # START, CHUNK and END of one read: one write
    start, chunk, end = frames(to_provider)
    assert (start.type, start.payload, chunk.payload, end.type) == (
        codec.START,
        client_id + channel,
        b"ping",
        codec.END,
    )
    assert consumer.started == {request_id} and provider.assigned == {request_id}
    routing = client_id + channel
    receive(router, provider, codec.encode_frame(codec.RESPONSE, request_id, routing + b"pong"))
    [response] = frames(to_consumer)
    assert (response.type, response.payload) == (codec.RESPONSE, routing + b"pong")
    assert router.requests == {} and consumer.started == set() and provider.assigned == set()
    by_role = {"consumer": 1, "provider": 1, "unregistered": 0, "broker": 0, "cluster relay": 0}
    assert router.census() == (2, by_role, 1, 1, 0, 0)


def test_a_provider_that_goes_away_fails_its_requests_and_deadlines_run_on_the_clock():
    clock = Clock()
    router = Router(clock)
    channel, client_id = os.urandom(16), os.urandom(16)
    provider, _ = connect(router)
    receive(router, provider, register_frames(codec.ROLE_PROVIDER, os.urandom(16), channel))
    consumer, to_consumer = connect(router)
    lost, timed = os.urandom(16), os.urandom(16)
    receive(router, consumer, request_frames(lost, client_id, channel, b"a"))
    router.disconnected(provider)
    [error] = frames(to_consumer)
    assert (error.request_id, codec.error_message(error.payload)) == (lost, "peer disappeared")
    assert router.census().by_role == {"consumer": 1, "provider": 0, "unregistered": 0, "broker": 0, "cluster relay": 0}
    other, _ = connect(router)
    receive(router, other, register_frames(codec.ROLE_PROVIDER, os.urandom(16), channel))
    receive(router, consumer, request_frames(timed, client_id, channel, b"b", timeout_ms=500))
    clock.advance(0.5)
    [error] = frames(to_consumer)
    assert (error.request_id, codec.error_message(error.payload)) == (timed, "request timed out")
    assert router.requests == {} and clock.getDelayedCalls() == []


def test_close_all_closes_every_peer_through_its_transport():
    router = Router(Clock())
    peers = [connect(router)[0] for _ in range(3)]
    router.close_all(abort=False)
    assert [peer.transport.closed for peer in peers] == ["lost"] * 3
    router.close_all()
    assert [peer.transport.closed for peer in peers] == ["aborted"] * 3
    assert router.connections == set()  # no Protocol: no adapter to show
    for peer in peers:
        router.disconnected(peer)
    assert router.census().open == 0


def test_a_request_from_a_cluster_relay_goes_to_a_provider_here_never_to_another_relay():
    """A relayed request stays on the server it was relayed to (no ping-pong between servers),
    while a client's request takes relays and local providers in turn; relays count apart."""
    router = Router(Clock())
    channel = os.urandom(16)

    def peer(relay: bool, role: int) -> tuple[Peer, list[bytes]]:
        written: list[bytes] = []
        conn = router.connect(written.append, StubTransport(), trusted=relay)
        conn.relay = relay
        receive(router, conn, register_frames(role, os.urandom(16), channel))
        written.clear()
        return conn, written

    _, to_relay = peer(True, codec.ROLE_PROVIDER)  # a channel another server holds
    _, to_local = peer(False, codec.ROLE_PROVIDER)
    inlet, _ = peer(True, codec.ROLE_CONSUMER)  # other servers' requests enter here
    client, _ = peer(False, codec.ROLE_CONSUMER)
    for _ in range(4):
        receive(router, inlet, request_frames(os.urandom(16), inlet.key[2], channel, b"relayed"))
    assert len(frames(to_local)) == 4 * 3 and not to_relay  # START, CHUNK, END each
    for _ in range(2):
        receive(router, client, request_frames(os.urandom(16), client.key[2], channel, b"mine"))
    assert len(frames(to_relay)) == 3 and len(frames(to_local)) == 3  # round-robin over both
    census = router.census()
    assert census.by_role == {"consumer": 1, "provider": 1, "unregistered": 0, "broker": 0, "cluster relay": 2}
    assert census.open == 2
    assert {entry["role"] for entry in router.connection_list(10)[0]} == {"consumer", "provider", "cluster relay"}


def test_the_guard_keeps_its_state_on_the_peer_from_admission_with_no_protocol():
    clock = Clock()
    router = Router(clock, max_connections=1, register_timeout=4.0)
    idle, _ = connect(router)  # admitted: the guard times its registration
    transport = StubTransport()
    with pytest.raises(Refused):  # the one slot is taken by a peer too young to be evicted
        router.connect([].append, transport)
    assert transport.closed == "lost" and router.peers == {idle}
    [refusal] = FrameDecoder().feed(b"".join(transport.written))
    assert codec.error_message(refusal.payload) == "server overloaded: more than 1 connections"
    clock.advance(4.0)
    [timeout] = FrameDecoder().feed(b"".join(idle.transport.written))  # type: ignore[attr-defined]
    assert codec.error_message(timeout.payload).startswith("register timeout")
    assert idle.transport.closed == "lost"  # type: ignore[attr-defined]
    router.disconnected(idle)
    assert not router.connection_guard.counted and idle.held == 0


def test_the_cluster_is_told_of_a_channel_a_client_provides_unless_it_is_guarded():
    """A subscriber's channel (guarded while the broker forwards there) is never advertised to other
    servers: guarding withdraws it, and a provider registering on a guarded channel advertises nothing."""
    router = Router(Clock())
    told: list[tuple[bytes, bool]] = []
    assert router.watch_channels(lambda channel, held: told.append((channel, held))) == []
    open_channel, private = os.urandom(16), os.urandom(16)
    for channel in (open_channel, private):
        conn, _ = connect(router)
        receive(router, conn, register_frames(codec.ROLE_PROVIDER, os.urandom(16), channel))
    assert told == [(open_channel, True), (private, True)]
    unguard = router.guard(private)  # the broker took it for a subscription
    assert told[-1] == (private, False)
    assert router.watch_channels(told.append) == [open_channel]  # type: ignore[arg-type]
    router.watch_channels(lambda channel, held: told.append((channel, held)))
    late = os.urandom(16)
    unguard_late = router.guard(late)
    conn, _ = connect(router)
    receive(router, conn, register_frames(codec.ROLE_PROVIDER, os.urandom(16), late))
    router.disconnected(conn)
    unguard_late()
    assert told[-1] == (private, False)  # nothing about the channel guarded before its provider came
    unguard()
    assert told[-1] == (private, True)  # no longer guarded, still provided: advertised again


def test_while_draining_only_the_servers_own_broker_starts_requests():
    """A shutdown's grace period: the broker (trusted, in-process) still forwards what it accepted, up to
    max_in_flight; a client's request and one another server relays (a trusted cluster inlet) are new work."""
    router = Router(Clock(), max_in_flight=2)
    channel = os.urandom(16)
    provider, to_provider = connect(router)
    receive(router, provider, register_frames(codec.ROLE_PROVIDER, os.urandom(16), channel))

    def consumer(trusted: bool, relay: bool) -> tuple[Peer, list[bytes]]:
        written: list[bytes] = []
        conn = router.connect(written.append, StubTransport(), trusted=trusted)
        conn.relay = relay
        receive(router, conn, register_frames(codec.ROLE_CONSUMER, os.urandom(16), channel))
        return conn, written

    broker, to_broker = consumer(True, False)
    inlet, to_inlet = consumer(True, True)
    client, to_client = consumer(False, False)
    router.draining = True
    for conn, written in ((inlet, to_inlet), (client, to_client)):
        receive(router, conn, request_frames(os.urandom(16), conn.key[2], channel, b"new"))
        [refused] = frames(written)
        assert codec.error_message(refused.payload) == "server overloaded: shutting down"
    for _ in range(3):
        receive(router, broker, request_frames(os.urandom(16), broker.key[2], channel, b"forward"))
    assert len(frames(to_provider)) == 2 * 3  # two forwarded (START, CHUNK, END each), the third past the limit
    [refused] = frames(to_broker)
    assert codec.error_message(refused.payload) == "server overloaded: shutting down"
