"""The HTTP monitoring and publish API, driven with treq over real TCP."""

from __future__ import annotations

import json
import os
import re
import uuid

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor

from pulsyflux import BrokerClient, Consumer, NoProviderError, Provider, __version__
from pulsyflux.http import HTTPService, make_site, prometheus_text, server_stats, stats_document
from pulsyflux.server.router import LatencyHistogram
from pulsyflux.testing import start_server

from .helpers import eventually

ensure = pytest_twisted.ensureDeferred

# One sample line of the Prometheus text format: name, optional labels, value.
SAMPLE = re.compile(r'^[a-z_:][a-z0-9_:]*(\{([a-z_][a-z0-9_]*="([^"\\]|\\.)*",?)*\})? -?[0-9.e+-]+(Inf|NaN)?$')


@pytest.fixture
def served():
    """A server (no broker: exact router counts) with its HTTP API, on ephemeral 127.0.0.1 ports."""
    running = pytest_twisted.blockon(start_server(http=True, broker=False))
    yield running
    pytest_twisted.blockon(running.stop())


@pytest.fixture
def brokered():
    """A server, its broker and its HTTP API."""
    running = pytest_twisted.blockon(start_server(http=True))
    yield running
    pytest_twisted.blockon(running.stop())


async def get(url: str):
    response = await treq.get(url, persistent=False)
    return response, await response.content()


async def get_json(url: str):
    response, body = await get(url)
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    return response.code, json.loads(body)


@ensure
async def test_healthz(served):
    assert await get_json(served.http_url + "/healthz") == (200, {"status": "ok"})


@ensure
async def test_healthz_says_what_is_not_running(served):
    site = make_site(served.factory, ready=lambda: ["broker"])
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        code, body = await get_json(f"http://127.0.0.1:{port.getHost().port}/healthz")
    finally:
        await port.stopListening()
        await site.close_connections()
    assert (code, body) == (503, {"status": "unavailable", "not_running": ["broker"]})


@ensure
async def test_stats_counts_what_happened(served, channel):
    provider = await Provider.connect(served.address, channel, handler=lambda data: data + b"!")
    consumer = await Consumer.connect(served.address, channel)
    assert await consumer.send(b"hello") == b"hello!"
    lonely = await Consumer.connect(served.address, channel.hex[::-1])
    with pytest.raises(NoProviderError):
        await lonely.send(b"anyone?")

    code, stats = await get_json(served.http_url + "/stats")
    assert code == 200
    server = stats["server"]
    assert server["connections"]["by_role"] == {
        "consumer": 2,
        "provider": 1,
        "unregistered": 0,
        "broker": 0,
        "cluster relay": 0,
    }
    assert server["connections"]["open"] == 3
    assert server["channels"]["count"] == 2
    assert server["channels"] == {"count": 2, "with_providers": 1, "without_provider": 1}
    requests = {key: server["requests"][key] for key in ("routed", "broker_routed", "responses_routed", "in_flight")}
    assert requests == {"routed": 1, "broker_routed": 0, "responses_routed": 1, "in_flight": 0}
    assert server["errors"] == {"peer disappeared": 1}
    assert server["bytes"]["in"] > len(b"hello") and server["bytes"]["out"] > len(b"hello!")
    assert server["started"] == served.factory.stats.started  # the uptime counts from it: test_uptime_is_from_the_start
    for client in (consumer, lonely, provider):
        await client.close()


