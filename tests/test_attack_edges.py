"""Attacks on what the server and the CLI show: stats, metrics, terminal output.

Everything here goes over real TCP on 127.0.0.1: a server with its broker
and HTTP API (pulsyflux.testing), clients from this reactor, and the
``pulsyflux`` command run in this reactor too (the ``cli`` fixture,
tests/console.py), with stdout a pipe or a terminal as the test says.
"""

from __future__ import annotations

import json
import re
import uuid

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher

from pulsyflux import BrokerClient, Consumer, Provider, RemoteError
from pulsyflux.broker import DEFAULT_BROKER_CHANNEL
from pulsyflux.http import make_site
from pulsyflux.testing import start_server

ensure = pytest_twisted.ensureDeferred

# One sample line of the Prometheus text format: name, optional labels, value.
SAMPLE = re.compile(r'^[a-z_:][a-z0-9_:]*(\{([a-z_][a-z0-9_]*="([^"\\\n]|\\[\\"n])*",?)*\})? -?[0-9.e+]+(Inf|NaN)?$')
# What a terminal acts on: C0 controls but the line feed, DEL, C1 controls
# (UTF-8 encoded), U+2028/2029 and the bidi overrides.
TERMINAL_CONTROLS = re.compile(rb"[\x00-\x09\x0b-\x1f\x7f]|\xc2[\x80-\x9f]|\xe2\x80[\xa8-\xae]|\xe2\x81[\xa6-\xa9]")


@pytest.fixture
def brokered():
    """A server, its broker and its HTTP API."""
    running = pytest_twisted.blockon(start_server(http=True))
    yield running
    pytest_twisted.blockon(running.stop())


async def get(url: str) -> tuple[int, bytes]:
    response = await treq.get(url, persistent=False)
    return response.code, await response.content()


def parse_metrics(body: bytes) -> list[str]:
    """The samples of a /metrics body, checked against the text format."""
    text = body.decode("utf-8")  # strict: the format is UTF-8
    assert text.endswith("\n")
    samples = []
    seen = set()
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        assert SAMPLE.match(line), line
        series = line.rsplit(" ", 1)[0]
        assert series not in seen, f"duplicate series {series}"
        seen.add(series)
        samples.append(line)
    return samples


async def raw_subscribe(address: str, topic_json: str) -> Provider:
    """Subscribe as any client can, with a hand-built ``$pulsyflux/subscribe``
    (the Python API cannot encode some topics the broker's JSON accepts)."""
    channel = uuid.uuid4()
    subscriber = await Provider.connect(address, channel, handler=lambda data: b"")
    announcer = await Consumer.connect(address, DEFAULT_BROKER_CHANNEL)
    headers = '{"channel":"' + str(channel) + '","topic":"' + topic_json + '"}'
    body = ('{"Topic":"$pulsyflux/subscribe","Payload":null,"Headers":' + headers + "}").encode("ascii")
    try:
        await announcer.send(body, timeout=5)
    except BaseException:
        await subscriber.close()
        raise
    finally:
        await announcer.close()
    return subscriber


# -- item 13: one subscribe must not break /stats and /metrics for everyone -------------


@ensure
async def test_attack_lone_surrogate_topic_does_not_break_metrics_or_stats(brokered, cli):
    # JSON "\ud800" decodes to a str no encoder can write, and Go's decoder
    # reads as U+FFFD: the broker refuses such a topic at subscribe (the
    # rendering of any topic text is tested below with a stub broker).
    with pytest.raises(RemoteError, match=r"^subscribe refused: .*lone surrogate, found U\+D800 at 4$"):
        await raw_subscribe(brokered.address, 'evil\\ud800\\u001b[2J\\u001b[31m\\"}\\n\\\\')
    assert brokered.broker.stats()["topics"] == {}
    code, body = await get(brokered.http_url + "/metrics")
    assert code == 200, body[-300:]
    assert "pulsyflux_broker_topics 0" in parse_metrics(body)
    code, body = await get(brokered.http_url + "/stats")
    assert code == 200
    assert json.loads(body.decode("utf-8"))["broker"]["topics"] == {}
    result = await cli("stats", "--http", brokered.http_url)
    assert result.returncode == 0, result.stderr
    assert not TERMINAL_CONTROLS.search(result.stdout), result.stdout


class _BrokerHolding:
    """Stands for a broker whose stats hold whatever topics and subscriptions
    clients made, whether or not a broker would still accept them."""

    def __init__(self, topic: str) -> None:
        self.topic = topic

    def stats(self) -> dict:
        sub = {"id": "sub-1", "topic": self.topic, "channel": str(uuid.uuid4()), "backlog": 1, "delivered": 0}
        return {"published": 0, "delivered": 0, "dropped": 0, "topics": {self.topic: 1}, "subscriptions": [sub]}


