"""Requests across servers through Redis (docs/cluster.md): relays, the registry's lease, bounded bodies."""

from __future__ import annotations

import uuid

import pytest
import pytest_twisted
from twisted.internet import defer

from pulsyflux import Consumer, NoProviderError, Provider, RequestTimeout
from pulsyflux.service import BrokerService
from pulsyflux.testing import hang

from .helpers import eventually


async def _node(redis_server, name: str, lease: float = 3.0) -> BrokerService:
    node = BrokerService("tcp:0:interface=127.0.0.1", cluster=redis_server.url, node_name=name)
    node.cluster.lease = lease
    node.startService()
    await node.whenReady()
    await node.cluster.link.when_up()
    return node


def _address(node: BrokerService) -> str:
    return f"127.0.0.1:{node.server.port.getHost().port}"


def _relays_to(node: BrokerService, other: str, channel: uuid.UUID) -> bool:
    return (other, channel.bytes) in node.cluster.requests.relays


@pytest.fixture
def pair(redis_server):
    nodes = pytest_twisted.blockon(defer.ensureDeferred(_pair(redis_server)))
    yield nodes
    for node in nodes:
        pytest_twisted.blockon(node.stopService())


async def _pair(redis_server):
    return await _node(redis_server, "a"), await _node(redis_server, "b")


@pytest_twisted.ensureDeferred
async def test_a_consumer_on_one_server_reaches_a_provider_on_another(pair):
    a, b = pair
    channel = uuid.uuid4()
    provider = await Provider.connect(_address(b), channel, handler=lambda body: b"b says " + body)
    consumer = await Consumer.connect(_address(a), channel)
    try:
        await eventually(lambda: _relays_to(a, "b", channel))
        brokers_own = b.server.factory.stats.broker_requests_routed
        assert await consumer.send(b"hello") == b"b says hello"
        assert a.cluster.requests.forwarded == 1 and b.cluster.requests.served == 1
        assert channel.bytes in b.cluster.requests.inlets  # the next request enters b's router the same way
        assert await consumer.send(b"again") == b"b says again"
        # A client's request is counted where it entered: routed and answered on a; on b, a's server asked
        # (the cluster's requests_served), not b's broker (broker_routed) nor a client of b's.
        a_stats, b_stats = a.server.factory.stats, b.server.factory.stats
        assert (a_stats.requests_routed, a_stats.responses_routed) == (2, 2)
        assert (b_stats.requests_routed, b_stats.responses_routed) == (0, 0)
        assert b_stats.broker_requests_routed == brokers_own
    finally:
        await consumer.close()
        await provider.close()


@pytest_twisted.ensureDeferred
async def test_providers_on_two_servers_share_a_channel_and_relayed_requests_stay_put(pair):
    a, b = pair
    channel = uuid.uuid4()
    seen = {"a": 0, "b": 0}

    def handler(name):
        def handle(body: bytes) -> bytes:
            seen[name] += 1
            return name.encode()

        return handle

    on_a = await Provider.connect(_address(a), channel, handler=handler("a"))
    on_b = await Provider.connect(_address(b), channel, handler=handler("b"))
    consumer = await Consumer.connect(_address(a), channel)
    try:
        await eventually(lambda: _relays_to(a, "b", channel) and _relays_to(b, "a", channel))
        answers = [await consumer.send(b"x") for _ in range(20)]
        assert sorted(set(answers)) == [b"a", b"b"]
        assert seen == {"a": 10, "b": 10}  # round-robin: a's provider, then b's through its relay
        # b's relay consumer was served by b's own provider, never sent back to a (no ping-pong)
        assert b.cluster.requests.forwarded == 0 and b.cluster.requests.served == 10
    finally:
        await consumer.close()
        await on_a.close()
        await on_b.close()


@pytest_twisted.ensureDeferred
async def test_a_16_mib_body_crosses_servers_both_ways(pair):
    a, b = pair
    channel = uuid.uuid4()
    provider = await Provider.connect(_address(b), channel, handler=lambda body: body[::-1])
    consumer = await Consumer.connect(_address(a), channel)
    try:
        await eventually(lambda: _relays_to(a, "b", channel))
        body = bytes(range(256)) * (16 * 4096)
        assert len(body) == 16 << 20
        assert await consumer.send(body, timeout=30) == body[::-1]
        assert a.cluster.requests.out_bytes == 0 and a.cluster.requests.in_bytes == 0  # nothing held after
        assert b.cluster.requests.in_bytes == 0  # the answer was counted while b held it, and released
    finally:
        await consumer.close()
        await provider.close()


@pytest_twisted.ensureDeferred
async def test_answers_held_for_other_servers_count_against_the_bound(pair, monkeypatch):
    """Worst input: providers here answer other servers' requests with bodies as large as they may be. An
    answer is held whole until it goes to Redis, so it counts with what arrives from other servers: past
    the bound the asking consumer gets 'server overloaded' and nothing stays held."""
    from pulsyflux import ServerOverloaded
    from pulsyflux.cluster import requests as cluster_requests

    a, b = pair
    monkeypatch.setattr(cluster_requests, "MAX_IN_BYTES", 1 << 20)
    channel = uuid.uuid4()
    provider = await Provider.connect(_address(b), channel, handler=lambda body: b"x" * (2 << 20))
    consumer = await Consumer.connect(_address(a), channel)
    try:
        await eventually(lambda: _relays_to(a, "b", channel))
        with pytest.raises(ServerOverloaded, match="too many bytes of answers to other servers"):
            await consumer.send(b"answer big", timeout=30)
        assert b.cluster.requests.in_bytes == 0
    finally:
        await consumer.close()
        await provider.close()


