"""Hostile input: random and mutated frames next to well-behaved traffic.

A seeded generator (reproducible: the seed is in the test id) drives several
raw connections that send garbage, frames with wrong versions, lengths and
types, truncated metadata, and frames naming request ids that well-behaved
clients have in flight at the server, including responses with forged
routing. Meanwhile well-behaved consumers and providers run traffic. The
server must never log an error, and every well-behaved request must
complete with exactly its own answer.
"""

from __future__ import annotations

import os
import random
import struct
import uuid

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import LogLevel, globalLogPublisher

from pulsyflux import Consumer, Provider
from pulsyflux.wire import codec

from .helpers import eventually

ensure = pytest_twisted.ensureDeferred

REQUESTS = 12  # each honest consumer's requests, sent while the hostile connections run
BURSTS = 40  # each hostile connection's bursts, at least (it goes on while honest traffic does)
HOSTILE = 6  # hostile connections at once
HEADER = struct.Struct(">BBH16sI")


class Hostile(Protocol):
    """Reads and discards whatever the server says; remembers when it is closed."""

    def __init__(self) -> None:
        self.closed = False
        self.received = 0

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)

    def connectionLost(self, reason=None) -> None:
        self.closed = True


class Attacker:
    """Makes hostile byte strings from a seeded generator and what the server has in flight."""

    def __init__(self, rng: random.Random, server, channel: uuid.UUID, victims: list[bytes]) -> None:
        self.rng = rng
        self.server = server
        self.channel = channel.bytes
        self.victims = victims  # well-behaved consumers' client ids

    def in_flight_id(self) -> bytes:
        ids = list(self.server.factory.router.requests)
        return self.rng.choice(ids) if ids else os.urandom(16)

    def some_id(self) -> bytes:
        return self.in_flight_id() if self.rng.random() < 0.6 else os.urandom(16)

    def forged_routing(self) -> bytes:
        client = self.rng.choice(self.victims) if self.rng.random() < 0.8 else os.urandom(16)
        return client + (self.channel if self.rng.random() < 0.8 else os.urandom(16))

    def frame(self, ftype: int, request_id: bytes, payload: bytes = b"", flags: int = 0) -> bytes:
        return HEADER.pack(1, ftype, flags, request_id, len(payload)) + payload

    def register(self, role: int, channel: bytes) -> bytes:
        rid = os.urandom(16)
        meta = codec.pack_metadata(role, 5000, os.urandom(16), channel)
        return self.frame(codec.START, rid, meta, codec.FLAG_REGISTRATION) + self.frame(codec.END, rid)

    def burst(self) -> tuple[bytes, bool]:
        """Some hostile bytes, and whether they end the connection (bad version or length)."""
        rng = self.rng
        kind = rng.randrange(12)
        if kind == 0:
            return os.urandom(rng.randrange(1, 300)), True  # garbage: almost surely a bad version
        if kind == 1:
            return HEADER.pack(rng.choice([0, 2, 7, 255]), codec.START, 0, os.urandom(16), 0), True
        if kind == 2:
            return HEADER.pack(1, codec.CHUNK, 0, self.some_id(), codec.MAX_PAYLOAD + rng.randrange(1, 1 << 20)), True
        if kind == 3:  # any type, any flags, random payload
            payload = os.urandom(rng.randrange(0, 200))
            return self.frame(rng.randrange(256), self.some_id(), payload, rng.randrange(1 << 16)), False
        if kind == 4:  # START with truncated or padded metadata
            meta = codec.pack_metadata(codec.ROLE_CONSUMER, 100, os.urandom(16), self.channel)
            cut = rng.randrange(0, 60)
            return self.frame(codec.START, self.some_id(), (meta + os.urandom(20))[:cut]), False
        if kind == 5:  # START as a victim (their client id), with an id in flight, bad roles included
            routing = self.forged_routing()
            role = rng.choice([0, 1, 2, 3, 200])
            if role == codec.ROLE_PROVIDER:  # knowing a channel id is the right to serve it: not forged here
                routing = routing[:16] + os.urandom(16)
            meta = codec.pack_metadata(role, rng.randrange(0, 3000), routing[:16], routing[16:])
            return self.frame(codec.START, self.in_flight_id(), meta), False
        if kind == 6:  # request frames for someone else's request
            ftype = rng.choice([codec.CHUNK, codec.END])
            return self.frame(ftype, self.in_flight_id(), os.urandom(rng.randrange(0, 100))), False
        if kind == 7:  # a forged response to someone else's request, from a provider on another channel
            rid = self.in_flight_id()
            body = self.register(codec.ROLE_PROVIDER, os.urandom(16))
            body += self.frame(codec.RESPONSE_START, rid, self.forged_routing())
            body += self.frame(codec.RESPONSE_CHUNK, rid, b"forged")
            body += self.frame(
                rng.choice([codec.RESPONSE_END, codec.RESPONSE, codec.ERROR]), rid, self.forged_routing()
            )
            return body, False
        if kind == 8:  # a forged ERROR without registering at all
            return self.frame(codec.ERROR, self.in_flight_id(), self.forged_routing() + b"gotcha"), False
        if kind == 9:  # a valid exchange with random bytes flipped
            rid = os.urandom(16)
            good = self.register(codec.ROLE_CONSUMER, os.urandom(16)) + self.frame(
                codec.START, rid, codec.pack_metadata(codec.ROLE_CONSUMER, 500, os.urandom(16), os.urandom(16))
            )
            good += self.frame(codec.CHUNK, rid, os.urandom(50)) + self.frame(codec.END, rid)
            mutated = bytearray(good)
            for _ in range(rng.randrange(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            return bytes(mutated), True  # may break the stream: start afresh afterwards
        if kind == 10:  # a truncated frame, then the connection goes
            whole = self.frame(codec.CHUNK, self.some_id(), os.urandom(100))
            return whole[: rng.randrange(1, len(whole))], True
        # kind 11: a real request to the well-behaved channel as an unknown consumer (it is served)
        rid = os.urandom(16)
        meta = codec.pack_metadata(codec.ROLE_CONSUMER, 2000, os.urandom(16), self.channel)
        return self.frame(codec.START, rid, meta) + self.frame(codec.CHUNK, rid, b"x") + self.frame(
            codec.END, rid
        ), False


async def hostile_loop(server, attacker: Attacker, honest_done) -> int:
    """Keep one hostile connection open (a new one when it is closed) until it has sent
    ``BURSTS`` bursts and the honest traffic is over; returns bursts sent.

    Counted in work, not time: as strict on a loaded machine as on an idle one.
    """
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
    sent = 0

    def going() -> bool:
        return sent < BURSTS or not honest_done.called

    while going():
        proto = await connectProtocol(endpoint, Hostile())
        while going() and not proto.closed:
            data, ends = attacker.burst()
            proto.transport.write(data)
            sent += 1
            if ends:
                proto.transport.loseConnection()
                break
            await task.deferLater(reactor, 0, lambda: None)  # one reactor turn: the server reads it
        if not proto.closed:
            proto.transport.loseConnection()
    return sent


async def honest_loop(consumer: Consumer, rng: random.Random) -> int:
    done = 0
    while done < REQUESTS:
        body = os.urandom(rng.choice([0, 1, 100, 5000, 70000, 300000]))
        tag = os.urandom(8)
        reply = await consumer.send(tag + body, timeout=10)
        assert reply == b"ok:" + tag + body  # exactly its own answer, never a forged one
        done += 1
    return done


@pytest.fixture
def logged_errors():
    """Error-level (or failure-carrying) log events while the test runs."""
    events: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_failure") is not None or event.get("log_level") in (LogLevel.error, LogLevel.critical):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


@pytest.mark.parametrize("seed", [20261129])
@ensure
async def test_hostile_connections_never_disturb_well_behaved_traffic(server, seed, logged_errors):
    rng = random.Random(seed)
    channel = uuid.uuid4()
    providers = [await Provider.connect(server.address, channel, handler=lambda data: b"ok:" + data) for _ in range(2)]
    consumers = [await Consumer.connect(server.address, channel) for _ in range(3)]
    attacker = Attacker(random.Random(rng.random()), server, channel, [c.client_id.bytes for c in consumers])

    honest_done = gatherResults(
        [Deferred.fromCoroutine(honest_loop(c, random.Random(rng.random()))) for c in consumers], consumeErrors=True
    )
    hostile = [Deferred.fromCoroutine(hostile_loop(server, attacker, honest_done)) for _ in range(HOSTILE)]
    bursts = await gatherResults(hostile, consumeErrors=True)
    completed = await honest_done

    assert completed == [REQUESTS] * len(consumers)
    assert sum(bursts) >= HOSTILE * BURSTS, bursts
    assert server.factory.stats.protocol_errors > 0  # the hostile input did reach the server
    assert all(c.pending == 0 for c in consumers)
    for client in consumers + providers:
        await client.close()
    await eventually(lambda: not server.factory.router.connections)  # everyone, hostile or not, is gone
    assert server.factory.router.requests == {}  # and nothing of theirs is left behind
    assert not logged_errors, [e.get("log_format") for e in logged_errors]


@ensure
async def test_no_one_receives_another_consumers_response_by_forging(server, channel):
    """Extends test_socket's forged-provider case: forged ids and routing from consumers and outsiders."""
    honest = await Provider.connect(server.address, channel)
    victim = await Consumer.connect(server.address, channel)
    reply = victim.send(b"secret", timeout=5)
    request = await honest.receive()
    rid = request.id.bytes
    routing = victim.client_id.bytes + channel.bytes

    class Listener(Hostile):
        def __init__(self) -> None:
            super().__init__()
            self.frames: list = []
            self.decoder = codec.FrameDecoder()

        def dataReceived(self, data: bytes) -> None:
            self.frames.extend(self.decoder.feed(data))

    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
    thief = await connectProtocol(endpoint, Listener())  # poses as the victim: same client id, same channel
    meta = codec.pack_metadata(codec.ROLE_CONSUMER, 5000, victim.client_id.bytes, channel.bytes)
    thief.transport.write(
        codec.encode_frame(codec.START, os.urandom(16), meta, codec.FLAG_REGISTRATION)
        + codec.encode_frame(codec.START, rid, meta)  # claims the victim's request id: refused
        + codec.encode_frame(codec.END, rid)
        + codec.encode_frame(codec.ERROR, rid, routing + b"cancel it")  # not its provider: comes back to it
        + codec.encode_frame(0x42, rid)  # a marker the server answers last
    )
    await eventually(lambda: any(codec.error_message(f.payload) == "invalid message type" for f in thief.frames))
    messages = [codec.error_message(f.payload) for f in thief.frames]
    assert messages == ["duplicate request id", "cancel it", "invalid message type"]

    honest.respond(request, b"for the victim only")
    assert await reply == b"for the victim only"
    # A barrier, not a sleep: the answer to a second marker comes after anything already sent to the thief.
    thief.transport.write(codec.encode_frame(0x42, rid))
    await eventually(lambda: [f for f in thief.frames if codec.error_message(f.payload) == "invalid message type"][1:])
    assert all(f.type == codec.ERROR for f in thief.frames)  # the thief got no response frame
    thief.transport.loseConnection()
    await victim.close()
    await honest.close()