@ensure
async def test_metrics_in_prometheus_text_format(served, channel):
    provider = await Provider.connect(served.address, channel, handler=lambda data: data)
    consumer = await Consumer.connect(served.address, channel)
    await consumer.send(b"x")
    nobody = await Consumer.connect(served.address, channel.hex[::-1])
    with pytest.raises(NoProviderError):
        await nobody.send(b"x")

    response, body = await get(served.http_url + "/metrics")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/plain; version=0.0.4; charset=utf-8"]
    text = body.decode()
    assert text.endswith("\n")
    families = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in families, f"{name} declared twice"
            families[name] = kind
        elif not line.startswith("# HELP "):
            assert SAMPLE.match(line), line
            name = line.split("{")[0].split(" ")[0]
            family = re.sub(r"_(bucket|sum|count)$", "", name)  # a histogram's samples
            assert name in families or families.get(family) == "histogram", line
    lines = set(text.splitlines())
    assert "pulsyflux_requests_routed_total 1" in lines
    assert 'pulsyflux_connections{role="consumer"} 2' in lines
    assert 'pulsyflux_connections{role="provider"} 1' in lines
    assert 'pulsyflux_errors_total{kind="peer disappeared"} 1' in lines
    assert families["pulsyflux_requests_routed_total"] == "counter"
    assert families["pulsyflux_connections"] == "gauge"
    for client in (consumer, nobody, provider):
        await client.close()


@ensure
async def test_stats_show_the_process_and_its_limits(served):
    code, stats = await get_json(served.http_url + "/stats")
    server = stats["server"]
    assert server["version"] == __version__
    assert server["pid"] == os.getpid()
    assert server["rss_bytes"] > 1 << 20 and server["max_rss_bytes"] >= server["rss_bytes"] // 2
    assert 3 <= server["open_fds"] <= server["max_fds"]
    assert server["cpu_seconds"] > 0
    router = served.factory.router
    assert server["limits"]["max_body"] == router.max_body
    assert server["limits"]["max_connections"] == router.max_connections
    assert server["limits"]["frame_timeout"] == router.connection_guard.frame_timeout
    assert server["limits"]["max_frame_payload"] == 1 << 20
    response, body = await get(served.http_url + "/metrics")
    lines = set(body.decode().splitlines())
    assert f'pulsyflux_info{{version="{__version__}",pid="{os.getpid()}"}} 1' in lines
    assert f'pulsyflux_limit{{limit="max_body"}} {router.max_body}' in lines
    assert any(line.startswith("process_resident_memory_bytes ") for line in lines)
    assert any(line.startswith("process_open_fds ") for line in lines)


@ensure
async def test_stats_list_connections_without_their_ids(served, channel):
    provider = await Provider.connect(served.address, channel, handler=lambda data: data)
    consumer = await Consumer.connect(served.address, channel)
    for _ in range(3):
        await consumer.send(b"x" * 1000)
    response, body = await get(served.http_url + "/stats")
    text = body.decode()
    for secret in (channel, consumer.client_id, provider.client_id):
        assert secret.hex not in text.replace("-", "") and str(secret) not in text
    listed = json.loads(text)["server"]["connections"]
    assert listed["omitted"] == 0
    by_role = {conn["role"]: conn for conn in listed["list"]}
    assert set(by_role) == {"consumer", "provider"}
    sent = by_role["consumer"]
    # Registration (START + END), then three requests of START, CHUNK, END; three responses back.
    assert sent["frames_in"] == 2 + 3 * 3 and sent["frames_out"] == 3 * 3
    assert sent["bytes_in"] > 3000 and sent["bytes_out"] > 3000
    assert sent["remote"].startswith("127.0.0.1:") and sent["age_seconds"] >= 0
    assert by_role["provider"]["frames_out"] == 1 + 3 * 3  # its registration probe's answer, three requests

    # Bounded: the busiest first, the rest counted.
    idle = await Consumer.connect(served.address, channel)
    await eventually(lambda: len(served.factory.router.peers) == 3)
    one = server_stats(served.factory, max_connections=1)["connections"]
    busiest = max(listed["list"], key=lambda conn: conn["bytes_in"] + conn["bytes_out"])
    assert len(one["list"]) == 1 and one["omitted"] == 2
    assert (one["list"][0]["role"], one["list"][0]["bytes_in"]) == (busiest["role"], busiest["bytes_in"])
    for client in (consumer, provider, idle):
        await client.close()


