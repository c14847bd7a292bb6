"""Retained history: positions, subscribe(since=..., last=...), recovered, resume after a drop.

In memory (MemoryServer) for the protocol, over TCP for what needs real
interleaving: publishes racing a replay, a subscriber whose lines drop.
"""

from __future__ import annotations

import uuid

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from pulsyflux import Broker, BrokerClient, BrokerService
from pulsyflux.testing import reset
from pulsyflux.wire import messages
from pulsyflux.wire.messages import Position

from .helpers import clocked, eventually
from .test_broker_reconnect import crash

ensure = pytest_twisted.ensureDeferred


def fast_backoff(attempt: int) -> float:
    return 0.05


def within(d: Deferred, seconds: float = 20.0) -> Deferred:
    """``d``, failing with TimeoutError rather than hanging the test."""
    return d.addTimeout(seconds, reactor)


def resumed(sub) -> Deferred:
    d: Deferred = Deferred()
    sub.on_resume(lambda s: None if d.called else d.callback(s))
    return d


@clocked
async def test_publish_fires_with_the_position_and_messages_carry_it(memory):
    broker = await memory.connect(Broker, uuid.uuid4(), history=10)
    sub = await broker.subscribe("orders")
    assert sub.position is not None and sub.position.seq == 0  # where it starts
    first = await broker.publish("orders", b"a")
    second = await broker.publish("orders", b"b")
    other = await broker.publish("invoices", b"c")
    assert isinstance(first, Position) and (first.seq, second.seq, other.seq) == (1, 2, 1)
    assert first.epoch == second.epoch == sub.position.epoch != other.epoch
    got = [await sub.get(), await sub.get()]
    assert [m.position for m in got] == [first, second]
    assert got[0] == messages.Message("orders", b"a")  # a position is no part of equality
    assert sub.position == second and sub.recovered
    await broker.close()


@clocked
async def test_without_history_there_are_no_positions(memory):
    broker = await memory.connect(Broker, uuid.uuid4())
    sub = await broker.subscribe("orders")
    assert await broker.publish("orders", b"a") is None
    assert (await sub.get()).position is None and sub.position is None and sub.recovered
    asked = await broker.subscribe("orders", last=5)
    assert not asked.recovered  # asked for a replay the broker cannot give
    assert broker.stats()["history"] is None
    await broker.close()


@clocked
async def test_subscribe_last_and_since_locally_and_remotely(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel, history=5)
    client = await memory.connect(BrokerClient, channel)
    for subscriber, topic in ((broker, "local"), (client, "remote")):
        positions = [await client.publish(topic, b"%d" % i) for i in range(8)]  # seq 1..8; 4..8 retained
        last = await subscriber.subscribe(topic, last=2)
        assert [(await last.get()).payload for _ in range(2)] == [b"6", b"7"] and last.recovered
        since = await subscriber.subscribe(topic, since=positions[4])  # after seq 5: 6, 7, 8
        assert [(await since.get()).payload for _ in range(3)] == [b"5", b"6", b"7"] and since.recovered
        gone = await subscriber.subscribe(topic, since=str(positions[1]))  # seq 3 is no longer retained
        assert not gone.recovered
        assert [(await gone.get()).position.seq for _ in range(5)] == [4, 5, 6, 7, 8]
        other = await subscriber.subscribe(topic, since=Position("another-epoch", 3))
        assert not other.recovered
        assert [(await other.get()).position.seq for _ in range(5)] == [4, 5, 6, 7, 8]
        await client.publish(topic, b"live")
        for sub in (last, since, gone, other):
            msg = await sub.get()
            assert msg.payload == b"live" and msg.position.seq == 9 and sub.pending == 0
    stats = broker.stats()["history"]
    assert stats["topics"] == 2 and stats["messages"] == 10
    await client.close()
    await broker.close()


@clocked
async def test_replay_arguments_are_checked_at_once(memory):
    broker = await memory.connect(Broker, uuid.uuid4(), history=5)
    with pytest.raises(ValueError):
        broker.subscribe("t", since="nonsense")
    with pytest.raises(ValueError):
        broker.subscribe("t", since="e:1", last=3)
    with pytest.raises(ValueError):
        broker.subscribe("t", last=-1)
    with pytest.raises(TypeError):
        broker.subscribe("t", since=5)
    await broker.close()


