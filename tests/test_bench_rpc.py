"""``pulsyflux bench rpc``'s pairing of the router with the bare relay (benchmarks never run in the suite:
these run its measurement for a fraction of a second in this process, over real TCP)."""

from __future__ import annotations

import os

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ServerFactory

from pulsyflux.bench import relay, rpc
from pulsyflux.client import Consumer, Provider

ensure = pytest_twisted.ensureDeferred


async def _clients(server, channel, baseline: bool) -> tuple[dict, list]:
    """What rpc._measure builds, in this process: a consumer, an echo provider, the relay and its client."""
    provider = await Provider.connect(server.address, channel, handler=lambda data: data)
    consumer = await Consumer.connect(server.address, channel)
    me = os.getpid()
    clients = {"consumers": [consumer], "pids": {"router": {"client": me, "router": me, "provider": me}}}
    closers = [consumer.close, provider.close]
    if baseline:
        echo_factory = ServerFactory.forProtocol(relay.EchoProtocol)
        echo_port = reactor.listenTCP(0, echo_factory, interface="127.0.0.1")
        relay_port = reactor.listenTCP(0, relay.RelayFactory(reactor, echo_port.getHost().port), interface="127.0.0.1")
        client = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", relay_port.getHost().port), relay.RoundTripClient()
        )
        await client.connected_d
        clients["relay"] = client
        clients["pids"]["relay"] = {"client": me, "relay": me, "echo": me}

        async def close_relay() -> None:
            client.transport.loseConnection()
            await relay_port.stopListening()
            await echo_port.stopListening()

        closers.insert(0, close_relay)
    return clients, closers


@ensure
async def test_the_echo_is_measured_beside_the_relays_echo_in_the_same_run(server, channel):
    options = rpc.Options(runs=1, duration=0.2, warmup=0.05, inflight=2, large=100_000)
    clients, closers = await _clients(server, channel, baseline=True)
    try:
        result = await rpc._run_once(reactor, options, clients)  # the whole run: its report line too
    finally:
        for close in closers:
            await close()
    echo, relay_echo = result["echo"], result["relay_echo"]
    assert echo["count"] > 0 and relay_echo["count"] > 0
    assert echo["mb_per_s"] == echo["req_per_s"] * 100_000 / 1e6
    assert relay_echo["mb_per_s"] == relay_echo["req_per_s"] * 100_000 / 1e6
    assert result["echo_vs_relay"] == echo["mb_per_s"] / relay_echo["mb_per_s"]
    assert set(relay_echo["cpu_us"]) == {"client", "relay", "echo"}
    assert set(echo["cpu_us"]) == {"client", "router", "provider"}

    summary = rpc._summarise(options, [result, {**result, "echo_vs_relay": 0.5}])
    medians = summary["medians"]
    assert medians["relay_echo_mb_per_s"] == relay_echo["mb_per_s"]
    assert medians["echo_vs_relay"] == (result["echo_vs_relay"] + 0.5) / 2
    assert set(medians["relay_echo_cpu_us"]) == {"client", "relay", "echo"}
    line = rpc._one_line(result)
    assert f"; echo {echo['mb_per_s']:,.0f} MB/s; relay echo {relay_echo['mb_per_s']:,.0f} MB/s, ratio " in line


@ensure
async def test_without_the_baseline_only_the_routers_echo_is_measured(server, channel):
    options = rpc.Options(runs=1, duration=0.2, large=100_000, baseline=False)
    clients, closers = await _clients(server, channel, baseline=False)
    try:
        result = await rpc._echo_pair(options, clients)
    finally:
        for close in closers:
            await close()
    assert set(result) == {"echo"} and result["echo"]["count"] > 0
    medians = rpc._summarise(options, [result])["medians"]
    assert medians["relay_echo_mb_per_s"] is None and medians["echo_vs_relay"] is None


@ensure
async def test_with_the_provider_in_process_the_router_alone_answers_over_tcp(channel):
    port = await rpc.start_router(reactor, str(channel))
    consumer = await Consumer.connect(f"127.0.0.1:{port.getHost().port}", channel)
    try:
        assert await consumer.send(b"x" * 300_000, 5.0) == b"x" * 300_000  # larger than a read: several of them
    finally:
        await consumer.close()
        await port.stopListening()


def test_the_report_says_when_the_provider_is_in_the_routers_process():
    import argparse

    parser = argparse.ArgumentParser()
    rpc.add_arguments(parser)
    options = rpc.options_from_args(parser.parse_args(["--provider-in-process"]))
    assert options.provider_in_process and not rpc.options_from_args(parser.parse_args([])).provider_in_process
    medians = {key: None for key in rpc._summarise(options, [{"echo": {"mb_per_s": 5.0, "cpu_us": {}}}])["medians"]}
    results = {
        "medians": {**medians, "echo_1mib_mb_per_s": 5.0},
        "options": {
            "duration": 1.0,
            "payload": 16,
            "consumers": 1,
            "inflight": 1,
            "large": 1,
            "provider_in_process": True,
        },
        "go": dict(rpc.GO_REFERENCE),
        "targets": dict(rpc.TARGETS),
        "runs": [{}],
        "machine": {"cpus": 2, "python": "3.11.7"},
        "failed_requests": 0,
    }
    lines = rpc.format_report(results).splitlines()
    assert "router in its own process, the echo provider in it (in-process link)" in lines[0]
    assert "targets (not the issue's topology: the provider is in the router's process)" in lines
    results["options"]["provider_in_process"] = False
    lines = rpc.format_report(results).splitlines()
    assert "router and echo provider in their own processes" in lines[0] and "targets" in lines