@ensure
async def test_request_latency_histogram(served, channel):
    provider = await Provider.connect(served.address, channel, handler=lambda data: data)
    consumer = await Consumer.connect(served.address, channel)
    await consumer.send(b"x")
    await consumer.send(b"y")
    code, stats = await get_json(served.http_url + "/stats")
    latency = stats["server"]["requests"]["latency"]
    assert latency["count"] == 2 and latency["buckets"]["+Inf"] == 2 and latency["sum_seconds"] >= 0
    counts = list(latency["buckets"].values())
    assert counts == sorted(counts)  # cumulative
    response, body = await get(served.http_url + "/metrics")
    lines = set(body.decode().splitlines())
    assert 'pulsyflux_request_duration_seconds_bucket{le="+Inf"} 2' in lines
    assert "pulsyflux_request_duration_seconds_count 2" in lines
    for client in (consumer, provider):
        await client.close()


def test_latency_histogram_buckets():
    histogram = LatencyHistogram()
    for seconds in (0.0001, 0.0005, 0.003, 99.0):
        histogram.observe(seconds)
    cumulative = dict(histogram.cumulative())
    assert (cumulative[0.0005], cumulative[0.001], cumulative[0.005], cumulative[10.0]) == (2, 2, 3, 3)
    assert cumulative[float("inf")] == 4 and histogram.count == 4


@ensure
async def test_the_brokers_own_connections_are_shown_apart(brokered):
    code, stats = await get_json(brokered.http_url + "/stats")
    server = stats["server"]
    assert server["connections"]["open"] == 0 and server["connections"]["total"] == 0
    assert server["connections"]["by_role"]["broker"] >= 2
    assert server["requests"]["routed"] == server["requests"]["responses_routed"] == 0
    assert {conn["role"] for conn in server["connections"]["list"]} == {"broker"}


@ensure
async def test_topic_publish_and_deliver_counters(brokered):
    client = await BrokerClient.connect(brokered.address)
    sub = await client.subscribe("orders")
    for n in range(3):
        await client.publish("orders", b"%d" % n)
    await client.publish("nobody-listens", b"x")
    for _ in range(3):
        await sub.get()
    await eventually(lambda: brokered.broker.delivered == 3)
    code, stats = await get_json(brokered.http_url + "/stats")
    assert stats["broker"]["topic_traffic"] == {"orders": {"published": 3, "delivered": 3}}
    requests = stats["server"]["requests"]
    assert requests["broker_routed"] >= 1  # the forwards to the subscriber
    # responses_routed: the answers to the client's requests (subscribe, publishes), not to the forwards
    assert requests["responses_routed"] == requests["routed"] == requests["latency"]["count"]
    response, body = await get(brokered.http_url + "/metrics")
    lines = set(body.decode().splitlines())
    assert f"pulsyflux_responses_routed_total {requests['routed']}" in lines
    assert 'pulsyflux_broker_topic_published_total{topic="orders"} 3' in lines
    assert 'pulsyflux_broker_topic_delivered_total{topic="orders"} 3' in lines
    await client.close()


def test_metric_label_values_are_escaped(server):
    server.factory.stats.errors['bad "quote" \\ and\nnewline'] += 1
    text = prometheus_text(stats_document(server.factory))
    assert 'pulsyflux_errors_total{kind="bad \\"quote\\" \\\\ and\\nnewline"} 1' in text.splitlines()


@ensure
async def test_unknown_path_and_wrong_method(served):
    code, body = await get_json(served.http_url + "/nope")
    assert (code, body) == (404, {"error": "no such endpoint: /nope"})
    code, body = await get_json(served.http_url + "/stats/nope")
    assert (code, body) == (404, {"error": "no such endpoint: /stats/nope"})
    response = await treq.post(served.http_url + "/stats", b"", persistent=False)
    assert response.code == 405
    assert json.loads(await response.content()) == {"error": "method POST not allowed"}
    response = await treq.get(served.http_url + "/publish/orders", persistent=False)
    assert response.code == 405