@pytest_twisted.ensureDeferred
async def test_a_consumer_that_reads_slowly_holds_the_relay_as_it_would_hold_a_provider(pair):
    """A large answer from another server to a consumer that stops reading: the relay is paused as a
    provider's connection would be, keeps the answer's further pieces, and goes on when the consumer
    reads again; the consumer gets it whole and is not cut as a slow reader."""
    a, b = pair
    channel = uuid.uuid4()
    answer = bytes(range(256)) * (64 * 1024)  # 16 MiB: four times the unread bytes a consumer may leave
    provider = await Provider.connect(_address(b), channel, handler=lambda body: answer)
    consumer = await Consumer.connect(_address(a), channel)
    try:
        await eventually(lambda: _relays_to(a, "b", channel))
        (relay,) = a.cluster.requests.relays.values()
        resume = hang(consumer)  # the consumer stops reading
        waiting = consumer.send(b"the big one", timeout=60)
        await eventually(lambda: relay.paused and relay.kept)
        assert a.cluster.requests.in_bytes > 0  # the kept pieces are counted in the bound
        resume()
        assert await waiting == answer
        assert a.server.factory.router.stats.slow_consumers == 0
        assert a.cluster.requests.in_bytes == 0 and not relay.kept
    finally:
        await consumer.close()
        await provider.close()


@pytest_twisted.ensureDeferred
async def test_no_provider_anywhere_answers_at_once(pair):
    a, _ = pair
    consumer = await Consumer.connect(_address(a), uuid.uuid4())
    try:
        with pytest.raises(NoProviderError):
            await consumer.send(b"anyone?")
    finally:
        await consumer.close()


@pytest_twisted.ensureDeferred
async def test_a_server_that_stops_takes_its_channels_with_it_at_once(pair):
    a, b = pair
    channel = uuid.uuid4()
    provider = await Provider.connect(_address(b), channel, handler=lambda body: body)
    consumer = await Consumer.connect(_address(a), channel)
    try:
        await eventually(lambda: _relays_to(a, "b", channel))
        await provider.close()
        await eventually(lambda: ("b", channel.bytes) not in a.cluster.requests.relays)
        with pytest.raises(NoProviderError):
            await consumer.send(b"gone")
    finally:
        await consumer.close()


@pytest_twisted.ensureDeferred
async def test_a_server_cut_off_disappears_within_its_lease_and_its_requests_fail(redis_server):
    a = await _node(redis_server, "a", lease=0.6)
    b = await _node(redis_server, "b", lease=0.6)
    channel = uuid.uuid4()
    stuck = defer.Deferred()
    provider = await Provider.connect(_address(b), channel, handler=lambda body: stuck)
    consumer = await Consumer.connect(_address(a), channel)
    try:
        await eventually(lambda: _relays_to(a, "b", channel))
        waiting = consumer.send(b"never answered", timeout=30)
        await eventually(lambda: b.cluster.requests.incoming == {} and len(a.cluster.requests.out) == 1)
        # b loses Redis without a word (as if killed): no goodbye, only its lease runs out
        b.cluster.registry._loop.stop()
        await b.cluster.link.stop()
        with pytest.raises(NoProviderError):
            await waiting
        assert ("b", channel.bytes) not in a.cluster.requests.relays
    finally:
        stuck.callback(b"")
        await consumer.close()
        await provider.close()
        await a.stopService()
        await b.stopService()


@pytest_twisted.ensureDeferred
async def test_garbage_in_a_servers_inbox_is_counted_and_harms_nobody(pair):
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    from pulsyflux.cluster.redis import RedisCommands

    a, b = pair
    channel = uuid.uuid4()
    provider = await Provider.connect(_address(b), channel, handler=lambda body: body)
    consumer = await Consumer.connect(_address(a), channel)
    intruder = await connectProtocol(
        TCP4ClientEndpoint(reactor, "127.0.0.1", a.cluster.link.address.port), RedisCommands()
    )
    try:
        await eventually(lambda: _relays_to(a, "b", channel))
        for junk in (b"", b"x" * 100_000, b"q a b zz 0\nbody", b"r a nosuch ok 0\nanswer", b"q a 1 " + b"0" * 32):
            await intruder.execute("SPUBLISH", "pulsyflux:n:b", junk)
        assert await consumer.send(b"still fine") == b"still fine"
        assert b.cluster.requests.bad >= 3
    finally:
        intruder.transport.loseConnection()
        await consumer.close()
        await provider.close()


@pytest_twisted.ensureDeferred
async def test_a_server_killed_under_load_fails_only_its_own_requests_and_the_rest_go_on(redis_server, tmp_path):
    import signal
    import sys
    from pathlib import Path

    from pulsyflux import ConnectionLostError

    from .twistd_process import spawn_twistd

    a = await _node(redis_server, "a", lease=1.0)
    b = spawn_twistd(
        Path(sys.executable).parent, tmp_path, "--port", "tcp:0:interface=127.0.0.1",
        "--cluster", redis_server.url, "--node-name", "b", "--cluster-lease", "1",
    )  # fmt: skip
    channel = uuid.uuid4()
    answered = {"a": 0, "b": 0}
    try:
        local = await Provider.connect(_address(a), channel, handler=lambda body: b"a")
        remote = await Provider.connect(await b.listening, channel, handler=lambda body: b"b")
        consumer = await Consumer.connect(_address(a), channel)
        await eventually(lambda: _relays_to(a, "b", channel))
        failures = []

        async def worker(count: int) -> None:
            for _ in range(count):
                try:
                    answered[(await consumer.send(b"x", timeout=20)).decode()] += 1
                except NoProviderError as error:
                    failures.append(error)

        workers = [defer.ensureDeferred(worker(150)) for _ in range(20)]
        await eventually(lambda: answered["b"] >= 50)
        b.transport.signalProcess(signal.SIGKILL)
        await defer.gatherResults(workers)
        assert answered["a"] + answered["b"] + len(failures) == 3000  # every request ended, none hung
        assert answered["b"] >= 50 and answered["a"] > answered["b"]  # a's own provider took over
        assert ("b", channel.bytes) not in a.cluster.requests.relays
        assert await consumer.send(b"after") == b"a"
        await consumer.close()
        await local.close()
        try:
            await remote.close()
        except ConnectionLostError:
            pass
    finally:
        if not b.ended.called:
            b.transport.signalProcess(signal.SIGKILL)
        await b.ended
        await a.stopService()


