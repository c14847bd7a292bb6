"""The binary broker encoding between our own clients and broker (docs/protocol.md, pulsyflux extension).

The codec and its worst inputs (sans-I/O), then the negotiation and a mixed
set of JSON-only (Go-like) and binary subscribers on one topic, in memory and
over TCP.
"""

from __future__ import annotations

import random
import struct
import uuid

import pytest
import pytest_twisted

from pulsyflux import Broker, BrokerClient, Consumer
from pulsyflux.broker.link import OK_BINARY, reads_binary
from pulsyflux.testing import start_server
from pulsyflux.wire import messages
from pulsyflux.wire.messages import BINARY_MAGIC, Message, MessageError

from .helpers import clocked, json_subscriber

SAMPLES = [
    ("orders", b"new order", {"priority": "high"}),
    ("t", None, None),
    ("t", b"", {}),
    ("caf\u00e9.\u20ac", bytes(range(256)), {"k\u00e9y": "v\u00e4lue", "<&>": "\u2028"}),
    ("lone.\ud800", b"x", {"\udfff": "y"}),  # travels as JSON would carry it (escaped there)
]


def _batch(*records: bytes) -> bytes:
    return messages.encode_records(list(records))


# -- the codec --------------------------------------------------------------------


def test_records_read_back_as_the_messages_they_were():
    body = _batch(*(messages.encode_record(t, p, h) for t, p, h in SAMPLES))
    assert messages.is_binary(body) and not messages.is_binary(b'{"Topic":"t"}')
    got = messages.decode_body(body)
    assert got == [Message(t, p or b"", h) for t, p, h in SAMPLES]
    # The broker's view keeps Go's nil apart from empty, so the JSON it makes is the publisher's own.
    for (topic, record, payload, headers), (t, p, h) in zip(messages.split_binary(body), SAMPLES):
        assert (topic, payload, headers) == (t, p, h)
        assert messages.convert(record, False) == messages.encode_text(t, p, h)
        assert messages.convert(messages.encode_text(t, p, h), True) == record


def test_a_position_travels_with_its_record():
    body = _batch(messages.encode_record("t", b"x", None, position="5f2c0a9e1b1:42"))
    [msg] = messages.decode_body(body)
    assert msg.position == messages.Position("5f2c0a9e1b1", 42)
    record = body[len(BINARY_MAGIC) :]
    assert (
        messages.convert(record, False) == '{"Topic":"t","Payload":"eA==","Headers":null,"Position":"5f2c0a9e1b1:42"}'
    )


def test_an_empty_binary_batch_holds_no_message():
    assert messages.decode_body(BINARY_MAGIC) == [] and messages.split_binary(BINARY_MAGIC) == []


def _read(body: bytes) -> list:
    """Both readers of a binary body must agree: the same messages, or both a MessageError."""
    try:
        decoded = messages.decode_body(body)
    except MessageError:
        with pytest.raises(MessageError):
            messages.split_binary(body)
        raise
    split = messages.split_binary(body)
    assert [(m.topic, m.payload, m.headers) for m in decoded] == [(t, p or b"", h or {}) for t, _, p, h in split]
    return decoded


def test_worst_input_every_truncation_is_refused_or_a_whole_prefix():
    records = [messages.encode_record(t, p, h) for t, p, h in SAMPLES]
    records.append(messages.encode_record("t", b"y", {"a": "b"}, position="e:1"))
    body = _batch(*records)
    whole = messages.decode_body(body)
    ends = {len(BINARY_MAGIC) + sum(len(r) for r in records[:n]) for n in range(len(records) + 1)}
    for cut in range(len(BINARY_MAGIC), len(body)):
        if cut in ends:  # a cut between records is a shorter batch (a frame's length says where a body ends)
            assert _read(body[:cut]) == whole[: sorted(ends).index(cut)]
        else:
            with pytest.raises(MessageError, match="not a binary batch"):
                _read(body[:cut])


@pytest.mark.parametrize(
    "record, fragment",
    [
        (struct.pack(">BIII", 0, 0xFFFFFFFF, 0, 0), "longer than the body"),  # 4 GiB topic: never allocated
        (struct.pack(">BIII", 0, 1, 0xFFFFFFFF, 0) + b"t", "longer than the body"),
        (struct.pack(">BIII", 0, 1, 0, 0xFFFFFFFF) + b"t", "more headers than the body holds"),
        (struct.pack(">BIII", 0, 1, 0, 1) + b"t" + struct.pack(">I", 0xFFFFFFF0) + b"k" * 8, "header longer"),
        (struct.pack(">BIII", 0, 2, 0, 0) + b"\xc3\x28", "not UTF-8"),  # bad UTF-8 topic
        (struct.pack(">BIII", 0, 1, 0, 1) + b"t" + struct.pack(">I", 1) + b"\xff" + struct.pack(">I", 0), "not UTF-8"),
        (struct.pack(">BIII", 0x80, 1, 0, 0) + b"t", "unknown flags"),
        (struct.pack(">BIII", 1, 1, 3, 0) + b"tabc", "a null payload with a length"),
        (struct.pack(">BIII", 2, 1, 0, 1) + b"t" + struct.pack(">I", 0) * 2, "null headers with a count"),
        (struct.pack(">BIII", 4, 1, 0, 0) + b"t" + b"\x09e:1", "truncated position"),
        (struct.pack(">BIII", 4, 1, 0, 0) + b"t" + b"\x03\xff:1", "not UTF-8"),
        (b"\x00\x00", "truncated record header"),
    ],
)
def test_worst_input_lengths_flags_and_text_are_refused_clearly(record, fragment):
    with pytest.raises(MessageError, match=fragment):
        _read(BINARY_MAGIC + record)