@ensure
async def test_publish_without_a_broker_is_503(served):
    response = await treq.post(served.http_url + "/publish/orders", b"x", persistent=False)
    assert response.code == 503
    assert json.loads(await response.content()) == {"error": "this server runs no broker"}


@ensure
async def test_publish_rejects_bad_input_before_anything_else(served):
    response = await treq.post(served.http_url + "/publish/", b"x", persistent=False)
    assert response.code == 400
    assert json.loads(await response.content()) == {"error": "topic must not be empty: POST /publish/{topic}"}
    response = await treq.post(served.http_url + "/publish/orders", b"x" * (1024 * 1024 + 1), persistent=False)
    assert response.code == 413
    assert json.loads(await response.content()) == {
        "error": "payload larger than 1048576 bytes (1 MiB)",
        "limit": 1048576,
    }


@ensure
async def test_http_service_listens_on_a_bare_port_and_closes_its_connections(server):
    service = HTTPService("tcp:0:interface=127.0.0.1", make_site(server.factory), reactor=reactor)
    service.startService()
    port = await service.whenListening()
    assert port.getHost().host == "127.0.0.1"
    response = await treq.get(f"http://127.0.0.1:{port.getHost().port}/healthz")  # a pooled keep-alive connection
    assert response.code == 200
    await response.content()
    assert len(service.site.open_connections) == 1
    await service.stopService()
    assert service.site.open_connections == {}


@ensure
async def test_http_service_listens_on_a_unix_socket(server, tmp_path):
    path = str(tmp_path / "http.sock")
    service = HTTPService(f"unix:{path}", make_site(server.factory), reactor=reactor)
    port = await service.startService()
    assert port.getHost().name == path.encode()
    assert await service.whenListening() is port
    await service.stopService()


def test_bare_port_means_localhost():
    assert HTTPService("8222", make_site(None)).description == "tcp:8222:interface=127.0.0.1"


# -- with the broker -------------------------------------------------------------------


@ensure
async def test_publish_reaches_subscribers_with_headers(brokered):
    sub = await brokered.broker.subscribe("orders/eu")
    response = await treq.post(
        brokered.http_url + "/publish/orders%2Feu",
        b"new order",
        headers={"X-Pulsyflux-Header-Priority": "high", "X-Pulsyflux-Header-Trace-Id": "abc", "X-Other": "no"},
        persistent=False,
    )
    assert response.code == 202
    assert json.loads(await response.content()) == {"status": "accepted", "topic": "orders/eu", "bytes": 9}
    message = await sub.get()
    assert (message.topic, message.payload) == ("orders/eu", b"new order")
    assert message.headers == {"priority": "high", "trace-id": "abc"}


@ensure
async def test_publish_refuses_reserved_topics(brokered):
    response = await treq.post(brokered.http_url + "/publish/$pulsyflux/subscribe", b"x", persistent=False)
    assert response.code == 400
    assert json.loads(await response.content()) == {
        "error": "topics starting with '$pulsyflux/' are reserved for the broker"
    }
    assert brokered.broker.published == 0


@ensure
async def test_publish_refuses_wildcards_and_empty_tokens(brokered):
    for topic, error in (
        ("orders.*", "token 2 is the wildcard '*': wildcards are for subscribing; publish to a concrete topic"),
        ("orders..eu", "token 2 is empty: a topic is '.'-separated tokens, none empty"),
    ):
        response = await treq.post(brokered.http_url + "/publish/" + topic, b"x", persistent=False)
        assert response.code == 400
        assert json.loads(await response.content()) == {"error": error}
    assert brokered.broker.published == 0