async def _announce(intruder, sign: str, name: str, channel: bytes = b"") -> None:
    """What a server publishes after it changed its sets in Redis: every server reads them all again now,
    rather than at its next renewal (a third of its lease away)."""
    await intruder.execute("SPUBLISH", "pulsyflux:registry", sign.encode() + name.encode() + b"\n" + channel)


async def _forge_server(intruder, name: str | bytes, *channels: bytes) -> None:
    """A server ``name`` holding ``channels``, written in Redis in the order a server writes itself (its
    lease key, its set, then the node set): a read between two of these writes never finds the name
    without its lease key, which it would take for a server gone and remove from the node set for all."""
    await intruder.execute("SET", b"pulsyflux:node:" + _bytes(name), "1", "PX", "30000")
    if channels:
        await intruder.execute("SADD", b"pulsyflux:chans:" + _bytes(name), *channels)
    await intruder.execute("SADD", "pulsyflux:nodes", name)


def _bytes(name: str | bytes) -> bytes:
    return name.encode("utf-8") if isinstance(name, str) else name


async def _intruder(node: BrokerService):
    """A raw Redis connection: what a faulty or hostile server could write to the cluster's keys and channels."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    from pulsyflux.cluster.redis import RedisCommands

    return await connectProtocol(
        TCP4ClientEndpoint(reactor, "127.0.0.1", node.cluster.link.address.port), RedisCommands()
    )


async def _inbox_of(node: BrokerService, name: bytes, heard: list):
    """A raw Redis subscriber to server ``name``'s inbox, subscribed once this returns: what a server of
    that name would receive from ``node``."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    from pulsyflux.cluster.redis import RedisSubscriber

    listener = await connectProtocol(
        TCP4ClientEndpoint(reactor, "127.0.0.1", node.cluster.link.address.port),
        RedisSubscriber(lambda channel, data: heard.append(data)),
    )
    listener.subscribe(b"pulsyflux:n:" + name)
    await listener.ping()
    return listener


@pytest_twisted.ensureDeferred
async def test_a_consumer_that_gives_up_frees_its_relayed_request_on_both_servers(pair):
    a, b = pair
    channel = uuid.uuid4()
    stuck: defer.Deferred = defer.Deferred()
    provider = await Provider.connect(_address(b), channel, handler=lambda body: stuck)
    consumer = await Consumer.connect(_address(a), channel)
    try:
        await eventually(lambda: _relays_to(a, "b", channel))
        with pytest.raises(RequestTimeout):
            await consumer.send(b"too slow", timeout=0.3)
        # a's relay was told by its router: the entry and its bytes go now (not after 300 s), and b stops waiting
        await eventually(lambda: not a.cluster.requests.out and not b.cluster.requests.serving)
        assert a.cluster.requests.out_bytes == 0 and a.cluster.requests.cancelled == 1
        # b's router still holds it for its provider (its deadline is b's own, 300 s): it counts in a's share
        assert b.cluster.requests.held_from == {"a": 1}
        stuck.callback(b"late")
        await eventually(lambda: b.cluster.requests.held == 0)  # answered, and the answer dropped
        assert b.cluster.requests.served == 0
    finally:
        if not stuck.called:
            stuck.callback(b"late")
        await consumer.close()
        await provider.close()


@pytest_twisted.ensureDeferred
async def test_pieces_of_a_request_that_never_completes_are_freed(pair):
    a, b = pair
    channel = uuid.uuid4()
    b.cluster.requests.incomplete_timeout = 0.2
    intruder = await _intruder(b)
    try:
        for i in range(50):  # first pieces whose rest never comes (a server that died mid-send)
            head = b"q gone %016d " % i + channel.bytes.hex().encode() + b" 1\n"
            await intruder.execute("SPUBLISH", "pulsyflux:n:b", head + b"x" * 10_000)
        await eventually(lambda: b.cluster.requests.in_bytes > 0)
        await eventually(lambda: not b.cluster.requests.incoming)
        assert b.cluster.requests.in_bytes == 0
    finally:
        intruder.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_empty_pieces_of_a_request_cost_their_server_its_share(pair, monkeypatch):
    """Worst input: one request in pieces with no bytes (``more`` 1), many of them. Each piece held costs
    PIECE_COST beside its bytes, so they fill the sender's share like bytes would: the request is refused
    and its pieces go, instead of a list of empty pieces growing for INCOMPLETE_TIMEOUT."""
    from pulsyflux.cluster import requests as cluster_requests

    a, b = pair
    cost = cluster_requests.PIECE_COST
    monkeypatch.setattr(cluster_requests, "MAX_IN_BYTES_FROM_ONE", 100 * cost)
    channel = uuid.uuid4()
    heard: list[bytes] = []
    intruder = await _intruder(b)
    listener = await _inbox_of(b, b"mallory", heard)
    try:
        head = b"q mallory empty " + channel.bytes.hex().encode() + b" 1\n"
        for _ in range(50):
            await intruder.execute("SPUBLISH", "pulsyflux:n:b", head)
        await eventually(lambda: b.cluster.requests.in_bytes == 50 * cost)  # held, and counted
        assert b.cluster.requests.bytes_from == {"mallory": 50 * cost}
        for _ in range(51):  # the 101st piece is one more than its share
            await intruder.execute("SPUBLISH", "pulsyflux:n:b", head)
        await eventually(lambda: heard)
        assert heard[0].startswith(b"r b empty err 0\nserver overloaded: server b holds as many requests")
        assert not b.cluster.requests.incoming and b.cluster.requests.refused_from_one == 1
        assert b.cluster.requests.in_bytes == 0 and not b.cluster.requests.bytes_from
    finally:
        listener.transport.loseConnection()
        intruder.transport.loseConnection()