def test_worst_input_random_bytes_are_a_message_error_or_messages_never_anything_else():
    rng = random.Random(13)
    good = _batch(*(messages.encode_record(t, p, h) for t, p, h in SAMPLES))
    for _ in range(3000):
        if rng.random() < 0.5:
            body = BINARY_MAGIC + bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        else:  # a valid batch with a few bytes changed
            mutable = bytearray(good)
            for _ in range(rng.randrange(1, 4)):
                mutable[rng.randrange(len(BINARY_MAGIC), len(mutable))] = rng.randrange(256)
            body = bytes(mutable)
        try:
            _read(body)
        except MessageError as error:
            assert len(str(error)) < 200  # one bounded line, never the input echoed


def test_a_body_that_only_starts_like_one_is_json_and_refused_as_json():
    with pytest.raises(MessageError, match="not a JSON message"):
        messages.decode_body(b"\xffPB")  # not the whole magic


def test_the_answers_that_offer_the_encoding():
    assert reads_binary(OK_BINARY) and reads_binary(b"ok other,pfb1")
    assert not reads_binary(b"ok") and not reads_binary(b"resumed") and not reads_binary(b"[]")


# -- the negotiation, and mixed subscribers -----------------------------------------------


@clocked
async def test_mixed_subscribers_each_get_their_encoding_each_made_once_per_message(memory, monkeypatch):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)
    publisher = await memory.connect(BrokerClient, channel, heartbeat=None)
    assert publisher._publisher.binary  # the broker answered the empty batch with "ok pfb1"
    readers = await memory.connect(BrokerClient, channel, heartbeat=None)
    binary_subs = [await readers.subscribe("mixed") for _ in range(2)]
    local = await broker.subscribe("mixed")  # in the broker's process: binary too
    json_subs = [await json_subscriber(memory, channel, "mixed") for _ in range(2)]
    outlets = broker.fanout.outlets.values()
    assert sorted(o.binary for o in outlets) == [False, False, True, True, True]

    made = []
    encode_text = messages.encode_text
    monkeypatch.setattr(messages, "encode_text", lambda *a: made.append(a) or encode_text(*a))
    sent = [("mixed", b"one", None), ("mixed", b"two", {"k": "v"}), ("mixed", b"", {})]
    for topic, payload, headers in sent:
        publisher.publish(topic, payload, headers)
    await publisher.publish("mixed", b"last")
    sent.append(("mixed", b"last", None))
    assert len(made) == len(sent)  # JSON made once per message, for both JSON subscribers

    for sub in [*binary_subs, local]:
        got = [await sub.get() for _ in sent]
        assert got == [Message(t, p, h) for t, p, h in sent]
    for provider, _ in json_subs:
        bodies = []
        while sum(len(messages.decode_body(b)) for b in bodies) < len(sent):
            request = await provider.receive()
            bodies.append(request.payload)
            provider.respond(request, b"ok")
        texts = [messages.encode_text(t, p, h) for t, p, h in sent]
        # Byte for byte the JSON a JSON publisher would have sent: Go's nil stays null, {} stays {}.
        assert b"".join(bodies) == b"".join(messages.encode_batch(texts[i : i + n]) for i, n in _spans(bodies))
    for provider, announcer in json_subs:
        await provider.close()
        await announcer.close()
    await publisher.close()
    await readers.close()
    await broker.close()


def _spans(bodies: list) -> list:
    spans, start = [], 0
    for body in bodies:
        n = len(messages.decode_body(body))
        spans.append((start, n))
        start += n
    return spans


@clocked
async def test_a_json_publish_reaches_binary_subscribers_as_records_and_json_ones_unchanged(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)
    readers = await memory.connect(BrokerClient, channel, heartbeat=None)
    sub = await readers.subscribe("go")
    provider, announcer = await json_subscriber(memory, channel, "go")
    go_publisher = await memory.connect(Consumer, channel)  # a Go publisher: one JSON object per request
    body = b'{"Topic":"go","Payload":"aGk=","Headers":{"k":"v"}}'
    assert await go_publisher.send(body) == b"ok"
    assert await sub.get() == Message("go", b"hi", {"k": "v"})
    request = await provider.receive()
    assert request.payload == body  # the Go publisher's bytes, unchanged
    provider.respond(request, b"ok")
    for closing in (go_publisher, provider, announcer, readers, broker):
        await closing.close()