@ensure
async def test_attack_any_topic_text_renders_in_metrics_and_stats(brokered):
    topic = 'x\ud800\udfff\x00\x1b[2J\x85\u2028\u202e\\"\n' + "y" * 5000
    site = make_site(brokered.factory, broker=_BrokerHolding(topic))
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}"
    try:
        code, body = await get(url + "/metrics")
        assert code == 200
        samples = parse_metrics(body)
        assert max(len(line) for line in samples) < 1000
        [line] = [s for s in samples if s.startswith("pulsyflux_broker_topic_subscribers{")]
        assert line.endswith(" 1")
        code, body = await get(url + "/stats")
        assert code == 200
        [sub] = json.loads(body.decode("utf-8"))["broker"]["subscriptions"]
        assert "channel" not in sub and sub["id"] == "sub-1" and len(sub["topic"]) < 300
    finally:
        await port.stopListening()
        await site.close_connections()


@ensure
async def test_attack_many_topics_do_not_grow_metrics_without_bound(brokered):
    site = make_site(brokered.factory, broker=brokered.broker, max_topics=3)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}"
    subs = []
    try:
        for i in range(6):
            subs.append(await brokered.broker.subscribe(f"topic-{i}"))
        subs.append(await brokered.broker.subscribe("topic-0"))
        subs.append(await brokered.broker.subscribe("L" * 1000))  # one long label (the broker allows 1024)
        code, body = await get(url + "/metrics")
        assert code == 200
        samples = parse_metrics(body)
        topic_series = [s for s in samples if s.startswith("pulsyflux_broker_topic_subscribers{")]
        # The three most subscribed topics (ties by name: "LLL..." before "topic-1"), one series for the rest.
        assert len(topic_series) == 4, topic_series
        assert 'pulsyflux_broker_topic_subscribers{topic="topic-0"} 2' in samples
        assert 'pulsyflux_broker_topic_subscribers{topic="$pulsyflux/other"} 4' in samples
        assert "pulsyflux_broker_topics 7" in samples
        assert max(len(line) for line in body.splitlines()) < 1000
        assert len(body) < 20_000

        code, body = await get(url + "/stats")
        broker = json.loads(body)["broker"]
        assert len(broker["topics"]) == 3 and broker["topics"]["topic-0"] == 2
        assert broker["other_topics"] == {"topics": 4, "subscribers": 4}
        assert len(body) < 20_000
    finally:
        await port.stopListening()
        await site.close_connections()  # the subscriptions end with the broker


# -- item 15: stats must not reveal private channel ids -------------------------------


@ensure
async def test_attack_stats_and_metrics_do_not_reveal_private_channel_ids(brokered, cli):
    client = await BrokerClient.connect(brokered.address)
    remote = await client.subscribe("orders")
    local = await brokered.broker.subscribe("orders")
    private = uuid.uuid4()
    provider = await Provider.connect(brokered.address, private, handler=lambda data: data)
    consumer = await Consumer.connect(brokered.address, private)
    try:
        assert await consumer.send(b"x") == b"x"
        secrets = []
        for channel in (remote.channel, local.channel, private):
            secrets += [str(channel).encode(), channel.hex.encode(), channel.hex.upper().encode()]
        code, stats = await get(brokered.http_url + "/stats")
        assert code == 200
        code, metrics = await get(brokered.http_url + "/metrics")
        assert code == 200
        text = await cli("stats", "--http", brokered.http_url)
        as_json = await cli("stats", "--json", "--http", brokered.http_url)
        for body in (stats, metrics, text.stdout, as_json.stdout):
            for secret in secrets:
                assert secret not in body.lower(), (secret, body)
        # What is shown instead: counts.
        document = json.loads(stats)
        server = document["server"]
        assert server["channels"]["with_providers"] >= 2  # ours and the subscriber's
        assert server["connections"]["by_role"]["provider"] >= 2
        assert server["connections"]["by_role"]["broker"] >= 2  # the server's own, apart
        [orders] = [s for s in document["broker"]["subscriptions"] if s.get("remote")]
        assert orders["topic"] == "orders" and "channel" not in orders
        assert document["broker"]["channel"] == str(DEFAULT_BROKER_CHANNEL)  # well known, not private
        assert text.returncode == 0 and "orders" in text.stdout.decode()
    finally:
        for closing in (consumer, provider, client):
            await closing.close()


# -- item 17: the CLI must not echo terminal escapes or unbounded lines ---------------


@ensure
async def test_attack_sub_does_not_print_terminal_escapes(brokered, cli):
    sub = cli.start("sub", "--server", brokered.address, "news", "--count", "3")
    assert "subscribed to 'news'" in await sub.stderr.line("subscribed to")
    await brokered.broker.publish("news", b"\x1b[2J\x1b[31mFAKE\vsecond line\rthird")
    await brokered.broker.publish("news", "bidi \u202egnp.exe \u2028 next \x9b31m".encode())
    await brokered.broker.publish("news", b"\xff" * 10_000)
    code, out, err = await sub.finished()
    assert code == 0, err
    assert not TERMINAL_CONTROLS.search(out), out[:200]
    lines = out.split(b"\n")
    assert lines[-1] == b"" and len(lines) == 4, lines
    assert lines[0] == b"news: \\x1b[2J\\x1b[31mFAKE\\x0bsecond line\\rthird"
    assert lines[1] == b"news: bidi \\u202egnp.exe \\u2028 next \\x9b31m"
    assert lines[2].endswith(b"... (5904 bytes more)") and len(lines[2]) < 20_000


