"""What works with Go programs (docs/broker.md, "Go programs"): each claim over TCP, Go's side as raw frames.

The Go peers here write and read the frames the Go original does, byte for
byte (shared wire vectors: registration 1, request 2, response 4, provider
error 5, broker JSON 7; the Go broker's answers as broker.go writes them):

* a Go ``socket.Consumer`` publishing JSON to our broker: accepted, ``ok``;
* a Go ``socket.Provider`` subscribing with ``$pulsyflux/subscribe``: gets the probe, then the messages;
* a Go ``broker.NewBroker`` on our server's broker channel: refused (``channel reserved``);
* our ``BrokerClient`` publishing to a Go broker: works, one plain message per request;
  subscribing to one fails at once with one clear error.
"""

from __future__ import annotations

import json
import uuid

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from pulsyflux import BrokerClient, BrokerService, PulsyfluxError
from pulsyflux.wire import codec, messages

from .wire import RawClient, connect_raw, register_frames, request_frames

ensure = pytest_twisted.ensureDeferred

# Wire vector 7: Message{Topic:"t",Payload:[]byte("hi"),Headers:{"k":"v"}} as Go's json.Marshal writes it.
GO_JSON = bytes.fromhex(
    "7b22546f706963223a2274222c225061796c6f6164223a2261476b3d222c2248656164657273223a7b226b223a2276227d7d"
)
# What Go's json.Unmarshal says to broker.go's handleMessage for our first request body, "[]".
GO_ARRAY_ERROR = b"json: cannot unmarshal array into Go value of type broker.Message"


def within(d: Deferred, seconds: float = 20.0) -> Deferred:
    return d.addTimeout(seconds, reactor)


