"""The ``pulsyflux`` command against a real server on 127.0.0.1 over TCP.

Most tests run the command in this reactor (the ``cli`` fixture,
tests/console.py: same parsing, output and exit status as the process);
a few run it as a separate process, as a user does, where that is what is
tested: ``python -m``, exit statuses of a real process, Ctrl-C, a stdin
pipe, a stdout pipe that fills up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task, threads

from pulsyflux import Consumer, NoProviderError, Provider, RemoteError
from pulsyflux.cli import build_parser, main

ensure = pytest_twisted.ensureDeferred

COMMANDS = ["pub", "sub", "request", "reply", "ping", "info", "stats", "bench", "bench rpc"]
# Each option is offered only by the commands that use it.
USES_SERVER = {"pub", "sub", "request", "reply", "ping", "info", "stats"}
USES_BROKER_CHANNEL = {"pub", "sub"}


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PULSYFLUX_")}
    env.update(extra)
    return env


def process(*args: str, stdin: bytes = b"", env: dict | None = None, timeout: float = 30) -> defer.Deferred:
    """Run ``python -m pulsyflux ARGS`` off the reactor thread, so the server
    in this reactor keeps serving it; fires with the CompletedProcess."""
    return threads.deferToThread(
        subprocess.run,
        [sys.executable, "-m", "pulsyflux", *args],
        input=stdin,
        capture_output=True,
        env=env or _env(),
        timeout=timeout,
    )


_spawned: list[subprocess.Popen] = []


# Execs the command with SIGINT at its default, as a terminal's foreground job has it: a process
# started with SIGINT ignored (pytest run as a background job, `cmd &`) passes that on, and Python then
# installs no KeyboardInterrupt handler, so the Ctrl-C tests would wait out their timeout.
_FOREGROUND = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
)


def spawn(*args: str) -> subprocess.Popen:
    """Start a long-running command (as a foreground job: Ctrl-C reaches it); the ``_no_leftovers``
    fixture kills it if a test fails."""
    process = subprocess.Popen(
        [sys.executable, "-c", _FOREGROUND, sys.executable, "-m", "pulsyflux", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    _spawned.append(process)
    return process


@pytest.fixture(autouse=True)
def _no_leftovers():
    yield
    while _spawned:
        process = _spawned.pop()
        if process.poll() is None:
            process.kill()
        process.communicate()


def one_line_error(result: subprocess.CompletedProcess, command: str) -> str:
    """The process failed with exactly one line on stderr and no traceback."""
    err = result.stderr.decode()
    assert result.returncode == 1, (result.returncode, err)
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith(f"pulsyflux {command}: error: "), err
    return err


# -- help and usage -----------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([*command.split(), "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: pulsyflux {command}")
    assert ("--server ADDRESS" in out) == (command in USES_SERVER)
    assert ("--broker-channel UUID" in out) == (command in USES_BROKER_CHANNEL)


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("pub", "sub", "request", "reply", "stats", "bench"):
        assert f"    {command} " in out


def test_no_command_prints_usage_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: pulsyflux" in capsys.readouterr().err


def test_server_defaults_to_env_then_localhost(monkeypatch):
    monkeypatch.delenv("PULSYFLUX_SERVER", raising=False)
    assert build_parser().parse_args(["request", str(uuid.uuid4()), "x"]).server == "127.0.0.1:9090"
    monkeypatch.setenv("PULSYFLUX_SERVER", "127.0.0.1:7000")
    assert build_parser().parse_args(["request", str(uuid.uuid4()), "x"]).server == "127.0.0.1:7000"
    args = build_parser().parse_args(["request", "--server", "127.0.0.1:7001", str(uuid.uuid4()), "x"])
    assert args.server == "127.0.0.1:7001"


def test_bad_channel_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["request", "not-a-uuid", "x"])
    assert exited.value.code == 2
    assert "'not-a-uuid' is not a channel id: channels are UUIDs" in capsys.readouterr().err


def test_reply_needs_echo_or_command(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["reply", str(uuid.uuid4())])
    assert exited.value.code == 2
    assert "one of the arguments --echo --command/-c is required" in capsys.readouterr().err


def test_bench_needs_a_kind(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["bench"])
    assert exited.value.code == 2
    assert "pulsyflux bench rpc" in capsys.readouterr().err


def test_console_script_points_at_main():
    from importlib.metadata import distribution

    # The distribution's own entry points: entry_points(group=...) needs Python 3.10.
    eps = distribution("pulsyflux").entry_points
    (script,) = [ep for ep in eps if ep.group == "console_scripts" and ep.name == "pulsyflux"]
    assert script.load() is main


@ensure
async def test_python_dash_m_runs_the_cli():
    result = await process("--version")
    assert result.returncode == 0
    assert result.stdout.decode().startswith("pulsyflux ")


# -- request ------------------------------------------------------------------------


@ensure
async def test_request_prints_the_response_bytes(server, channel, cli):
    provider = await Provider.connect(server.address, channel, handler=lambda data: b"echo:" + data)
    result = await cli("request", "--server", server.address, str(channel), "hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"echo:hello"  # byte for byte: no newline added on a pipe
    assert result.stderr == b""
    await provider.close()


@ensure
async def test_request_reads_stdin_and_server_from_env(server, channel):
    provider = await Provider.connect(server.address, channel, handler=lambda data: data[::-1])
    body = bytes(range(256)) * 4
    result = await process("request", str(channel), stdin=body, env=_env(PULSYFLUX_SERVER=server.address))
    assert result.returncode == 0, result.stderr
    assert result.stdout == body[::-1]
    await provider.close()


@ensure
async def test_request_when_the_server_is_down(server):
    port = reactor.listenTCP(0, server.factory, interface="127.0.0.1")
    closed_address = f"127.0.0.1:{port.getHost().port}"
    await port.stopListening()
    result = await process("request", "--server", closed_address, str(uuid.uuid4()), "x")
    err = one_line_error(result, "request")
    assert f"cannot connect to {closed_address}: connection refused (is the server running?)" in err
    assert result.stdout == b""


@ensure
async def test_request_without_a_provider(server, channel, cli):
    result = await cli("request", "--server", server.address, str(channel), "x")
    assert "no provider answered (peer disappeared)" in one_line_error(result, "request")


@ensure
async def test_request_times_out(server, channel, cli):
    provider = await Provider.connect(server.address, channel)  # receives, never answers
    result = await cli("request", "--server", server.address, "--timeout", "0.2", str(channel), "x")
    assert "request timed out after 0.2 s" in one_line_error(result, "request")
    await provider.close()


@ensure
async def test_request_reports_the_providers_error(server, channel, cli):
    def refuse(data: bytes) -> bytes:
        raise ValueError("no such order")

    provider = await Provider.connect(server.address, channel, handler=refuse)
    result = await cli("request", "--server", server.address, str(channel), "x")
    assert "the provider answered with an error: no such order" in one_line_error(result, "request")
    await provider.close()


# -- reply ----------------------------------------------------------------------------


async def _ready(process: subprocess.Popen) -> str:
    """The line a long-running command prints on stderr once it is registered."""
    return (await threads.deferToThread(process.stderr.readline)).decode()


async def _finished(process: subprocess.Popen, timeout: float = 15) -> tuple[int, bytes, bytes]:
    out, err = await threads.deferToThread(process.communicate, timeout=timeout)
    return process.returncode, out, err


@ensure
async def test_reply_echo_answers_and_prints_each_request(server, channel, cli):
    reply = cli.start("reply", "--server", server.address, str(channel), "--echo", "--count", "2")
    assert f"replying on channel {channel}" in await reply.stderr.line("replying")
    consumer = await Consumer.connect(server.address, channel)
    assert await consumer.send(b"first") == b"first"
    assert await consumer.send(b"line\nbreak") == b"line\nbreak"
    code, out, err = await reply.finished()
    assert code == 0, err
    assert out == b"#1 first\n#2 line\\nbreak\n"
    await consumer.close()


@ensure
async def test_reply_command_answers_with_its_output(server, channel, cli):
    reply = cli.start("reply", "-s", server.address, str(channel), "--command", "tr a-z A-Z", "--count", "1", "-q")
    await reply.stderr.line("replying")
    consumer = await Consumer.connect(server.address, channel)
    assert await consumer.send(b"shout") == b"SHOUT"
    code, out, err = await reply.finished()
    assert (code, out) == (0, b""), err
    await consumer.close()


@ensure
async def test_reply_command_failure_becomes_the_request_error(server, channel, cli):
    reply = cli.start("reply", "-s", server.address, str(channel), "-c", "echo 'bad input' >&2; exit 3", "-n", "1")
    await reply.stderr.line("replying")
    consumer = await Consumer.connect(server.address, channel)
    # (How `request` prints a provider's error: test_request_reports_the_providers_error.)
    with pytest.raises(RemoteError, match="^command exited with status 3: bad input$"):
        await consumer.send(b"x")
    code, _, err = await reply.finished()
    assert code == 0, err
    await consumer.close()


@ensure
async def test_ctrl_c_stops_reply_cleanly(server, channel):
    process = spawn("reply", "--server", server.address, str(channel), "--echo")
    await _ready(process)
    consumer = await Consumer.connect(server.address, channel)
    assert await consumer.send(b"alive?") == b"alive?"
    (provider_conn,) = [conn for (role, ch, _), conn in server.registry.items() if role == 2 and ch == channel.bytes]
    gone = provider_conn.closed()
    process.send_signal(signal.SIGINT)
    code, out, err = await _finished(process)
    assert code == 130
    assert err == b"" and out == b"#1 alive?\n"
    await gone  # it closed its connection on the way out
    with pytest.raises(NoProviderError):
        await consumer.send(b"still there?")
    await consumer.close()


@ensure
async def test_ctrl_c_interrupts_a_waiting_request(server, channel):
    provider = await Provider.connect(server.address, channel)  # never answers
    process = spawn("request", "--server", server.address, "--timeout", "30", str(channel), "x")
    await provider.receive()  # the request is in flight
    process.send_signal(signal.SIGINT)
    code, out, err = await _finished(process)
    assert (code, out, err) == (130, b"", b"")
    await provider.close()


@ensure
async def test_reply_exits_when_the_server_goes_away(server, channel, cli):
    reply = cli.start("reply", "--server", server.address, str(channel), "--echo")
    await reply.stderr.line("replying")
    server.factory.router.close_all()
    code, _, err = await reply.finished()
    assert code == 1
    assert err.decode().splitlines()[-1] == f"pulsyflux reply: error: lost the connection to {server.address}"


# -- stats ------------------------------------------------------------------------------


@pytest.fixture
def served():
    from pulsyflux.testing import start_server

    running = pytest_twisted.blockon(start_server(http=True, broker=False))
    yield running
    pytest_twisted.blockon(running.stop())


@ensure
async def test_stats_summarises_the_http_stats(served, channel, cli):
    provider = await Provider.connect(served.address, channel, handler=lambda data: data)
    consumer = await Consumer.connect(served.address, channel)
    await consumer.send(b"x")
    http = f"127.0.0.1:{served.http_port}"
    result = await cli("stats", "--http", http)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[1].startswith("connections     2 open (1 consumer, 1 provider, 0 unregistered)")
    assert "requests        1 routed, 1 answered, 0 in flight" in lines
    [latency] = [line for line in lines if line.startswith("latency ")]
    assert latency.startswith("latency         mean ") and latency.endswith(" (1 request)")
    assert "errors          none" in lines

    result = await cli("stats", "--json", env={"PULSYFLUX_HTTP": served.http_url})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["server"]["requests"]["routed"] == 1
    await consumer.close()
    await provider.close()


@ensure
async def test_stats_shows_topics_and_each_subscription(cli):
    from pulsyflux.testing import start_server

    running = await start_server(http=True)
    try:
        sub = await running.broker.subscribe("orders")
        await running.broker.publish("orders", b"x")
        await sub.get()
        result = await cli("stats", "--http", f"127.0.0.1:{running.http_port}")
    finally:
        await running.stop()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert "broker          1 published, " in "\n".join(lines)
    assert "  orders  1 subscriber" in lines
    assert lines[-2] == "subscriptions (slowest first)"
    assert lines[-1].startswith("  sub-1  orders  backlog 0  in flight 0  ")  # a label, never the channel
    assert lines[-1].endswith("dropped 0")


def test_stats_looks_for_the_http_api_next_to_the_server(monkeypatch):
    from pulsyflux.cli.parser import finish_args

    monkeypatch.delenv("PULSYFLUX_HTTP", raising=False)
    args = build_parser().parse_args(["stats", "--server", "10.1.2.3:9090"])
    finish_args(args)
    assert args.http_url == "http://10.1.2.3:8222"
    monkeypatch.setenv("PULSYFLUX_HTTP", "http://127.0.0.1:9999/")
    args = build_parser().parse_args(["stats"])
    finish_args(args)
    assert args.http_url == "http://127.0.0.1:9999"


@pytest.mark.parametrize(
    ("server", "http_url"),
    [
        ("unix:/run/pulsyflux.sock", "http://127.0.0.1:8222"),  # was http://unix:8222
        ("unix:path=/run/pulsyflux.sock", "http://127.0.0.1:8222"),
        ("tcp:host=example.com:port=9090", "http://example.com:8222"),  # was 127.0.0.1: another server's stats
        ("tcp:example.com:9090", "http://example.com:8222"),
        ("tls:host=example.com:port=9443:trustRoots=/ca", "http://example.com:8222"),
        ("tcp6:host=2001\\:db8\\:\\:1:port=9090", "http://[2001:db8::1]:8222"),
        ("[::1]:9090", "http://[::1]:8222"),  # was http://[::1]:8222 by luck
        ("example.com:9090", "http://example.com:8222"),
    ],
)
def test_stats_finds_the_http_api_beside_any_server_address(monkeypatch, server, http_url):
    from pulsyflux.cli.parser import finish_args

    monkeypatch.delenv("PULSYFLUX_HTTP", raising=False)
    args = build_parser().parse_args(["stats", "--server", server])
    finish_args(args)
    assert args.http_url == http_url


@ensure
async def test_stats_when_the_http_api_is_down(served, cli):
    port = reactor.listenTCP(0, served.site, interface="127.0.0.1")
    closed = f"127.0.0.1:{port.getHost().port}"
    await port.stopListening()
    result = await cli("stats", "--http", closed)
    err = one_line_error(result, "stats")
    assert f"cannot reach the HTTP API at {closed}: connection refused (started with --http?)" in err


# -- pub and sub ----------------------------------------------------------------------


@pytest.fixture
def brokered():
    from pulsyflux.testing import start_server

    running = pytest_twisted.blockon(start_server())
    yield running
    pytest_twisted.blockon(running.stop())


@ensure
async def test_pub_then_sub_json_lines(brokered, cli):
    seen = await brokered.broker.subscribe("orders")
    result = await cli("pub", "--server", brokered.address, "orders", "new order", "-H", "priority=high", "-H", "a=b=c")
    assert result.returncode == 0, result.stderr
    assert result.stderr == b"published 9 bytes to 'orders'\n"
    result = await cli("pub", "-s", brokered.address, "-q", "orders", stdin=b"two\nlines")
    assert (result.returncode, result.stderr) == (0, b"")
    await cli("pub", "-s", brokered.address, "-q", "orders", stdin=b"\xff\x00")
    published = [await seen.get() for _ in range(3)]
    # One command at a time in this process: what pub published goes through sub now.
    sub = cli.start("sub", "--server", brokered.address, "orders", "--count", "3", "--json")
    assert "subscribed to 'orders'" in await sub.stderr.line("subscribed to")
    for message in published:
        await brokered.broker.publish(message.topic, message.payload, message.headers)
    code, out, err = await sub.finished()
    assert code == 0, err
    assert [json.loads(line) for line in out.splitlines()] == [
        {"topic": "orders", "payload": "new order", "headers": {"priority": "high", "a": "b=c"}},
        {"topic": "orders", "payload": "two\nlines", "headers": {}},
        {"topic": "orders", "payload_base64": "/wA=", "headers": {}},
    ]


@ensure
async def test_sub_to_a_pattern_in_a_queue_group(brokered, cli):
    other = await brokered.broker.subscribe("jobs.*", group="workers")  # the group's other member
    sub = cli.start("sub", "-s", brokered.address, "jobs.*", "--group", "workers", "-n", "2", "--json")
    assert "subscribed to 'jobs.*' in queue group 'workers'" in await sub.stderr.line("subscribed to")
    for n in range(4):
        await brokered.broker.publish(f"jobs.{n}", str(n).encode())
    code, out, err = await sub.finished()
    assert code == 0, err
    got = [(m["topic"], m["payload"]) for m in map(json.loads, out.splitlines())]
    theirs = [((await other.get()).topic) for _ in range(2)]
    assert sorted([t for t, _ in got] + theirs) == ["jobs.0", "jobs.1", "jobs.2", "jobs.3"]  # each once
    assert got in ([("jobs.0", "0"), ("jobs.2", "2")], [("jobs.1", "1"), ("jobs.3", "3")])  # round-robin
    result = await cli("pub", "-s", brokered.address, "jobs.*", "x")
    assert result.returncode == 2  # usage
    assert result.stderr.decode().endswith(
        "pulsyflux pub: error: argument TOPIC: token 2 is the wildcard '*': wildcards are for subscribing;"
        " publish to a concrete topic\n"
    )


@ensure
async def test_sub_prints_one_line_per_message(brokered, cli):
    sub = cli.start("sub", "--server", brokered.address, "news", "-n", "2")
    await sub.stderr.line("subscribed to")
    await brokered.broker.publish("news", b"first\nsecond")
    await brokered.broker.publish("news", b"\xffdone", {"priority": "high", "id": "7"})
    code, out, err = await sub.finished()
    assert code == 0, err
    assert out == b"news: first\\nsecond\nnews [id=7 priority=high]: \\xffdone\n"


@ensure
async def test_sub_raw_prints_only_payloads(brokered, cli):
    sub = cli.start("sub", "--server", brokered.address, "news", "-n", "1", "--raw")
    await sub.stderr.line("subscribed to")
    await brokered.broker.publish("news", b"first\nsecond", {"k": "v"})
    code, out, err = await sub.finished()
    assert (code, out) == (0, b"first\\nsecond\n"), err


@ensure
async def test_sub_on_several_topics_at_once(brokered, cli):
    sub = cli.start("sub", "--server", brokered.address, "orders", "news", "-n", "3")
    assert "subscribed to 'orders', 'news'" in await sub.stderr.line("subscribed to")
    await brokered.broker.publish("news", b"1")
    await sub.stdout.line("news: 1")
    await brokered.broker.publish("orders", b"2")
    await sub.stdout.line("orders: 2")
    await brokered.broker.publish("elsewhere", b"not for us")
    await brokered.broker.publish("news", b"3")
    code, out, err = await sub.finished()
    assert (code, out) == (0, b"news: 1\norders: 2\nnews: 3\n"), err


@ensure
async def test_ctrl_c_stops_sub_and_unsubscribes(brokered):
    process = spawn("sub", "--server", brokered.address, "news")
    await _ready(process)
    assert brokered.broker.stats()["topics"] == {"news": 1}
    await brokered.broker.publish("news", b"one")
    assert await threads.deferToThread(process.stdout.readline) == b"news: one\n"
    process.send_signal(signal.SIGINT)
    code, out, err = await _finished(process)
    assert (code, out, err) == (130, b"", b"")
    # It unsubscribed (and the broker confirmed) before it exited.
    assert brokered.broker.stats()["topics"] == {}


@ensure
async def test_pub_without_a_broker(server, cli):
    result = await cli("pub", "--server", server.address, "orders", "x")
    err = one_line_error(result, "pub")
    assert f"no broker answers on channel 4cf5ad4a-c843-56c7-921e-35cba21980e2 at {server.address}" in err


@ensure
async def test_pub_refuses_reserved_and_empty_topics(brokered, cli):
    for topic in ("$pulsyflux/subscribe", ""):
        result = await cli("pub", "--server", brokered.address, topic, "x")
        assert result.returncode == 2
        assert b"pulsyflux pub: error: argument TOPIC:" in result.stderr
    assert brokered.broker.published == 0


@ensure
async def test_sub_ends_with_an_error_when_the_server_goes_away(brokered, cli):
    sub = cli.start("sub", "--server", brokered.address, "news")
    await sub.stderr.line("subscribed to")
    await brokered.stop()
    code, _, err = await sub.finished()
    assert code == 1
    assert err.decode().splitlines()[-1].startswith("pulsyflux sub: error: subscription to 'news' closed: ")


@ensure
async def test_sub_says_when_the_broker_dropped_messages_for_it(brokered):
    from pulsyflux import Broker

    channel = uuid.uuid4()
    tight = await Broker.connect(brokered.address, channel, backlog=5)  # keeps little for a slow reader
    try:
        process = spawn("sub", "--server", brokered.address, "--broker-channel", str(channel), "flood", "--raw")
        await _ready(process)
        # Nobody reads its stdout yet: once the pipe is full, `sub` blocks, and the broker must drop.
        payload = b"x" * 4000
        for _ in range(300):
            await tight.publish("flood", payload)
        # Now read; the broker tells the subscriber how many it dropped with the next message.
        await tight.publish("flood", b"last")

        def read_until_last() -> list[bytes]:
            lines = []
            while not lines or lines[-1] != b"last\n":
                lines.append(process.stdout.readline())
            return lines

        lines = await threads.deferToThread(read_until_last)
        process.send_signal(signal.SIGINT)
        code, _, err = await _finished(process)
        dropped = tight.stats()["dropped"]
    finally:
        await tight.close()
    assert code == 130
    assert 1 < len(lines) < 300 and set(lines[:-1]) == {payload + b"\n"}
    assert dropped > 0
    # One notice or several (the broker tells the running total with its next forward): all of it, nothing else.
    notices = err.decode().splitlines()
    assert all(n.startswith("pulsyflux sub: the broker dropped ") for n in notices), notices
    assert all(n.endswith(" for us (reading too slowly)") for n in notices), notices
    assert sum(int(n.split()[5]) for n in notices) == dropped


# -- bench (the wiring only: benchmarks never run in the test suite) -------------------


class _FakeBench:
    """Stands in for pulsyflux.bench.rpc: same calls, instant results."""

    def __init__(self, clock, failed=0):
        self.clock = clock
        self.failed = failed

    def options_from_args(self, args):
        return {"runs": 2}

    async def _measure(self, reactor, options, progress):
        for number in (1, 2):
            progress(f"run {number}/2")
            await task.deferLater(self.clock, 1.0, lambda: None)
            progress(f"run {number} done: 1,000 req/s")
        return {"medians": {"req_per_s": 1000}, "failed_requests": self.failed}

    def measure(self, reactor, options, progress=None):
        return defer.Deferred.fromCoroutine(self._measure(reactor, options, progress or (lambda message: None)))

    def format_report(self, results):
        return f"fake bench: {results['medians']['req_per_s']:,} req/s"


def _bench_args(module, json_output=False):
    import argparse

    return argparse.Namespace(command="bench", bench_module=module, json=json_output)


def _run_bench(clock, args):
    from pulsyflux.cli.commands import cmd_bench

    d = defer.Deferred.fromCoroutine(cmd_bench(clock, args))
    for _ in range(10):
        clock.advance(0.25)
    assert d.called
    return d.result


def test_bench_prints_the_report_and_no_bar_when_piped(capsys):
    clock = task.Clock()
    assert _run_bench(clock, _bench_args(_FakeBench(clock))) == 0
    captured = capsys.readouterr()
    assert captured.out == "fake bench: 1,000 req/s\n"
    assert captured.err == ""


def test_bench_json_and_exit_status_on_failures(capsys):
    clock = task.Clock()
    assert _run_bench(clock, _bench_args(_FakeBench(clock, failed=3), json_output=True)) == 1
    assert json.loads(capsys.readouterr().out) == {"medians": {"req_per_s": 1000}, "failed_requests": 3}


def test_bench_draws_a_progress_bar_on_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    clock = task.Clock()
    assert _run_bench(clock, _bench_args(_FakeBench(clock))) == 0
    captured = capsys.readouterr()
    frames = captured.err.split("\r\x1b[K")
    assert frames[1] == "[" + "." * 24 + "]   0.0s starting"
    assert "[" + "." * 24 + "]   0.0s run 1/2" in frames
    assert "[" + "#" * 12 + "." * 12 + "]   1.0s run 1 done: 1,000 req/s" in frames
    assert "[" + "#" * 12 + "." * 12 + "]   1.0s run 2/2" in frames
    assert "[" + "#" * 24 + "]   2.0s run 2 done: 1,000 req/s" in frames
    assert frames[-1] == ""  # the bar is wiped before the report
    assert captured.out == "fake bench: 1,000 req/s\n"


class _OneRunBench(_FakeBench):
    async def _measure(self, reactor, options, progress):
        progress("run 1/1")
        await task.deferLater(self.clock, 2.0, lambda: None)
        progress("run 1 done: 1,000 req/s")
        return {"medians": {"req_per_s": 1000}, "failed_requests": 0}


def test_bench_bar_moves_during_a_single_run(capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    clock = task.Clock()
    assert _run_bench(clock, _bench_args(_OneRunBench(clock))) == 0
    frames = capsys.readouterr().err.split("\r\x1b[K")
    during = [frame.split("]")[0] + "]" for frame in frames if frame.endswith("run 1/1")]
    assert len(set(during)) > 3  # the block moves: not one empty bar for the whole run
    assert all(bar.count("#") == 4 for bar in during)
    assert "[" + "#" * 24 + "]   2.0s run 1 done: 1,000 req/s" in frames


# -- surviving a server restart ---------------------------------------------------------


@ensure
async def test_sub_with_reconnect_survives_a_server_restart(cli):
    from pulsyflux import BrokerService

    from .test_broker_reconnect import crash, within

    old = BrokerService("tcp:0:interface=127.0.0.1", broker_channel=uuid.uuid4())
    old.startService()
    await within(old.whenReady())
    number = old.server.port.getHost().port
    address = f"127.0.0.1:{number}"
    sub = cli.start("sub", "-s", address, "--broker-channel", str(old.broker_channel), "news", "-n", "2", "--reconnect")
    assert "subscribed to 'news'" in await sub.stderr.line("subscribed to")
    await old.publish("news", b"before")
    assert await sub.stdout.line("before") == "news: before\n"

    await crash(old.factory, old.server.port)  # the server's process dies...
    old.server.port = None
    fresh = BrokerService(f"tcp:{number}:interface=127.0.0.1", broker_channel=old.broker_channel)
    fresh.startService()  # ...and a new one starts on the same port
    await within(fresh.whenReady())
    assert "lost the broker for 'news'" in await sub.stderr.line("lost the broker")
    back = await sub.stderr.line("again after")
    assert "subscribed to 'news' again after" in back and "messages published meanwhile were missed" in back
    await fresh.publish("news", b"after")
    code, out, err = await sub.finished()
    assert (code, out) == (0, b"news: before\nnews: after\n"), err
    await fresh.stopService()
    await old.stopService()


@ensure
async def test_reply_with_reconnect_survives_a_server_restart(channel, cli):
    from pulsyflux import ServerFactory

    from .test_broker_reconnect import crash

    factory = ServerFactory(reactor)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    number = port.getHost().port
    address = f"127.0.0.1:{number}"
    reply = cli.start("reply", "-s", address, str(channel), "--echo", "-n", "1", "--reconnect")
    assert "replying on channel" in await reply.stderr.line("replying")

    await crash(factory, port)
    factory = ServerFactory(reactor)
    port = reactor.listenTCP(number, factory, interface="127.0.0.1")
    assert address in await reply.stderr.line("reconnected to")
    consumer = await Consumer.connect(address, channel)
    assert await consumer.send(b"still here") == b"still here"
    code, out, err = await reply.finished()
    assert code == 0, err
    await consumer.close()
    await port.stopListening()
