"""The ``pulsyflux`` command as users type it: options anywhere, one clear line per
mistake, ping and info, publishing many messages, and what ``reply -c`` reports.

In this reactor (the ``cli`` fixture, tests/console.py): the process boundary is
not what these tests are about.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid

import pytest
import pytest_twisted

from pulsyflux import Consumer, __version__
from pulsyflux.endpoints import address_problem

ensure = pytest_twisted.ensureDeferred


@pytest.fixture
def brokered():
    from pulsyflux.testing import start_server

    running = pytest_twisted.blockon(start_server(http=True))
    yield running
    pytest_twisted.blockon(running.stop())


def one_usage_line(result, command: str) -> str:
    """Exit status 2 and exactly one line on stderr, no traceback."""
    err = result.stderr.decode()
    assert result.returncode == 2, (result.returncode, err)
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"pulsyflux {command}: error: "), err
    return err


# -- item 4: options anywhere -----------------------------------------------------------


@ensure
async def test_options_between_positionals(brokered, cli):
    sub = await brokered.broker.subscribe("orders")
    result = await cli("pub", "orders", "-H", "priority=high", "new order", "--server", brokered.address)
    assert result.returncode == 0, result.stderr
    message = await sub.get()
    assert (message.payload, message.headers) == (b"new order", {"priority": "high"})

    channel = uuid.uuid4()
    from pulsyflux import Provider

    provider = await Provider.connect(brokered.address, channel, handler=lambda data: data.upper())
    result = await cli("request", str(channel), "-t", "1", "hello", "-s", brokered.address)
    assert (result.returncode, result.stdout) == (0, b"HELLO"), result.stderr
    await provider.close()


@ensure
async def test_a_leftover_argument_is_the_commands_error(cli):
    result = await cli("request", str(uuid.uuid4()), "one", "two")
    err = one_usage_line_with_usage(result)
    assert "pulsyflux request: error: unrecognized arguments: two" in err


def one_usage_line_with_usage(result) -> str:
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert err.startswith("usage: pulsyflux request"), err  # the command's usage, not the top level's
    return err


# -- item 6: bad addresses ------------------------------------------------------------


@pytest.mark.parametrize(
    "address, says",
    [
        ("localhost", "'localhost' has no port: give host:port (e.g. 127.0.0.1:9090)"),
        ("127.0.0.1:99999", "port 99999 is out of range: ports are 1 to 65535"),
        ("tcp:nohost", "tcp: needs a port: tcp:host=H:port=P"),
        ("tcp:host=h:port=http", "port 'http' is not a number"),
        ("nonsense:x", "unknown address kind 'nonsense'"),
        ("unix:", "unix: needs a path"),
    ],
)
@ensure
async def test_a_bad_address_is_one_usage_line(cli, address, says):
    result = await cli("request", "--server", address, str(uuid.uuid4()), "x")
    err = one_usage_line(result, "request")
    assert says in err, err
    assert "Unknown endpoint type" not in err and "__init__" not in err and "Overflow" not in err


@ensure
async def test_a_bad_address_from_the_environment_says_where_it_came_from(cli):
    result = await cli("ping", env={"PULSYFLUX_SERVER": "localhost"})
    assert "$PULSYFLUX_SERVER 'localhost': 'localhost' has no port" in one_usage_line(result, "ping")


def test_tls_without_pyopenssl_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "OpenSSL" else real(name, *a))
    problem = address_problem("tls:host=example.com:port=9443")
    assert problem == "TLS needs pyOpenSSL, which is not installed: pip install 'pulsyflux[tls]'"


@ensure
async def test_a_missing_socket_file_is_said_in_words(cli, tmp_path):
    result = await cli("ping", "--server", f"unix:path={tmp_path}/nothing.sock")
    err = result.stderr.decode()
    assert result.returncode == 1 and err.count("\n") == 1, err
    assert "no such socket file (is the server running, listening there?)" in err


@ensure
async def test_the_http_port_is_told_apart_at_once(brokered, cli):
    http = brokered.http_url.split("//", 1)[1]
    # A timeout far longer than the test: only the HTTP answer can end these early.
    for argv in (
        ("request", "-t", "60", str(uuid.uuid4()), "x"),
        ("pub", "--timeout", "60", "orders", "x"),
        ("ping", "-t", "60"),
        ("reply", str(uuid.uuid4()), "--echo"),
    ):
        result = await cli(*argv, "--server", http)
        err = result.stderr.decode()
        assert result.returncode == 1 and err.count("\n") == 1, (argv, err)
        assert "that port does not speak pulsyflux: it answered in HTTP ('HTTP/1.1 400 Bad Request'); " in err, err
        assert "is that the HTTP API's port (--http)?" in err


# -- item 7: reply -c reports how the command ended --------------------------------------


@ensure
async def test_reply_command_killed_by_a_signal_says_which(brokered, cli):
    channel = uuid.uuid4()
    reply = cli.start("reply", "-s", brokered.address, str(channel), "-c", "kill -TERM $$", "-n", "1", "-q")
    await reply.stderr.line("replying")
    consumer = await Consumer.connect(brokered.address, channel)
    with pytest.raises(Exception) as failed:
        await consumer.send(b"x")
    assert str(failed.value) == "command killed by SIGTERM"
    await consumer.close()
    assert (await reply.finished()).returncode == 0


@ensure
async def test_reply_command_past_its_timeout_is_killed_after_n_seconds(brokered, cli):
    channel = uuid.uuid4()
    reply = cli.start(
        "reply", "-s", brokered.address, str(channel), "-c", "exec sleep 60", "--command-timeout", "0.2", "-n", "1"
    )
    await reply.stderr.line("replying")
    consumer = await Consumer.connect(brokered.address, channel)
    with pytest.raises(Exception) as failed:
        await consumer.send(b"x", timeout=30)
    assert str(failed.value) == "command killed after 0.2 s (--command-timeout)"
    await consumer.close()
    await reply.finished()


# -- item 8: headers, plurals -------------------------------------------------------------


@ensure
async def test_a_header_given_twice_is_a_usage_error(brokered, cli):
    result = await cli("pub", "-s", brokered.address, "orders", "x", "-H", "k=1", "-H", "k=2")
    err = one_usage_line(result, "pub")
    assert "header 'k' given twice: a message header has one value" in err
    assert brokered.broker.published == 0


@ensure
async def test_counts_are_singular_when_one(brokered, cli):
    result = await cli("pub", "-s", brokered.address, "orders", "x")
    assert result.stderr == b"published 1 byte to 'orders'\n"


# -- item 9: ping, info, pub --count and --lines ------------------------------------------


@ensure
async def test_ping_measures_round_trips_over_the_pulsyflux_port(brokered, cli):
    result = await cli("ping", "-s", brokered.address, "-c", "3", "-i", "0.01")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith(f"PONG from {brokered.address}: seq=1 time=") and "connected in" in lines[0]
    assert lines[2].startswith(f"PONG from {brokered.address}: seq=3 time=")
    assert lines[3].startswith("3 pings, round trip min/avg/max = ")
    # The server answered the pings as what they are: nothing counted as an error.
    assert brokered.factory.stats.errors == {}


@ensure
async def test_ping_when_nobody_listens(cli):
    result = await cli("ping", "-s", "127.0.0.1:1")
    assert result.returncode == 1
    assert (
        result.stderr
        == b"pulsyflux ping: error: cannot connect to 127.0.0.1:1: connection refused (is the server running?)\n"
    )


@ensure
async def test_info_shows_version_uptime_limits_and_connections(brokered, cli):
    consumer = await Consumer.connect(brokered.address, uuid.uuid4())
    await consumer.ping()
    result = await cli("info", "--http", brokered.http_url)
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    assert f"version         pulsyflux {__version__}\n" in text
    assert f"pid             {os.getpid()}\n" in text
    assert "connections     1 open (1 consumer, 0 providers, 0 unregistered)" in text
    assert "2 connections of the server's own broker" in text
    assert "  max_body            64.0 MiB\n" in text and "  frame_timeout       30.0 s\n" in text
    assert "connections (busiest first)" in text and " consumer " in text
    result = await cli("info", "--json", "--http", brokered.http_url)
    info = json.loads(result.stdout)
    assert info["version"] == __version__ and info["limits"]["max_body"] == 64 << 20
    assert info["connections"]["open"] == 1 and "list" not in info["connections"]
    await consumer.close()


@ensure
async def test_pub_count_publishes_n_messages(brokered, cli):
    sub = await brokered.broker.subscribe("orders")
    result = await cli("pub", "-s", brokered.address, "orders", "same", "--count", "3")
    assert result.stderr == b"published 3 messages (12 bytes) to 'orders'\n"
    assert [(await sub.get()).payload for _ in range(3)] == [b"same"] * 3


@ensure
async def test_pub_lines_publishes_one_message_per_line(brokered, cli):
    sub = await brokered.broker.subscribe("orders")
    result = await cli("pub", "-s", brokered.address, "orders", "--lines", stdin=b"first\n\nthird\nno newline")
    assert result.returncode == 0, result.stderr
    assert result.stderr == b"published 4 messages (20 bytes) to 'orders'\n"
    assert [(await sub.get()).payload for _ in range(4)] == [b"first", b"", b"third", b"no newline"]


@ensure
async def test_pub_lines_takes_no_message(brokered, cli):
    result = await cli("pub", "-s", brokered.address, "orders", "x", "--lines")
    assert "--lines publishes the lines of stdin: give no MESSAGE with it" in one_usage_line(result, "pub")


# -- item 8: the bench report reads like a report -----------------------------------------


def test_the_rpc_bench_report_gives_a_verdict_per_target():
    from pulsyflux.bench import rpc

    medians = {
        "sequential_req_per_s": 9755.0,
        "sequential_p50_us": 73.0,
        "sequential_p99_us": 136.0,
        "relay_rt_per_s": 6852.0,
        "relay_p50_us": 90.0,
        "relay_p99_us": 120.0,
        "sequential_vs_relay": 1.37,
        "inflight_req_per_s": 62166.0,
        "echo_1mib_mb_per_s": 123.0,
        "echo_p50_ms": 7.9,
        "sequential_cpu_us": {"client": 29.0, "router": 41.0},
    }
    results = {
        "medians": medians,
        "options": {"duration": 1.0, "payload": 16, "consumers": 10, "inflight": 16, "large": 1 << 20},
        "go": dict(rpc.GO_REFERENCE),
        "targets": dict(rpc.TARGETS),
        "runs": [{}],
        "machine": {"cpus": 2, "python": "3.11.7"},
        "failed_requests": 1,
    }
    report = rpc.format_report(results)
    assert report.startswith("pulsyflux bench rpc: 1 run, 1.0 s per measurement")
    lines = report.splitlines()
    assert any("in flight" in line and line.endswith("meets target >= 60,000") for line in lines)
    assert any(line.startswith("  echo ") and line.endswith("MISSES target >= 1,000") for line in lines)
    assert any(line.endswith("meets target >= 0.95") for line in lines)
    assert "Go broke" not in report and "1 request FAILED" in lines
    assert not any("bare relay" in line for line in lines)  # no relay echo measured: no line for it
    results["medians"] = {**medians, "relay_echo_mb_per_s": 600.0, "relay_echo_p50_ms": 1.7, "echo_vs_relay": 0.2}
    lines = rpc.format_report(results).splitlines()
    assert "  echo, bare relay (baseline)          600 MB/s    p50 1.7 ms" in lines
    assert "  echo / baseline echo                0.20         (no target)" in lines
    results["medians"] = {**medians, "sequential_vs_relay": 0.92, "inflight_req_per_s": 56925.0}
    lines = rpc.format_report(results).splitlines()
    assert any(line.endswith("MISSES target >= 0.95") for line in lines)
    assert any("in flight" in line and line.endswith("MISSES target >= 60,000") for line in lines)


def test_the_pubsub_bench_report_says_how_often_server_and_bench_shared_a_cpu():
    # The one-at-a-time p50 is tens of microseconds apart between one CPU and two: the report says which it was.
    from pulsyflux.bench import pubsub
    from pulsyflux.bench.common import last_cpu

    if os.path.exists(f"/proc/{os.getpid()}/stat"):
        assert last_cpu(os.getpid()) in range(os.cpu_count() or 1)
    assert last_cpu(2**22 + 12345) is None  # no such process: nothing to say
    medians = {
        "latency_p50_us": 140.0,
        "latency_p99_us": 300.0,
        "latency_ping_p50_us": 110.0,
        "latency_same_cpu_percent": 25.0,
    }
    for name in ("deliveries_per_s", "msgs_per_s", "p50_us", "p99_us"):
        medians[f"flood_1_{name}"] = 1.0
    for name in ("bench", "server"):
        medians[f"flood_1_cpu_{name}_percent"] = medians[f"flood_1_wait_{name}_percent"] = 1.0
    results = {
        "medians": medians,
        "options": {"payload": 100, "fanouts": [1], "modes": ["plain"]},
        "targets": dict(pubsub.TARGETS),
        "runs": [{}],
        "machine": {"cpus": 2, "python": "3.11.7"},
        "dropped": 0,
        "failed": 0,
    }
    lines = pubsub.format_report(results).splitlines()
    assert any(line.strip().startswith("server and bench on one CPU in 25% of the samples") for line in lines)
    del medians["latency_same_cpu_percent"]  # not measured (not Linux): no line
    assert not any("one CPU in" in line for line in pubsub.format_report(results).splitlines())


def test_the_pubsub_bench_pins_itself_and_its_server_to_one_cpu_or_two():
    from pulsyflux.bench import pubsub
    from pulsyflux.bench.common import place

    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("pins to CPUs on Linux with two CPUs or more")
    assert place("any", os.getpid(), []) is None and pubsub.Options().cpus == "any"
    first, second = sorted(os.sched_getaffinity(0))[:2]
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    restore = None
    try:
        restore = place("two", os.getpid(), [child.pid])
        assert os.sched_getaffinity(0) == {first} and os.sched_getaffinity(child.pid) == {second}
        os.sched_setaffinity(0, restore)
        place("one", os.getpid(), [child.pid])
        assert os.sched_getaffinity(0) == os.sched_getaffinity(child.pid) == {first}
        with pytest.raises(ValueError, match="unknown CPU placement 'three'"):
            place("three", os.getpid(), [])
    finally:
        if restore is not None:
            os.sched_setaffinity(0, restore)
        child.communicate(b"")
    parser = argparse.ArgumentParser()
    pubsub.add_arguments(parser)
    assert pubsub.options_from_args(parser.parse_args(["--cpus", "two"])).cpus == "two"
    with pytest.raises(SystemExit):
        parser.parse_args(["--cpus", "three"])