class GoBroker(RawClient):
    """The Go broker's Provider (broker.go handleMessage on a Go socket.Provider), frame for frame.

    Each request body is json.Unmarshal-ed into one broker.Message: an
    array fails with Go's error text in an ERROR frame (routing first:
    vector 5); a message object is answered RESPONSE_START (routing),
    RESPONSE_CHUNK "ok", RESPONSE_END (vector 4). Go's broker forwards to
    its own subscribers, which never include ours.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []
        self.most_in_flight = 0
        self._open: dict[bytes, tuple[bytes, bytearray]] = {}  # request id -> (routing, body)
        self._seen = 0
        self._waiters: list[tuple[int, Deferred]] = []  # type: ignore[assignment]

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        for frame in self.frames[self._seen :]:
            self._handle(frame)
        self._seen = len(self.frames)

    def _handle(self, frame: codec.Frame) -> None:
        if frame.type == codec.START:
            self._open[frame.request_id] = (frame.payload, bytearray())
            self.most_in_flight = max(self.most_in_flight, len(self._open))
        elif frame.type == codec.CHUNK:
            self._open[frame.request_id][1].extend(frame.payload)
        elif frame.type == codec.END:
            routing, body = self._open.pop(frame.request_id)
            self.bodies.append(bytes(body))
            rid = frame.request_id
            if body.lstrip()[:1] == b"[":
                self.send(codec.encode_frame(codec.ERROR, rid, routing + GO_ARRAY_ERROR))
            elif not body:
                self.send(codec.encode_frame(codec.ERROR, rid, routing + b"unexpected end of JSON input"))
            else:
                self.send(
                    codec.encode_frame(codec.RESPONSE_START, rid, routing),
                    codec.encode_frame(codec.RESPONSE_CHUNK, rid, b"ok"),
                    codec.encode_frame(codec.RESPONSE_END, rid),
                )


async def _go_broker(server, channel: uuid.UUID) -> GoBroker:
    go = await connect_raw_as(server, GoBroker())
    go.send(register_frames(codec.ROLE_PROVIDER, uuid.uuid4().bytes, channel.bytes))
    return go


def connect_raw_as(server, protocol: RawClient) -> Deferred:
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server.port), protocol)


@ensure
async def test_our_publisher_detects_a_go_broker_and_sends_it_single_messages(server):
    channel = uuid.uuid4()
    go = await _go_broker(server, channel)
    client = await within(BrokerClient.connect(server.address, channel))
    assert client.go_broker
    assert go.bodies == [b"[]"]  # the probe it answered with Go's error
    published = [client.publish("t", b"hi", {"k": "v"}) for _ in range(3)] + [client.publish("u")]
    results = [await within(d) for d in published]
    assert results == [None] * 4  # accepted; a Go broker gives no positions
    assert go.bodies[1:] == [GO_JSON] * 3 + [messages.encode("u", b"", None)]  # plain objects, byte for byte
    assert go.most_in_flight == 1  # one at a time: its goroutines could swap two in flight
    await client.close()
    go.transport.loseConnection()


@ensure
async def test_subscribing_through_a_go_broker_fails_at_once_with_one_clear_error(server):
    channel = uuid.uuid4()
    go = await _go_broker(server, channel)
    client = await within(BrokerClient.connect(server.address, channel))
    with pytest.raises(PulsyfluxError, match="is a Go broker .* has no subscriptions from other processes"):
        await client.subscribe("t")
    assert go.bodies == [b"[]"]  # nothing was announced to it
    await client.close()
    go.transport.loseConnection()


@ensure
async def test_another_error_from_the_first_request_is_still_an_error(server):
    channel = uuid.uuid4()
    go = await connect_raw_as(server, RawClient())
    go.send(register_frames(codec.ROLE_PROVIDER, uuid.uuid4().bytes, channel.bytes))
    connecting = BrokerClient.connect(server.address, channel)
    start, _, _end = await within(go.wait_frames(3))  # the "[]" probe (START, CHUNK, END)
    go.send(codec.encode_frame(codec.ERROR, start.request_id, start.payload + b"something else"))
    with pytest.raises(PulsyfluxError, match="something else"):
        await within(connecting)
    go.transport.loseConnection()


# -- Go programs against our broker ----------------------------------------------


async def _service() -> BrokerService:
    service = BrokerService("tcp:0:interface=127.0.0.1", broker_channel=uuid.uuid4())
    service.startService()
    await within(service.whenReady())
    return service


class _Server:
    def __init__(self, service: BrokerService) -> None:
        self.port = service.server.port.getHost().port
        self.address = f"127.0.0.1:{self.port}"


@ensure
async def test_a_go_consumer_publishing_json_to_our_broker_is_answered_ok_and_forwarded_unchanged():
    service = await _service()
    server = _Server(service)
    client = await within(BrokerClient.connect(server.address, service.broker_channel))
    sub = await within(client.subscribe("t"))
    go = await connect_raw(server)
    go_client = uuid.uuid4().bytes
    go.send(register_frames(codec.ROLE_CONSUMER, go_client, service.broker_channel.bytes))
    rid = uuid.uuid4().bytes
    go.send(request_frames(rid, go_client, service.broker_channel.bytes, GO_JSON))
    start, chunk, end = await within(go.wait_frames(3))
    assert (start.type, chunk.type, chunk.payload, end.type) == (
        codec.RESPONSE_START,
        codec.RESPONSE_CHUNK,
        b"ok",
        codec.RESPONSE_END,
    )
    assert start.payload == go_client + service.broker_channel.bytes  # the routing, as vector 4
    msg = await within(sub.get())
    assert (msg.topic, msg.payload, msg.headers) == ("t", b"hi", {"k": "v"})
    go.transport.loseConnection()
    await client.close()
    await service.stopService()


@ensure
async def test_a_go_provider_subscribing_with_the_control_message_gets_the_probe_then_messages():
    service = await _service()
    server = _Server(service)
    channel = uuid.uuid4()
    go_sub = await connect_raw(server)
    go_sub.send(register_frames(codec.ROLE_PROVIDER, uuid.uuid4().bytes, channel.bytes))
    go_pub = await connect_raw(server)
    go_client = uuid.uuid4().bytes
    go_pub.send(register_frames(codec.ROLE_CONSUMER, go_client, service.broker_channel.bytes))
    announce = messages.encode(messages.SUBSCRIBE, None, {"topic": "t", "channel": str(channel)})
    assert announce == (
        b'{"Topic":"$pulsyflux/subscribe","Payload":null,"Headers":{"channel":"' + str(channel).encode() + b'",'
        b'"topic":"t"}}'
    )
    go_pub.send(request_frames(uuid.uuid4().bytes, go_client, service.broker_channel.bytes, announce))

    async def answer(count: int) -> bytes:
        frames = await within(go_sub.wait_frames(count))
        start, chunk, end = frames[-3:]
        go_sub.send(
            codec.encode_frame(codec.RESPONSE_START, start.request_id, start.payload),
            codec.encode_frame(codec.RESPONSE_CHUNK, start.request_id, b"ok"),
            codec.encode_frame(codec.RESPONSE_END, start.request_id),
        )
        return chunk.payload

    probe = await answer(3)
    assert json.loads(probe)["Topic"] == messages.PROBE
    answered = await within(go_pub.wait_frames(3))
    assert answered[1].payload == b"ok"  # the plain answer, as before history existed
    await within(service.publish("t", b"hi", {"k": "v"}))
    assert messages.decode(await answer(6)) == messages.Message("t", b"hi", {"k": "v"})
    go_sub.transport.loseConnection()
    go_pub.transport.loseConnection()
    await service.stopService()


@ensure
async def test_a_go_broker_on_our_servers_broker_channel_is_refused():
    service = await _service()
    server = _Server(service)
    go = await connect_raw(server)
    go.send(register_frames(codec.ROLE_PROVIDER, uuid.uuid4().bytes, service.broker_channel.bytes))
    (error,) = await within(go.wait_frames(1))
    assert error.type == codec.ERROR
    assert codec.error_message(error.payload).startswith("channel reserved")
    go.transport.loseConnection()
    await service.stopService()