@clocked
async def test_a_hostile_since_or_last_header_is_refused_with_a_short_error(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel, history=5)
    client = await memory.connect(BrokerClient, channel)
    for headers in ({"since": "x" * 100_000}, {"last": "9" * 1000}, {"last": "-3"}, {"since": 'e"vil:1'}):
        body = messages.control(messages.SUBSCRIBE, topic="t", channel=str(uuid.uuid4()), **headers)
        with pytest.raises(Exception) as refused:
            await client.consumer.send(body.encode(), timeout=5)
        assert "subscribe refused" in str(refused.value) and len(str(refused.value)) < 300
    assert broker.stats()["subscriptions"] == []
    await client.close()
    await broker.close()


@clocked
async def test_a_go_publishers_plain_object_is_answered_ok_and_still_retained(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel, history=5)
    client = await memory.connect(BrokerClient, channel)
    answer = await client.consumer.send(messages.encode("t", b"go", None), timeout=5)
    assert answer == b"ok"  # exactly what a Go publisher gets from the Go broker
    sub = await broker.subscribe("t", last=1)
    msg = await sub.get()
    assert msg.payload == b"go" and msg.position.seq == 1
    await client.close()
    await broker.close()


@clocked
async def test_history_is_bounded_whatever_publishers_send(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel, history=3, history_bytes=10_000, history_total_bytes=50_000)
    client = await memory.connect(BrokerClient, channel)
    for i in range(300):  # distinct topics: the costliest kind of input
        client.publish(f"t{i}", b"x" * 100)
    await client.publish("last", b"x")
    stats = broker.stats()["history"]
    assert stats["bytes"] <= 50_000 and stats["forgotten"] > 0
    await client.close()
    await broker.close()


# -- over TCP -----------------------------------------------------------------


async def _service(**options) -> tuple[BrokerService, str]:
    service = BrokerService("tcp:0:interface=127.0.0.1", broker_channel=uuid.uuid4(), **options)
    service.startService()
    await within(service.whenReady())
    return service, f"127.0.0.1:{service.server.port.getHost().port}"


class _Pump:
    """Publishes one message after another (each awaited) until stopped; keeps every position."""

    def __init__(self, client: BrokerClient, topic: str) -> None:
        self.positions: list[Position] = []
        self.running = True
        self.done = Deferred.fromCoroutine(self._run(client, topic))

    async def _run(self, client: BrokerClient, topic: str) -> None:
        while self.running:
            self.positions.append(await client.publish(topic, b"%d" % len(self.positions)))

    async def stop(self) -> list[Position]:
        self.running = False
        await within(self.done)
        return self.positions


@ensure
async def test_replay_then_live_with_publishes_racing_the_replay_has_no_gap_and_no_duplicate():
    # Publishes keep coming while the subscription is set up and replays: each seq once, in order.
    service, address = await _service(history=100_000)
    publisher = await BrokerClient.connect(address, service.broker_channel)
    subscriber = await BrokerClient.connect(address, service.broker_channel)
    before = [await publisher.publish("race", b"x") for _ in range(200)]
    pump = _Pump(publisher, "race")
    sub = await within(subscriber.subscribe("race", since=before[49], buffer=100_000))
    await eventually(lambda: len(pump.positions) >= 100, timeout=20)
    positions = await pump.stop()
    seqs = []
    while not seqs or seqs[-1] < positions[-1].seq:
        seqs.append((await within(sub.get())).position.seq)
    assert seqs == list(range(51, positions[-1].seq + 1))
    await subscriber.close()
    await publisher.close()
    await service.stopService()