@ensure
async def test_stats_and_metrics_show_which_subscriber_is_slow(brokered):
    from pulsyflux import Broker

    # A broker that keeps little for slow subscribers, so drops show quickly.
    tight = await Broker.connect(brokered.address, uuid.uuid4(), backlog=2, batch=1, window=1)
    site = make_site(brokered.factory, broker=tight)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    fast = await tight.subscribe("ticks")
    slow = await tight.subscribe("ticks", buffer=1)  # never read
    for i in range(20):
        await tight.publish("ticks", b"%d" % i)
    for _ in range(20):
        await fast.get()
    url = f"http://127.0.0.1:{port.getHost().port}"
    try:
        code, stats = await get_json(url + "/stats")
        response, metrics = await get(url + "/metrics")
    finally:
        await port.stopListening()
        await site.close_connections()
        await tight.close()
    assert code == 200
    broker = stats["broker"]
    assert broker["published"] == 20
    assert broker["topics"] == {"ticks": 2}
    by_id = {sub["id"]: sub for sub in broker["subscriptions"]}  # labels, in subscribe order
    fast_stats, slow_stats = by_id["sub-1"], by_id["sub-2"]
    assert (fast_stats["backlog"], fast_stats["dropped"]) == (0, 0)
    assert slow_stats["dropped"] > 0 and slow_stats["backlog"] == 2
    assert slow_stats["topic"] == "ticks" and "channel" not in slow_stats
    assert broker["dropped"] == slow_stats["dropped"]
    assert (broker["subscriptions_count"], broker["backlog"], broker["backlog_max"]) == (2, 2, 2)
    lines = set(metrics.decode().splitlines())
    assert "pulsyflux_broker_published_total 20" in lines
    assert 'pulsyflux_broker_topic_subscribers{topic="ticks"} 2' in lines
    assert (
        f'pulsyflux_broker_subscription_dropped_total{{topic="ticks",subscription="sub-2"}} {slow_stats["dropped"]}'
        in lines
    )
    assert 'pulsyflux_broker_subscription_backlog{topic="ticks",subscription="sub-1"} 0' in lines
    assert f"pulsyflux_broker_dropped_total {slow_stats['dropped']}" in lines
    assert "pulsyflux_broker_backlog_max 2" in lines
    assert str(slow.channel) not in metrics.decode() and str(fast.channel) not in metrics.decode()


@ensure
async def test_twistd_http_option(tmp_path):
    from pulsyflux.service import Options, makeService

    options = Options()
    options.parseOptions(["--port", "tcp:0:interface=127.0.0.1", "--http", "tcp:0:interface=127.0.0.1"])
    top = makeService(options)
    top.startService()
    try:
        await top.whenReady()
        (http,) = [child for child in top if isinstance(child, HTTPService)]
        url = f"http://127.0.0.1:{(await http.whenListening()).getHost().port}"
        assert await get_json(url + "/healthz") == (200, {"status": "ok"})
        response = await treq.post(url + "/publish/news", b"hello", persistent=False)
        assert response.code == 202
        await response.content()
        code, stats = await get_json(url + "/stats")
        assert stats["broker"]["published"] == 1
        await top.broker.close()  # as when the broker loses the server
        assert await get_json(url + "/healthz") == (503, {"status": "unavailable", "not_running": ["broker"]})
        response = await treq.post(url + "/publish/news", b"hello", persistent=False)
        assert response.code == 503
        assert json.loads(await response.content())["error"].startswith("broker did not accept the message: ")
    finally:
        await top.stopService()
    assert top.factory.router.connections == set()


def test_http_is_off_unless_asked():
    from pulsyflux.service import Options, makeService

    options = Options()
    options.parseOptions(["--port", "tcp:0:interface=127.0.0.1"])
    assert not [child for child in makeService(options) if isinstance(child, HTTPService)]


def test_uptime_is_from_the_start(served):
    """Exactly, at a given time (no bound on how long the test took)."""
    started = served.factory.stats.started
    assert server_stats(served.factory, now=started + 12.5)["uptime_seconds"] == 12.5
    assert server_stats(served.factory, now=started - 1)["uptime_seconds"] == 0.0  # a clock set back: never negative