@pytest.mark.parametrize("bound", ["MAX_IN_BYTES", "MAX_IN_BYTES_FROM_ONE"])
@pytest_twisted.ensureDeferred
async def test_empty_pieces_of_an_answer_kept_for_a_slow_reader_count_against_the_bound(pair, monkeypatch, bound):
    """Worst input: while a consumer here reads slowly (its relay paused, the answer's pieces kept), the
    server asked sends pieces with no bytes, without end. Each kept piece costs PIECE_COST: past the bound
    (all servers', or that server's share) the request fails with 'server overloaded' and nothing more is
    kept for it."""
    from pulsyflux import ServerOverloaded
    from pulsyflux.cluster import requests as cluster_requests

    a, b = pair
    cost = cluster_requests.PIECE_COST
    channel = uuid.uuid4()
    stuck: defer.Deferred = defer.Deferred()
    provider = await Provider.connect(_address(b), channel, handler=lambda body: stuck)  # b never answers
    consumer = await Consumer.connect(_address(a), channel)
    intruder = await _intruder(a)
    try:
        await eventually(lambda: _relays_to(a, "b", channel))
        (relay,) = a.cluster.requests.relays.values()
        resume = hang(consumer)
        waiting = consumer.send(b"answer slowly", timeout=60)
        await eventually(lambda: len(a.cluster.requests.out) == 1)
        (rid,) = a.cluster.requests.out
        # Pieces of 512 KiB, as a server sends them, until the consumer's connection takes no more unread
        # and the relay is paused.
        for _ in range(64):
            handed = relay.peer.bytes_in
            await intruder.execute("SPUBLISH", "pulsyflux:n:a", b"r b " + rid + b" ok 1\n" + b"x" * (512 << 10))
            await eventually(lambda handed=handed: relay.paused or relay.peer.bytes_in > handed)
            if relay.paused:
                break
        assert relay.paused and not relay.kept
        for _ in range(20):
            await intruder.execute("SPUBLISH", "pulsyflux:n:a", b"r b " + rid + b" ok 1\n")
        await eventually(lambda: len(relay.kept) == 20)
        assert a.cluster.requests.in_bytes == 20 * cost  # kept, and counted
        assert a.cluster.requests.bytes_from == {"b": 20 * cost}  # in b's share too
        monkeypatch.setattr(cluster_requests, bound, 50 * cost)
        for _ in range(40):
            await intruder.execute("SPUBLISH", "pulsyflux:n:a", b"r b " + rid + b" ok 1\n")
        await eventually(lambda: not a.cluster.requests.out)  # failed at the bound
        assert len(relay.kept) == 50 and a.cluster.requests.in_bytes == 50 * cost  # the last 10 were not kept
        resume()
        with pytest.raises(ServerOverloaded, match="too many bytes of answers waiting for slow consumers"):
            await waiting
        await eventually(lambda: not relay.kept)
        assert a.cluster.requests.in_bytes == 0 and not a.cluster.requests.bytes_from
    finally:
        stuck.callback(b"late")
        intruder.transport.loseConnection()
        await consumer.close()
        await provider.close()


@pytest_twisted.ensureDeferred
async def test_empty_pieces_of_a_local_request_are_not_held_by_its_relay(pair):
    """Worst input: a consumer here sends a request to a channel another server holds as one START and
    thousands of empty CHUNK frames (the router bounds a body's bytes, not its frames). The relay holds
    the body until END: the empty pieces add nothing to it and are not kept."""
    from types import SimpleNamespace

    from pulsyflux.wire import codec

    from .wire import connect_raw, register_frames

    a, b = pair
    channel = uuid.uuid4()
    provider = await Provider.connect(_address(b), channel, handler=lambda body: body)
    raw = None
    try:
        await eventually(lambda: _relays_to(a, "b", channel))
        (relay,) = a.cluster.requests.relays.values()
        raw = await connect_raw(SimpleNamespace(port=a.server.port.getHost().port))
        client, rid = uuid.uuid4().bytes, uuid.uuid4().bytes
        meta = codec.pack_metadata(codec.ROLE_CONSUMER, 30000, client, channel.bytes)
        empty = codec.encode_frame(codec.CHUNK, rid)
        raw.send(
            register_frames(codec.ROLE_CONSUMER, client, channel.bytes), codec.encode_frame(codec.START, rid, meta)
        )
        raw.send(empty * 10_000)
        await eventually(lambda: relay.peer.bytes_out >= 10_000 * len(empty))  # all routed to the relay
        assert [len(held) for held in relay.starting.values()] == [1]  # the routing only
        raw.send(codec.encode_frame(codec.CHUNK, rid, b"body"), codec.encode_frame(codec.END, rid))
        await eventually(lambda: b.cluster.requests.served == 1)
    finally:
        if raw is not None:
            raw.transport.loseConnection()
        await provider.close()


@pytest_twisted.ensureDeferred
async def test_empty_pieces_of_a_local_providers_answer_to_another_server_are_counted(pair):
    """Worst input: a provider here answers another server's request with many empty RESPONSE_CHUNKs and no
    END. The answer is held whole until it goes to Redis: each piece costs PIECE_COST in the bound."""
    from types import SimpleNamespace

    from pulsyflux.cluster import requests as cluster_requests
    from pulsyflux.wire import codec

    from .test_attack_router import frame, raw_provider

    a, b = pair
    cost = cluster_requests.PIECE_COST
    channel = uuid.uuid4()
    provider = await raw_provider(SimpleNamespace(port=b.server.port.getHost().port), channel)
    provider.answer = lambda request_id, routing: (
        frame(codec.RESPONSE_START, request_id, routing) + frame(codec.RESPONSE_CHUNK, request_id) * 1000
    )
    consumer = await Consumer.connect(_address(a), channel)
    try:
        await eventually(lambda: _relays_to(a, "b", channel))
        waiting = consumer.send(b"answer me", timeout=30)
        await eventually(lambda: b.cluster.requests.in_bytes == 1000 * cost)
        ((request_id, _),) = [(f.request_id, f) for f in provider.frames if f.type == codec.END]
        provider.send(frame(codec.RESPONSE_END, request_id))
        assert await waiting == b""
        assert b.cluster.requests.in_bytes == 0
    finally:
        provider.transport.loseConnection()
        await consumer.close()


