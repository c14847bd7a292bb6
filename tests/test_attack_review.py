"""Worst inputs against what landed on 2026-11-30 (binary encoding, request path, relays)."""

from __future__ import annotations

import json
import uuid

from pulsyflux import Broker, BrokerClient, Consumer, Provider
from pulsyflux.wire import messages

from .helpers import clocked, json_subscriber


def test_a_publishers_position_cannot_inject_json_when_converted():
    """A record's position comes from a publisher (a broker without history forwards records as they
    came): turned into JSON for a JSON-only reader it must stay one well-formed message of its topic."""
    forged = '1:1","Topic":"admin'
    record = messages.encode_record("jobs", b"x", None, position=forged)
    text = messages.convert(record, False)
    obj = json.loads(text)
    assert obj["Topic"] == "jobs" and list(obj).count("Topic") == 1
    assert messages.decode_body(text.encode()) == [messages.Message("jobs", b"x")]
    for bad in ('"', "\\", "a:b", "x" * 200):
        assert json.loads(messages.convert(messages.encode_record("t", b"", None, position=bad), False))
    # And back: a JSON text whose Position is no position (a Go publisher's) converts without an exception.
    for bad in ["\u00e9:1", "9" * 300, 5]:
        text = json.dumps({"Topic": "t", "Payload": None, "Headers": None, "Position": bad})
        assert messages.decode_body(messages.BINARY_MAGIC + messages.convert(text, True)) == [
            messages.Message("t", b"")
        ]


@clocked
async def test_a_binary_publisher_cannot_forge_the_topic_a_json_queue_member_reads(memory):
    """A hostile publisher's records carry a position that would close the JSON string; handed over
    from a binary member to a JSON-only (Go) member they still decode, with their own topic."""
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel, batch=1, window=1)
    readers = await memory.connect(BrokerClient, channel, heartbeat=None)
    binary_member = await readers.subscribe("jobs", group="w", buffer=1)
    json_member, announcer = await json_subscriber(memory, channel, "jobs", group="w")
    forged = '1:1","Topic":"admin","Payload":"AA=="'
    body = messages.encode_records([messages.encode_record("jobs", b"%d" % n, None, position=forged) for n in range(6)])
    assert await announcer.send(body) == b"ok"
    await readers.unsubscribe("jobs")  # the binary member leaves with records waiting for it
    got = [await binary_member.get() for _ in range(binary_member.pending)]
    handed = []
    while len(got) + len(handed) < 6:
        request = await json_member.receive()
        handed += messages.decode_body(request.payload)  # a MessageError here: the JSON was broken
        json_member.respond(request, b"ok")
    assert {m.topic for m in handed} == {"jobs"}
    assert sorted(m.payload for m in [*got, *handed]) == [b"%d" % n for n in range(6)]
    for closing in (json_member, announcer, readers, broker):
        await closing.close()


def test_a_binary_publish_too_large_as_json_does_not_cost_go_subscribers_their_subscription():
    """Raw bytes are 3/4 of their base64 and a NUL header byte is six in JSON: a binary message the server
    took may be too large once made JSON for a Go subscriber. It must not end that subscriber's subscription."""
    from pulsyflux.testing import MemoryServer

    memory = MemoryServer(max_body=3000)  # a publish may be wire_limit(3000) bytes: ~1 MiB

    async def attack():
        provider, announcer = await json_subscriber(memory, memory.broker_channel, "t")
        publisher = await memory.connect(Consumer, memory.broker_channel)
        big = messages.encode_records([messages.encode_record("t", b"x" * (1 << 20), None)])
        assert len(big) <= messages.wire_limit(3000)  # the server takes it
        try:
            await publisher.send(big)
        except Exception:
            pass  # refused at once is fine too
        small = publisher.send(messages.encode("t", b"after", None))
        seen = []
        while not seen or seen[-1].payload != b"after":
            request = await provider.receive()
            seen += messages.decode_body(request.payload)
            provider.respond(request, b"ok")
        assert await small == b"ok"
        assert messages.DROPPED in [m.topic for m in seen]  # told, in the forward after
        assert memory.broker.stats()["dropped"] == 1
        [outlet] = memory.broker.fanout.outlets.values()
        assert outlet.open
        for closing in (publisher, announcer, provider):
            await closing.close()

    try:
        memory.run(attack())
    finally:
        memory.close()


def test_a_binary_publish_that_would_grow_sixfold_as_json_is_refused():
    """Worst input: 15 MiB of NUL header bytes (a message the server takes) would be 90 MiB of JSON, made
    for every Go subscriber, the history and the cluster: the broker refuses it as it refuses a JSON
    publish past its bound, and nothing is fanned out."""
    from pulsyflux.broker.subscription import MESSAGES_INCOMPLETE
    from pulsyflux.testing import MemoryServer
    from pulsyflux.wire.errors import RemoteError

    memory = MemoryServer()

    async def attack():
        provider, announcer = await json_subscriber(memory, memory.broker_channel, "t")
        publisher = await memory.connect(Consumer, memory.broker_channel)
        body = messages.encode_records([messages.encode_record("t", b"", {"k": "\x00" * (15 << 20)})])
        assert len(body) < MESSAGES_INCOMPLETE < len(messages.encode_text("t", b"", {"k": "\x00" * (15 << 20)}))
        try:
            await publisher.send(body)
        except RemoteError as error:
            assert "publish refused" in str(error)
        else:
            raise AssertionError("a publish six times larger as JSON was taken")
        assert memory.broker.stats()["published"] == 0
        for closing in (publisher, announcer, provider):
            await closing.close()

    try:
        memory.run(attack())
    finally:
        memory.close()


def test_deadlines_each_earlier_than_the_last_do_not_pile_up():
    """Worst input: a peer keeps one request waiting and sends requests answered at once, each with a
    deadline a little earlier than the one before (timeouts are up to 49 days): every entry is the new
    earliest. The stale entries (each holding its request) must still be compacted, through add and push."""
    from twisted.internet.task import Clock

    from pulsyflux.wire.deadlines import Deadlines

    for via_push in (False, True):
        clock = Clock()
        live: dict = {"held": object()}
        deadlines = Deadlines(clock, live, lambda key, value: None)
        deadlines.add("held", live["held"], 4_000_000.0)
        for n in range(10_000):
            live[n] = object()
            if via_push:
                if deadlines.push(n, live[n], clock.seconds() + 1_000_000.0 - n):
                    deadlines.arm()
            else:
                deadlines.add(n, live[n], 1_000_000.0 - n)
            del live[n]  # answered at once
            clock.advance(0.0001)
        assert len(deadlines._heap) <= 2 * len(live) + 64 + 1


@clocked
async def test_a_timeout_that_does_not_fit_the_frame_is_refused_and_leaves_nothing_behind(memory):
    """The START frame carries the timeout as 64-bit milliseconds: infinity, NaN or 10^20 s is the
    caller's mistake, told as such, and no pending request is left waiting for an answer that never comes."""
    import pytest

    channel = uuid.uuid4()
    provider = await memory.connect(Provider, channel)
    consumer = await memory.connect(Consumer, channel)
    for bad in (float("inf"), float("nan"), 1e20):
        with pytest.raises(ValueError, match="timeout must be"):
            consumer.send(b"x", timeout=bad)
    assert consumer.pending == 0
    answer = consumer.send(b"still works")
    request = await provider.receive()
    provider.respond(request, b"yes")
    assert await answer == b"yes"
    for closing in (consumer, provider):
        await closing.close()