@ensure
async def test_a_dropped_connection_to_a_live_broker_costs_no_message_with_history():
    service, address = await _service(history=100_000)
    subscriber = await BrokerClient.connect(address, service.broker_channel, reconnect=fast_backoff)
    publisher = await BrokerClient.connect(address, service.broker_channel)
    sub = await subscriber.subscribe("news")
    pump = _Pump(publisher, "news")
    got = [await within(sub.get()) for _ in range(20)]
    for _ in range(3):
        back = resumed(sub)
        reset(subscriber)  # its TCP connections: the subscription's Provider's and its publishing Consumer's
        await within(back)
        assert sub.recovered
        got += [await within(sub.get()) for _ in range(20)]
    positions = await pump.stop()
    while got[-1].position != positions[-1]:
        got.append(await within(sub.get()))
    assert [m.payload for m in got] == [b"%d" % i for i in range(len(positions))]
    assert [m.position for m in got] == positions
    assert sub.gaps >= 3 and sub.recovered and not sub.closed
    await subscriber.close()
    await publisher.close()
    await service.stopService()


@ensure
async def test_a_resume_to_a_broker_that_restarted_without_the_history_is_not_recovered():
    old, address = await _service(history=100)
    subscriber = await BrokerClient.connect(address, old.broker_channel, reconnect=fast_backoff)
    publisher = await BrokerClient.connect(address, old.broker_channel, reconnect=fast_backoff)
    sub = await subscriber.subscribe("news")
    await publisher.publish("news", b"one")
    assert (await within(sub.get())).position.seq == 1
    back = resumed(sub)
    await crash(old.factory, old.server.port)  # server and broker die together, history with them
    old.server.port = None
    fresh = BrokerService(address.replace("127.0.0.1:", "tcp:") + ":interface=127.0.0.1",
                          broker_channel=old.broker_channel, history=100)  # fmt: skip
    fresh.startService()
    await within(fresh.whenReady())
    await within(back)  # re-announced from our position, to a broker in another epoch
    assert not sub.recovered and sub.gaps == 1
    await within(publisher.when_connected())
    await publisher.publish("news", b"two")
    msg = await within(sub.get())
    assert msg.payload == b"two" and msg.position.seq == 1 and sub.position == msg.position
    await subscriber.close()
    await publisher.close()
    await fresh.stopService()
    await old.stopService()


@ensure
async def test_a_restarted_broker_link_keeps_the_services_history():
    service, address = await _service(history=10)
    first = await within(service.publish("t", b"a"))
    assert service.broker.history is service.history
    old = service.broker
    reset(old)  # the broker loses its link to the server: the service starts another
    await within(old.when_closed())
    await within(service.whenReady())
    await eventually(lambda: service.broker is not None and not service.broker.closed, timeout=20)
    second = await within(service.publish("t", b"b"))
    assert second == Position(first.epoch, 2)
    sub = await within(service.subscribe("t", since=first))
    assert (await within(sub.get())).payload == b"b" and sub.recovered
    await service.stopService()


@clocked
async def test_a_remote_subscription_learns_where_it_starts_before_any_message(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel, history=5)
    client = await memory.connect(BrokerClient, channel)
    first = await client.publish("t", b"old")
    sub = await client.subscribe("t")  # a plain announcement, as a Go provider sends
    await memory.quiet()
    assert sub.position == first and sub.recovered and sub.pending == 0  # the $pulsyflux/start notice
    await client.close()
    await broker.close()


@clocked
async def test_patterns_and_groups_have_no_replay_and_no_positions_of_their_own(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel, history=5)
    client = await memory.connect(BrokerClient, channel)
    for subscriber in (broker, client):
        with pytest.raises(ValueError):
            subscriber.subscribe("orders.*", last=1)
        with pytest.raises(ValueError):
            subscriber.subscribe("orders.eu", group="workers", since="e:1")
    pattern = await client.subscribe("orders.*")
    member = await client.subscribe("orders.eu", group="workers")
    position = await client.publish("orders.eu", b"x")
    for sub in (pattern, member):
        msg = await sub.get()
        assert msg.position == position  # the message's own position, in its topic
    await memory.quiet()
    assert pattern.position is None and member.position is None
    assert broker.stats()["history"]["topics"] == 1  # no state for the pattern
    await client.close()
    await broker.close()


# -- the CLI and the HTTP API ---------------------------------------------------------