@pytest_twisted.ensureDeferred
async def test_an_answer_from_another_server_than_the_one_asked_is_ignored(pair):
    a, b = pair
    channel = uuid.uuid4()
    stuck: defer.Deferred = defer.Deferred()
    provider = await Provider.connect(_address(b), channel, handler=lambda body: stuck)
    consumer = await Consumer.connect(_address(a), channel)
    intruder = await _intruder(a)
    try:
        await eventually(lambda: _relays_to(a, "b", channel))
        waiting = consumer.send(b"who answers?", timeout=30)
        await eventually(lambda: len(a.cluster.requests.out) == 1 and b.cluster.requests.serving)
        (rid,) = a.cluster.requests.out
        await intruder.execute("SPUBLISH", "pulsyflux:n:a", b"r mallory " + rid + b" ok 0\nforged")
        await eventually(lambda: a.cluster.requests.bad == 1)
        stuck.callback(b"the real answer")
        assert await waiting == b"the real answer"
    finally:
        intruder.transport.loseConnection()
        await consumer.close()
        await provider.close()


@pytest_twisted.ensureDeferred
async def test_a_server_restarted_under_the_same_name_fails_what_was_in_flight_at_once(pair):
    a, b = pair
    channel = uuid.uuid4()
    stuck: defer.Deferred = defer.Deferred()
    provider = await Provider.connect(_address(b), channel, handler=lambda body: stuck)
    consumer = await Consumer.connect(_address(a), channel)
    intruder = await _intruder(a)
    try:
        await eventually(lambda: _relays_to(a, "b", channel))
        waiting = consumer.send(b"lost with b's previous life", timeout=30)
        await eventually(lambda: len(a.cluster.requests.out) == 1)
        # b comes back within its lease under the same name: its lease key holds a new incarnation
        # (this b stops renewing first, as the old life would have, or it could write its own id back
        # before a reads the key and the test would wait for nothing)
        b.cluster.registry._loop.stop()
        await intruder.execute("SET", "pulsyflux:node:b", "another-life", "PX", "3000")
        await _announce(intruder, "!", "b")  # as b's new life does once it has written its state
        with pytest.raises(NoProviderError):
            await waiting
    finally:
        stuck.callback(b"")
        intruder.transport.loseConnection()
        await consumer.close()
        await provider.close()


@pytest_twisted.ensureDeferred
async def test_node_names_from_redis_are_checked_and_their_number_bounded(pair):
    a, _ = pair
    channel = uuid.uuid4()
    intruder = await _intruder(a)
    try:
        for name in ("evil\x1b[2Jname", "ghost"):
            await _forge_server(intruder, name, channel.bytes)
        await intruder.execute("SADD", "pulsyflux:nodes", b"\xff\xfe")
        await _announce(intruder, "+", "ghost", channel.bytes)
        await eventually(lambda: ("ghost", channel.bytes) in a.cluster.requests.relays)
        assert ("evil\x1b[2Jname", channel.bytes) not in a.cluster.requests.relays
        assert a.cluster.registry.bad_nodes >= 2
    finally:
        for name in ("evil\x1b[2Jname", "ghost"):
            await intruder.execute("SREM", "pulsyflux:nodes", name)
            await intruder.execute("DEL", f"pulsyflux:node:{name}", f"pulsyflux:chans:{name}")
        intruder.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_pulsyflux_info_shows_the_cluster(redis_server, cli):
    import json

    import treq

    from pulsyflux.http.site import http_service

    a = BrokerService("tcp:0:interface=127.0.0.1", cluster=redis_server.url, node_name="a")
    http_service("tcp:0:interface=127.0.0.1", a).setServiceParent(a)
    a.startService()
    await a.whenReady()
    await a.cluster.link.when_up()
    b = await _node(redis_server, "b")
    web = [s for s in a if s is not a.server and hasattr(s, "port")][0]
    url = f"http://127.0.0.1:{web.port.getHost().port}"
    channel = uuid.uuid4()
    provider = await Provider.connect(_address(b), channel, handler=lambda body: body)
    consumer = await Consumer.connect(_address(a), channel)
    try:
        await eventually(lambda: _relays_to(a, "b", channel))
        assert await consumer.send(b"across") == b"across"
        result = await cli("info", "--http", url)
        assert result.returncode == 0, result.stderr
        text = result.stdout.decode()
        assert f"cluster         node a, {redis_server.url}, link up" in text  # the round trip after the first PING
        assert "  nodes         2 (this one, b)\n" in text
        assert (
            "  requests      1 forwarded, 0 served, 0 failed, 0 in flight; 1 relay, 0 channels here, 1 elsewhere"
            in text
        )
        assert "  pub/sub       0 sent, 0 received, 0 unshared, 0 refused, 0 failed\n" in text
        # the relay to b is a record of its own in a's router, not a client and not the broker's
        assert "since start; 2 connections of the server's own broker; 1 cluster relay\n" in text
        assert "  inproc:cluster:b      cluster relay" in text
        metrics = await (await treq.get(url + "/metrics")).text()
        for line in ("pulsyflux_cluster_nodes 2", "pulsyflux_cluster_requests_forwarded_total 1",
                     "pulsyflux_cluster_relays 1", "pulsyflux_cluster_requests_in_flight 0"):  # fmt: skip
            assert line + "\n" in metrics
        result = await cli("info", "--json", "--http", url)
        info = json.loads(result.stdout)
        assert info["cluster"]["node"] == "a" and info["cluster"]["requests_forwarded"] == 1
        assert info["connections"]["by_role"]["cluster relay"] == 1 and info["connections"]["open"] == 1
    finally:
        await consumer.close()
        await provider.close()
        await a.stopService()
        await b.stopService()