@ensure
async def test_attack_sub_json_is_exact_and_has_no_raw_controls(brokered, cli):
    sub = cli.start("sub", "--server", brokered.address, "news", "--count", "1", "--json")
    await sub.stderr.line("subscribed to")
    payload = "\x1b[2J \x9b \u2028 \u202e \x7f é"
    await brokered.broker.publish("news", payload.encode(), {"h\x1b": "v\u2029"})
    code, out, err = await sub.finished()
    assert code == 0, err
    assert not TERMINAL_CONTROLS.search(out), out
    assert out.count(b"\n") == 1
    assert json.loads(out) == {"topic": "news", "payload": payload, "headers": {"h\x1b": "v\u2029"}}


@ensure
async def test_attack_reply_does_not_log_a_huge_binary_body_as_one_line(brokered, cli):
    channel = uuid.uuid4()
    reply = cli.start("reply", "--server", brokered.address, str(channel), "--echo", "--count", "1")
    assert "replying on channel" in await reply.stderr.line("replying")
    body = bytes(range(256)) * 256  # 64 KiB of binary, every control byte in it
    consumer = await Consumer.connect(brokered.address, channel)
    try:
        assert await consumer.send(body, timeout=10) == body
    finally:
        await consumer.close()
    code, out, err = await reply.finished()
    assert code == 0, err
    assert not TERMINAL_CONTROLS.search(out)
    assert out.count(b"\n") == 1 and out.startswith(b"#1 ")
    assert out.endswith(b"... (61440 bytes more)\n")
    assert len(out) < 5 * 4096


@ensure
async def test_attack_provider_error_text_is_escaped_and_bounded_on_stderr(brokered, cli):
    channel = uuid.uuid4()

    def handler(data: bytes) -> bytes:
        raise RuntimeError("\x1b[2J\x1b[31mFAKE\nsecond line " + "x" * 20_000)

    provider = await Provider.connect(brokered.address, channel, handler=handler)
    try:
        consumer = await Consumer.connect(brokered.address, channel)
        with pytest.raises(RemoteError):
            await consumer.send(b"x")  # the text does reach a client intact enough to fail
        await consumer.close()
        result = await cli("request", "--server", brokered.address, str(channel), "x")
    finally:
        await provider.close()
    assert result.returncode == 1
    assert not TERMINAL_CONTROLS.search(result.stderr), result.stderr[:200]
    assert result.stderr.count(b"\n") == 1
    assert len(result.stderr) < 5 * 4096


@ensure
async def test_attack_request_on_a_terminal_shows_the_providers_escapes(brokered, cli):
    channel = uuid.uuid4()
    answer = b"\x1b[2J\x1b[31mFAKE\x9b\r" + "\u202e".encode() + b"\nline two\tok"
    provider = await Provider.connect(brokered.address, channel, handler=lambda data: answer)
    try:
        terminal = await cli("request", "--server", brokered.address, str(channel), "x", tty=True)
        piped = await cli("request", "--server", brokered.address, str(channel), "x")
    finally:
        await provider.close()
    assert terminal.returncode == 0
    # Escapes shown as text, line breaks kept, and the line ended: nothing a terminal would act on.
    assert terminal.stdout == b"\\x1b[2J\\x1b[31mFAKE\\x9b\\r\\u202e\nline two\tok\n"
    assert piped.stdout == answer  # piped or redirected: byte for byte, as documented


def _access_lines(events: list, needle: str) -> list[str]:
    lines = [formatEvent(event) for event in events]
    return [line for line in lines if needle in line]


@ensure
async def test_attack_http_request_flood_does_not_flood_the_access_log(brokered):
    """200 GETs write the access log's burst (10 lines) and one summary, not 200 lines."""
    limiter = getattr(brokered.site, "access_limiter", None)
    if limiter is not None:
        limiter.interval = 3600.0  # the whole test is one interval, however slow the machine
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        for _ in range(200):  # /stats: /healthz and /metrics are not logged at all
            assert (await get(brokered.http_url + "/stats"))[0] == 200
        if limiter is not None:
            limiter.stop()  # writes the summary now
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert len(_access_lines(events, "GET /stats")) == 10
    summaries = _access_lines(events, "more 'http 2xx' lines")
    assert len(summaries) == 1 and "190 more" in summaries[0]


@ensure
async def test_attack_long_path_and_escapes_make_one_short_access_log_line(brokered):
    """A 15 KB path and a User-Agent with terminal escapes: one short, escaped line."""
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        response = await treq.get(
            brokered.http_url + "/" + "A" * 15_000 + '"',
            headers={"User-Agent": '\x1b[2J\x1b[31mFAKE\x07" "forged'},
            persistent=False,
        )
        assert response.code == 404
        await response.content()
    finally:
        globalLogPublisher.removeObserver(events.append)
    [line] = _access_lines(events, "GET /AAAA")
    assert len(line) < 1000
    assert "\x1b" not in line and "\x07" not in line
    assert "bytes more" in line and '\\" \\"forged' in line