@pytest.fixture
def retaining():
    from pulsyflux.testing import start_server

    running = pytest_twisted.blockon(start_server(http=True, history=100))
    yield running
    pytest_twisted.blockon(running.stop())


@ensure
async def test_cli_pub_reports_the_position_and_sub_replays_last_and_since(retaining, cli):
    import json

    result = await cli("pub", "-s", retaining.address, "orders", "one")
    assert result.returncode == 0, result.stderr
    first = Position.parse(result.stderr.decode().rsplit(" at ", 1)[1].strip())
    assert result.stderr == f"published 3 bytes to 'orders' at {first}\n".encode()
    await retaining.broker.publish("orders", b"two")
    await retaining.broker.publish("orders", b"three")
    result = await cli("sub", "-s", retaining.address, "orders", "--last", "2", "-n", "2", "--json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(x["payload"], x["position"]) for x in lines] == [
        ("two", f"{first.epoch}:2"),
        ("three", f"{first.epoch}:3"),
    ]
    result = await cli("sub", "-s", retaining.address, "orders", "--since", str(first), "-n", "2", "--raw")
    assert (result.returncode, result.stdout) == (0, b"two\nthree\n")
    result = await cli("sub", "-s", retaining.address, "orders", "--since", "elsewhere:7", "-n", "3", "--raw")
    assert result.stdout == b"one\ntwo\nthree\n"
    assert b"could not replay everything asked for" in result.stderr
    result = await cli("sub", "-s", retaining.address, "orders", "--since", "nonsense")
    assert result.returncode == 2 and b"a position is EPOCH:SEQ" in result.stderr
    result = await cli("sub", "-s", retaining.address, "orders", "--since", "e:1", "--last", "3")
    assert result.returncode == 2 and b"not allowed with argument" in result.stderr
    result = await cli("sub", "-s", retaining.address, "orders", "invoices", "--since", str(first))
    assert result.returncode != 0 and b"--since takes one TOPIC" in result.stderr


@ensure
async def test_http_history_gives_the_last_n_retained_bounded_and_escaped(retaining):
    import json

    import treq

    async def get(path: str):
        response = await treq.get(retaining.http_url + path, persistent=False)
        return response.code, await response.content()

    for i in range(5):
        await retaining.broker.publish("caf\u00e9", b"%d" % i, {"k": "<v>"})
    code, body = await get("/history/caf%C3%A9?last=2")
    assert code == 200 and body.isascii()  # every other character escaped
    document = json.loads(body)
    assert document["topic"] == "caf\u00e9" and document["position"].endswith(":5")
    assert [m["Payload"] for m in document["messages"]] == ["Mw==", "NA=="]  # Go's JSON, base64 payloads
    assert [m["Position"] for m in document["messages"]] == [document["position"][:-1] + "4", document["position"]]
    assert document["messages"][0]["Headers"] == {"k": "<v>"}
    code, body = await get("/history/caf%C3%A9?last=999999999")  # more than kept: what is kept
    assert code == 200 and len(json.loads(body)["messages"]) == 5
    code, body = await get("/history/nobody?last=3")
    assert (code, json.loads(body)) == (200, {"topic": "nobody", "position": None, "messages": []})
    for path in ("/history/t?last=-1", "/history/t?last=" + "9" * 40, "/history/?last=1", "/history/a%00b"):
        code, body = await get(path)
        assert code == 400 and len(body) < 400, (path, body)


@ensure
async def test_http_history_without_history_is_404(served_plain):
    import treq

    response = await treq.get(served_plain.http_url + "/history/t", persistent=False)
    assert response.code == 404 and b"--history" in await response.content()


@pytest.fixture
def served_plain():
    from pulsyflux.testing import start_server

    running = pytest_twisted.blockon(start_server(http=True))
    yield running
    pytest_twisted.blockon(running.stop())


@ensure
async def test_http_publish_answers_with_the_position(retaining):
    import json

    import treq

    response = await treq.post(retaining.http_url + "/publish/orders", b"x", persistent=False)
    body = json.loads(await response.content())
    assert response.code == 202 and Position.parse(body["position"]).seq == 1