def _calls(info: bytes, command: str) -> int:
    for line in info.decode().splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


@pytest_twisted.ensureDeferred
async def test_a_flood_of_registry_announcements_costs_reads_not_writes(pair):
    a, b = pair
    intruder = await _intruder(a)
    try:
        await intruder.execute("CONFIG", "RESETSTAT")
        heard = a.cluster.registry.heard
        for _ in range(20):  # 2,000 announcements in 20 pipelined bursts
            await defer.gatherResults(
                [intruder.execute("SPUBLISH", "pulsyflux:registry", b"+mallory\n" + b"x" * 16) for _ in range(100)]
            )
        await eventually(lambda: a.cluster.registry.heard - heard == 2000 and not a.cluster.registry._reading)
        info = await intruder.execute("INFO", "commandstats")
        # each of a and b renews its lease (SET) three times a second, whatever it hears
        assert _calls(info, "set") < 100, info
        assert _calls(info, "sscan") < 2000, info  # one page of each set per read, a few reads a burst
    finally:
        intruder.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_channels_held_elsewhere_past_the_bound_are_counted_not_relayed(pair, monkeypatch):
    from pulsyflux.cluster import registry

    monkeypatch.setattr(registry, "MAX_REMOTE_CHANNELS", 3)
    a, _ = pair
    intruder = await _intruder(a)
    channels = [uuid.uuid4().bytes for _ in range(10)]
    try:
        await _forge_server(intruder, "ghost", *channels)
        await _announce(intruder, "+", "ghost", channels[0])
        await eventually(lambda: a.cluster.registry.not_relayed == 7)
        assert len([key for key in a.cluster.requests.relays if key[0] == "ghost"]) == 3
        assert a.cluster.stats()["channels_not_relayed"] == 7
    finally:
        await intruder.execute("SREM", "pulsyflux:nodes", "ghost")
        await intruder.execute("DEL", "pulsyflux:node:ghost", "pulsyflux:chans:ghost")
        intruder.transport.loseConnection()


def _spy_reads(monkeypatch, node: BrokerService, key: bytes) -> list[int]:
    """The number of members in each reply to a read of set ``key`` by ``node`` (SSCAN or SMEMBERS)."""
    link = node.cluster.link
    execute = link.execute
    sizes: list[int] = []

    def spy(*args):
        d = execute(*args)
        if args[0] in (b"SSCAN", b"SMEMBERS") and args[1] == key:
            d.addCallback(lambda reply: sizes.append(len(reply[1] if args[0] == b"SSCAN" else reply)) or reply)
        return d

    monkeypatch.setattr(link, "execute", spy)
    return sizes