@clocked
async def test_a_broker_that_does_not_offer_it_gets_json(memory, monkeypatch):
    """An older pulsyflux broker answers the empty batch with a plain "ok": the publisher keeps to JSON."""
    from pulsyflux.broker import fanout

    monkeypatch.setattr(fanout, "OK_BINARY", b"ok")
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)
    publisher = await memory.connect(BrokerClient, channel, heartbeat=None)
    assert not publisher._publisher.binary
    seen = []
    handle = broker.fanout.handle
    monkeypatch.setattr(broker._provider, "handler", lambda body: seen.append(body) or handle(body))
    sub = await broker.subscribe("old")
    await publisher.publish("old", b"x")
    assert await sub.get() == Message("old", b"x")
    assert seen and not any(messages.is_binary(body) for body in seen)
    await publisher.close()
    await broker.close()


@clocked
async def test_a_queue_group_member_that_reads_only_json_gets_a_binary_members_backlog_as_json(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel, batch=1, window=1)
    readers = await memory.connect(BrokerClient, channel, heartbeat=None)
    binary_member = await readers.subscribe("jobs", group="w", buffer=1)
    provider, announcer = await json_subscriber(memory, channel, "jobs")  # not in the group: sees everything
    json_member, _ = await json_subscriber(memory, channel, "jobs", group="w", announcer=announcer)
    for n in range(6):
        await broker.publish("jobs", b"%d" % n)
    await readers.unsubscribe("jobs")  # the binary member leaves with messages waiting for it
    got = [await binary_member.get() for _ in range(binary_member.pending)]
    bodies = []
    while len(got) + sum(len(messages.decode_body(b)) for b in bodies) < 6:
        request = await json_member.receive()
        assert not messages.is_binary(request.payload)  # handed over as JSON
        bodies.append(request.payload)
        json_member.respond(request, b"ok")
    handed = [m for b in bodies for m in messages.decode_body(b)]
    assert sorted(m.payload for m in [*got, *handed]) == [b"%d" % n for n in range(6)]
    for closing in (json_member, provider, announcer, readers, broker):
        await closing.close()


@clocked
async def test_a_binary_queue_group_member_gets_a_json_members_backlog_in_binary(memory, monkeypatch):
    """The hand-over converts both ways: an outlet's backlog holds only its own encoding (Outlet.flush takes it whole)."""
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel, batch=1, window=1)
    json_member, announcer = await json_subscriber(memory, channel, "jobs", group="w")
    readers = await memory.connect(BrokerClient, channel, heartbeat=None)
    binary_member = await readers.subscribe("jobs", group="w")
    [binary_outlet] = [o for o in broker.fanout.outlets.values() if o.binary]
    json_forwards = []
    send = binary_outlet.consumer.send
    monkeypatch.setattr(
        binary_outlet.consumer, "send", lambda body, **kw: json_forwards.append(body) or send(body, **kw)
    )
    for n in range(8):
        await broker.publish("jobs", b"%d" % n)
    [json_outlet] = [o for o in broker.fanout.outlets.values() if not o.binary]
    assert json_outlet.backlog and all(
        type(text) is str for text in json_outlet.backlog
    )  # its first forward unanswered
    await json_member.close()  # leaves: what waited for it (and its forward) goes to the other member
    got = [await binary_member.get() for _ in range(8)]
    assert sorted(m.payload for m in got) == [b"%d" % n for n in range(8)]
    assert json_forwards == []  # every forward to the binary member was binary (Consumer.send_parts)
    assert broker.fanout.stats()["lost"] == 0
    for closing in (announcer, readers, broker):
        await closing.close()


@pytest_twisted.ensureDeferred
async def test_over_tcp_a_binary_publisher_and_subscriber_through_a_broker_service():
    running = await start_server()
    try:
        publisher = await BrokerClient.connect(running.address, heartbeat=None)
        subscriber = await BrokerClient.connect(running.address, heartbeat=None)
        sub = await subscriber.subscribe("tcp")
        assert publisher._publisher.binary
        [outlet] = running.broker.fanout.outlets.values()
        assert outlet.binary
        sent = [Message("tcp", bytes([n % 256]) * n, {"n": str(n)} if n % 2 else None) for n in range(300)]
        for msg in sent:
            publisher.publish(msg.topic, msg.payload, msg.headers or None)
        assert [await sub.get() for _ in sent] == sent  # all of them, in order
        assert running.broker.stats()["dropped"] == 0
        await publisher.close()
        await subscriber.close()
    finally:
        await running.stop()