@pytest_twisted.ensureDeferred
async def test_a_forged_server_with_millions_of_members_is_read_no_further_than_the_bounds(pair, monkeypatch):
    """Worst input: whoever can write to Redis gives a server name 50,000 channels, a lease key of 1 MiB,
    and the node set 20,000 names that are none. The sets are read a page at a time, no further than
    what could be used; the rest is counted (channels_not_relayed, sets_read_in_part), not read."""
    from pulsyflux.cluster import registry

    monkeypatch.setattr(registry, "MAX_REMOTE_CHANNELS", 100)
    monkeypatch.setattr(registry, "MAX_NODES", 10)  # 40 names read at most
    a, _ = pair
    chans = _spy_reads(monkeypatch, a, b"pulsyflux:chans:ghost")
    intruder = await _intruder(a)
    try:
        for start in range(0, 50_000, 5000):
            await intruder.execute("SADD", "pulsyflux:chans:ghost", *(b"%016d" % n for n in range(start, start + 5000)))
        await intruder.execute("SET", "pulsyflux:node:ghost", b"i" * (1 << 20), "PX", "30000")
        await intruder.execute("SADD", "pulsyflux:nodes", "ghost")
        await _announce(intruder, "+", "ghost")
        await eventually(lambda: len([key for key in a.cluster.requests.relays if key[0] == "ghost"]) == 100)
        assert a.cluster.registry.incarnations["ghost"] == b"i" * registry.LEASE_BYTES  # its first bytes only
        assert a.cluster.registry.not_relayed == 50_000 - 100  # counted, not read
        assert 0 < max(chans) < 1000 and a.cluster.registry.sets_read_in_part >= 1

        nodes = _spy_reads(monkeypatch, a, b"pulsyflux:nodes")
        for start in range(0, 20_000, 5000):
            await intruder.execute("SADD", "pulsyflux:nodes", *(b"\xff%d" % n for n in range(start, start + 5000)))
        await _announce(intruder, "!", "mallory")
        await eventually(lambda: nodes and not a.cluster.registry._reading)
        assert sum(nodes) < 1000  # a page, cut at 4 x MAX_NODES: not 20,000 names a read
        # The real servers whose names that read did not reach are still known (their leases were read).
        assert {"b", "ghost"} <= set(a.cluster.registry.remote)
    finally:
        await intruder.execute("DEL", "pulsyflux:nodes", "pulsyflux:node:ghost", "pulsyflux:chans:ghost")
        intruder.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_real_server_stays_known_when_junk_names_cut_the_node_set_read(pair, monkeypatch):
    """Worst input: 20,000 junk names in the node set. Read no further than 4 x MAX_NODES names, in the
    hash's order, the set rarely shows a real server's name; a known server not read is not forgotten
    (its relays torn down and set up again at every read) but its lease key is read: it goes only when
    that expires."""
    from pulsyflux.cluster import registry

    monkeypatch.setattr(registry, "MAX_NODES", 10)  # 40 names read at most
    a, b = pair
    channel = uuid.uuid4()
    provider = await Provider.connect(_address(b), channel, handler=lambda body: b"b: " + body)
    consumer = await Consumer.connect(_address(a), channel)
    forgotten: list[str] = []
    forget = a.cluster.registry._forget
    monkeypatch.setattr(a.cluster.registry, "_forget", lambda node: forgotten.append(node) or forget(node))
    intruder = await _intruder(a)
    try:
        await eventually(lambda: _relays_to(a, "b", channel))
        nodes = _spy_reads(monkeypatch, a, b"pulsyflux:nodes")
        for start in range(0, 20_000, 5000):
            await intruder.execute("SADD", "pulsyflux:nodes", *(b"\xff%d" % n for n in range(start, start + 5000)))
        for _ in range(3):  # three whole reads, each cut at 40 names
            read = len(nodes)
            a.cluster.registry.read()
            await eventually(lambda read=read: len(nodes) > read and not a.cluster.registry._reading)
        assert a.cluster.registry.sets_read_in_part >= 1
        assert forgotten == [] and _relays_to(a, "b", channel)
        assert await consumer.send(b"hi") == b"b: hi"

        # Its lease gone (as when killed), b is forgotten although its name is still not read.
        await b.cluster.registry.stop()  # also SREMs b's name, as a gone server's is by the next reader
        await eventually(lambda: "b" not in a.cluster.registry.remote)
        assert forgotten.count("b") == 1
    finally:
        await consumer.close()
        await provider.close()
        await intruder.execute("DEL", "pulsyflux:nodes")
        intruder.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_forged_servers_keys_of_another_type_do_not_stop_the_registry(pair):
    """Worst input: names in the node set whose lease key is a set, or whose channel set is a string.
    Redis refuses those reads (WRONGTYPE): that server is skipped and counted, the others are still read
    (a failed read used to leave everything as it was: no server came or went for anyone any more)."""
    a, b = pair
    intruder = await _intruder(a)
    channel = uuid.uuid4()
    provider = None
    try:
        await intruder.execute("SADD", "pulsyflux:node:ghost1", "not a lease")
        await intruder.execute("SET", "pulsyflux:node:ghost2", "1", "PX", "30000")
        await intruder.execute("SET", "pulsyflux:chans:ghost2", "not a set")
        await intruder.execute("SADD", "pulsyflux:nodes", "ghost1", "ghost2")
        bad = a.cluster.registry.bad_nodes
        provider = await Provider.connect(_address(b), channel, handler=lambda body: body)
        await eventually(lambda: _relays_to(a, "b", channel))
        assert a.cluster.registry.bad_nodes >= bad + 2
        assert "ghost1" not in a.cluster.registry.remote and "ghost2" not in a.cluster.registry.remote
    finally:
        if provider is not None:
            await provider.close()
        await intruder.execute("SREM", "pulsyflux:nodes", "ghost1", "ghost2")
        await intruder.execute("DEL", "pulsyflux:node:ghost1", "pulsyflux:node:ghost2", "pulsyflux:chans:ghost2")
        intruder.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_queue_groups_of_other_servers_are_bounded_all_together(pair, monkeypatch):
    """Worst input: several names, each with as many queue groups as one server may have. The bound is on
    all of them together: two forged servers of 80 groups each make this one keep 100, not 160."""
    from pulsyflux.cluster import registry

    monkeypatch.setattr(registry, "MAX_REMOTE_GROUPS", 100)
    a, _ = pair
    intruder = await _intruder(a)
    names = ("ghost1", "ghost2")
    try:
        for name in names:
            await intruder.execute("SADD", f"pulsyflux:groups:{name}", *(b"news.*\x00g%d" % n for n in range(80)))
            await intruder.execute("SET", f"pulsyflux:node:{name}", "1", "PX", "30000")
            await intruder.execute("SADD", "pulsyflux:nodes", name)
        await _announce(intruder, "!", "ghost1")
        await eventually(lambda: all(name in a.cluster.registry.remote_groups for name in names))
        assert sum(len(groups) for groups in a.cluster.registry.remote_groups.values()) == 100
        assert a.cluster.registry.sets_read_in_part >= 1
    finally:
        for name in names:
            await intruder.execute("SREM", "pulsyflux:nodes", name)
            await intruder.execute("DEL", f"pulsyflux:node:{name}", f"pulsyflux:groups:{name}")
        intruder.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_one_server_holds_at_most_its_share_of_another_and_the_rest_are_served(pair, redis_server, monkeypatch):
    from pulsyflux import ServerOverloaded
    from pulsyflux.cluster import requests as cluster_requests

    monkeypatch.setattr(cluster_requests, "MAX_FROM_ONE", 3)
    a, b = pair
    channel = uuid.uuid4()
    stuck: list[defer.Deferred] = []

    def handler(body: bytes):
        if body != b"hold":
            return body
        stuck.append(defer.Deferred())
        return stuck[-1]

    provider = await Provider.connect(_address(b), channel, handler=handler)
    consumer = await Consumer.connect(_address(a), channel)
    intruder = await _intruder(b)
    c = await _node(redis_server, "c")
    held = []
    try:
        await eventually(lambda: _relays_to(a, "b", channel) and _relays_to(c, "b", channel))
        held = [consumer.send(b"hold", timeout=30) for _ in range(3)]
        await eventually(lambda: b.cluster.requests.held_from.get("a") == 3)
        with pytest.raises(ServerOverloaded) as refused:
            await consumer.send(b"one too many")
        assert "server b holds as many requests from this server as it takes from one (3 requests" in str(refused.value)
        # The worst input: a flood under one name (a faulty server, or anyone who can write to Redis) fills that
        # name's share and no more; every request past it is answered at once and counted.
        head = b" " + channel.bytes.hex().encode() + b" 0\nhold"
        for i in range(200):
            await intruder.execute("SPUBLISH", "pulsyflux:n:b", b"q mallory flood%d" % i + head)
        await eventually(lambda: b.cluster.requests.refused_from_one == 1 + 197)
        assert b.cluster.requests.held_from == {"a": 3, "mallory": 3}
        assert b.cluster.stats()["requests_refused_from_one"] == 198 and b.cluster.stats()["requests_held"] == 6
        # A third server is not starved: its requests are served while a's and mallory's shares are full.
        other = await Consumer.connect(_address(c), channel)
        try:
            assert await other.send(b"from c") == b"from c"
        finally:
            await other.close()
    finally:
        for d in stuck:
            d.callback(b"done")
        assert await defer.gatherResults(held) == [b"done"] * len(held)
        intruder.transport.loseConnection()
        await consumer.close()
        await provider.close()
        await c.stopService()


@pytest_twisted.ensureDeferred
async def test_requests_from_redis_reach_only_channels_a_client_provides_here(pair):
    """Worst input: forged requests naming channels nobody provides here (each would be a record in the
    router), a channel spelt in capitals, and a subscriber's channel (the inlet is trusted, the guard must
    hold): none opens an inlet or reaches anyone, and the asking "server" is told peer disappeared."""

    from pulsyflux.broker import BrokerClient

    a, b = pair
    answers: list[bytes] = []
    listener = await _inbox_of(b, b"mallory", answers)
    intruder = await _intruder(b)
    subscriber = await BrokerClient.connect(_address(b))
    try:
        subscription = await subscriber.subscribe("orders.eu")
        router = b.cluster.requests.router
        await eventually(lambda: bool(router.guarded))
        (private,) = router.guarded  # the subscription's channel, where the broker forwards
        channel = uuid.uuid4()
        provider = await Provider.connect(_address(b), channel, handler=lambda body: body)
        forged = [uuid.uuid4().bytes.hex() for _ in range(100)]
        forged += [channel.bytes.hex().upper(), private.hex()]
        for i, hex_id in enumerate(forged):
            await intruder.execute("SPUBLISH", "pulsyflux:n:b", b"q mallory f%d %s 0\nfake" % (i, hex_id.encode()))
        await intruder.execute(
            "SPUBLISH", "pulsyflux:n:b", b"q mallory real " + channel.bytes.hex().encode() + b" 0\nok"
        )
        await eventually(lambda: len(answers) == len(forged) + 1)
        assert sorted(answers)[-1] == b"r b real ok 0\nok"  # the one a client provides here is served
        assert all(answer.endswith(b" err 0\npeer disappeared") for answer in sorted(answers)[:-1])
        assert list(b.cluster.requests.inlets) == [channel.bytes]  # one record, for the channel provided
        assert b.cluster.requests.held_from == {} and subscription.pending == 0
        await provider.close()
    finally:
        intruder.transport.loseConnection()
        listener.transport.loseConnection()
        await subscriber.close()


@pytest_twisted.ensureDeferred
async def test_a_subscribers_channel_is_never_advertised_to_other_servers(pair):
    """A subscription's channel has a client provider (the subscriber) but is the broker's to send on:
    it is not kept in Redis for other servers to relay to (its id is the subscription's secret)."""
    from pulsyflux.broker import BrokerClient

    a, b = pair
    intruder = await _intruder(b)
    subscriber = await BrokerClient.connect(_address(b))
    channel = uuid.uuid4()
    provider = await Provider.connect(_address(b), channel, handler=lambda body: body)
    try:
        await subscriber.subscribe("orders.eu")
        await eventually(lambda: _relays_to(a, "b", channel))  # a's reads see b's channels now
        # and one read more, begun after the subscription: a read already under way may still have met the
        # subscriber's channel in the moment between its registration and the broker guarding it
        registry = a.cluster.registry
        heard = registry.heard
        await _announce(intruder, "!", "mallory")
        await eventually(lambda: registry.heard > heard and not registry._reading)
        (private,) = b.cluster.requests.router.guarded
        assert b.cluster.registry.held == {channel.bytes}
        assert await intruder.execute("SMEMBERS", "pulsyflux:chans:b") == [channel.bytes]
        assert [key for key in a.cluster.requests.relays if key[1] == private] == []
    finally:
        intruder.transport.loseConnection()
        await subscriber.close()
        await provider.close()


@pytest_twisted.ensureDeferred
async def test_a_forged_server_in_redis_gets_no_share_of_the_brokers_or_a_subscribers_channel(pair):
    """Worst input: whoever writes to Redis says it holds this server's broker channel and a subscriber's
    channel (which it may read there before the broker takes it). Its relays must not take a share of the
    publishes, subscribe announcements (which carry private channel ids) or forwards routed there."""

    from pulsyflux.broker import BrokerClient

    a, b = pair
    leaked: list[bytes] = []
    listener = await _inbox_of(b, b"ghost", leaked)
    intruder = await _intruder(b)
    subscriber = await BrokerClient.connect(_address(b), heartbeat=None)
    publisher = await BrokerClient.connect(_address(b), heartbeat=None)
    try:
        subscription = await subscriber.subscribe("orders")
        router = b.cluster.requests.router
        (private,) = router.guarded
        broker_channel = b.broker_channel.bytes
        await _forge_server(intruder, "ghost", private, broker_channel)
        await _announce(intruder, "+", "ghost", private)
        await eventually(lambda: _relays_to(b, "ghost", uuid.UUID(bytes=private)))
        await eventually(lambda: _relays_to(b, "ghost", uuid.UUID(bytes=broker_channel)))
        for n in range(20):
            await publisher.publish("orders", b"%d" % n)
        assert [(await subscription.get()).payload for _ in range(20)] == [b"%d" % n for n in range(20)]
        other = await subscriber.subscribe("billing")  # an announcement: a private channel id in it
        await publisher.publish("billing", b"x")
        assert (await other.get()).payload == b"x"
        await listener.ping()
        assert leaked == []
    finally:
        await intruder.execute("SREM", "pulsyflux:nodes", "ghost")
        await intruder.execute("DEL", "pulsyflux:node:ghost", "pulsyflux:chans:ghost")
        intruder.transport.loseConnection()
        listener.transport.loseConnection()
        await publisher.close()
        await subscriber.close()
