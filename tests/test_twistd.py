"""``twistd pulsyflux`` as an operator meets it: bad options, listeners, logs.

The one-line, exit 1 promise for bad options is about what the process
prints: two real ``twistd`` processes check it; each message is checked
in-process, through the option parser twistd itself runs. The rest runs
in-process too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.logger import LogLevel, capturedLogs, formatEvent

TWISTD = Path(sys.executable).parent / "twistd"


def twistd(cwd: Path, *args: str, prelude: str = "") -> subprocess.CompletedProcess:
    """``twistd -n pulsyflux ARGS`` to its end; ``prelude`` runs first in the same interpreter."""
    argv = ["twistd", "-n", "--pidfile=", "pulsyflux", *args]
    if prelude:
        script = f"import sys; {prelude}; sys.argv = {argv!r}; from twisted.scripts.twistd import run; run()"
        command = [sys.executable, "-c", script]
    else:
        command = [str(TWISTD), *argv[1:]]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=60)


def one_line(done: subprocess.CompletedProcess) -> str:
    """The only line a refused start printed (it must print exactly one, and start nothing)."""
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 1, lines
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0] and "starting up" not in lines[0]
    return lines[0]


def refused(cwd: Path, *args: str) -> str:
    """What ``twistd -n pulsyflux ARGS`` exits with, parsed in this process as twistd parses it.

    twistd's own ``ServerOptions`` hands the subcommand's options to ours;
    a bad one raises SystemExit with the line the process prints (Python
    prints a SystemExit's text on stderr and exits 1; the processes below
    check that end of it).
    """
    from twisted.scripts.twistd import ServerOptions

    here = os.getcwd()
    os.chdir(cwd)  # relative file names are the operator's
    try:
        ServerOptions().parseOptions(["-n", "--pidfile=", "pulsyflux", *args])
    except SystemExit as exited:
        assert isinstance(exited.code, str), exited.code
        assert "\n" not in exited.code
        return exited.code
    finally:
        os.chdir(here)
    raise AssertionError(f"twistd pulsyflux {' '.join(args)} was accepted")


def test_a_bad_option_is_one_line_and_exit_status_1_from_a_real_twistd(tmp_path):
    line = one_line(twistd(tmp_path, "--port", "abc"))
    assert line.startswith("twistd pulsyflux: --port: 'abc' is not a port or a server endpoint description")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--port", "abc"], "twistd pulsyflux: --port: 'abc' is not a port or a server endpoint description"),
        (["--http", "abc"], "twistd pulsyflux: --http: 'abc' is not a port or a server endpoint description"),
        (["--port", "99999"], "twistd pulsyflux: --port: 'tcp:99999:interface=127.0.0.1': the port must be 0-65535"),
        (["--grace", "-1"], "twistd pulsyflux: --grace must be a number of seconds, 0 or more, not '-1'"),
        (["--max-connections", "0"], "twistd pulsyflux: --max-connections must be a whole number greater than 0"),
        (["--no-such-option"], "twistd pulsyflux: option --no-such-option not recognized"),
    ],
)
def test_a_bad_option_is_one_line(tmp_path, args, says):
    assert refused(tmp_path, *args).startswith(says)


def test_tls_without_pyopenssl_says_what_to_install_from_a_real_twistd(tmp_path):
    done = twistd(tmp_path, "--port", "ssl:9443:privateKey=server.pem", prelude="sys.modules['OpenSSL'] = None")
    assert one_line(done) == "twistd pulsyflux: --port: ssl: needs pyOpenSSL: pip install 'pulsyflux[tls]'"


@pytest.mark.parametrize("kind", ["ssl", "mtls"])
def test_tls_without_pyopenssl_says_what_to_install(tmp_path, kind, monkeypatch):
    monkeypatch.setitem(sys.modules, "OpenSSL", None)  # what an install without the [tls] extra has
    line = refused(tmp_path, "--port", f"{kind}:9443:privateKey=server.pem")
    assert line == f"twistd pulsyflux: --port: {kind}: needs pyOpenSSL: pip install 'pulsyflux[tls]'"


def test_a_tls_file_that_is_missing_is_named(tmp_path):
    line = refused(tmp_path, "--port", "ssl:9443:privateKey=missing.pem")
    assert line.endswith(f"No such file or directory: {tmp_path / 'missing.pem'}")


def test_grace_zero_is_allowed():
    from pulsyflux.service import Options

    options = Options()
    options.parseOptions(["--grace", "0"])
    assert options["grace"] == 0.0


# -- listeners not on loopback -----------------------------------------------------


def _warnings(events: list) -> list[str]:
    return [formatEvent(event) for event in events if event.get("log_level") == LogLevel.warn]


@pytest_twisted.ensureDeferred
async def test_a_listener_not_on_loopback_is_a_warning_naming_what_it_exposes():
    from pulsyflux.http import http_service
    from pulsyflux.service import BrokerService

    top = BrokerService("tcp:0:interface=0.0.0.0", broker_channel=None)
    web = http_service("tcp:0:interface=0.0.0.0", top)
    web.setServiceParent(top)
    with capturedLogs() as events:
        top.startService()
        try:
            server_port = (await top.server.whenListening()).getHost().port
            http_port = (await web.whenListening()).getHost().port
        finally:
            await top.stopService()
    warned = _warnings(events)
    assert any(f"pulsyflux server listens on 0.0.0.0:{server_port} (all interfaces), not loopback" in w for w in warned)
    assert any(f"pulsyflux HTTP API listens on 0.0.0.0:{http_port}" in w and "POST /publish" in w for w in warned)
    assert len(warned) == 2, warned


@pytest_twisted.ensureDeferred
async def test_loopback_and_unix_listeners_are_not_warned_about(tmp_path):
    from pulsyflux.service import BrokerService

    with capturedLogs() as events:
        for listen in ("tcp:0:interface=127.0.0.1", "tcp6:0:interface=\\:\\:1", f"unix:{tmp_path / 'pf.sock'}"):
            top = BrokerService(listen, broker_channel=None)
            top.startService()
            try:
                await top.server.whenListening()
            finally:
                await top.stopService()
    assert _warnings(events) == []


# -- logs ----------------------------------------------------------------------------


def _lines(events: list, needle: str) -> list[str]:
    return [line for line in (formatEvent(event) for event in events) if needle in line]


@pytest_twisted.ensureDeferred
async def test_clients_connecting_and_leaving_are_logged_without_their_channel():
    import uuid

    from pulsyflux import Consumer, Provider
    from pulsyflux.testing import start_server

    server = await start_server(broker=False)
    channel = uuid.uuid4()
    try:
        with capturedLogs() as events:
            provider = await Provider.connect(server.address, channel, handler=lambda data: data)
            consumer = await Consumer.connect(server.address, channel)
            assert await consumer.send(b"x") == b"x"
            await consumer.close()
            await provider.close()
            await server.stop()
    finally:
        await server.stop()
    connected = _lines(events, "connected")
    left = _lines(events, ") left after")
    assert len(connected) == 2 and all(line.startswith("client 127.0.0.1:") for line in connected)
    assert sorted(line.split("(")[1].split(")")[0] for line in left) == ["consumer", "provider"]
    everything = " ".join(formatEvent(event) for event in events)
    assert str(channel) not in everything and channel.hex not in everything


@pytest_twisted.ensureDeferred
async def test_connection_lines_are_rate_limited():
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol

    from pulsyflux.testing import start_server

    server = await start_server(broker=False)
    limiter = server.factory.router.log_limiter
    limiter.interval = 3600.0  # one interval for the whole test, however slow the machine
    port = int(server.address.rsplit(":", 1)[1])
    try:
        with capturedLogs() as events:
            protos = [
                await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Protocol()) for _ in range(25)
            ]
            for proto in protos:
                proto.transport.loseConnection()
            await eventually_gone(server)
            limiter.stop()  # the summaries, now
    finally:
        await server.stop()
    assert len([line for line in _lines(events, "connected") if line.startswith("client ")]) == limiter.burst
    assert len(_lines(events, "(unregistered) left after")) == limiter.burst
    assert len(_lines(events, "15 more 'client connected' lines")) == 1
    assert len(_lines(events, "15 more 'client left' lines")) == 1


async def eventually_gone(server) -> None:
    from .helpers import eventually

    await eventually(lambda: not server.factory.router.peers)


@pytest_twisted.ensureDeferred
async def test_subscriptions_do_not_log_starting_factory_lines():
    from pulsyflux.service import BrokerService

    top = BrokerService("tcp:0:interface=127.0.0.1")
    with capturedLogs() as events:
        top.startService()
        try:
            broker = await top.whenReady()
            subs = [await broker.subscribe(f"t{n}") for n in range(3)]
            await broker.publish("t0", b"x")
            assert (await subs[0].get()).payload == b"x"
        finally:
            await top.stopService()
    assert _lines(events, "Starting factory") == [] and _lines(events, "Stopping factory") == []


@pytest_twisted.ensureDeferred
async def test_monitoring_probes_write_no_access_log_lines():
    import treq

    from pulsyflux.testing import start_server

    server = await start_server(http=True, broker=False)
    try:
        with capturedLogs() as events:
            for path in ("/metrics", "/healthz", "/metrics", "/no-such-page"):
                response = await treq.get(server.http_url + path, persistent=False)
                await response.content()
    finally:
        await server.stop()
    assert _lines(events, "GET /metrics") == [] and _lines(events, "GET /healthz") == []
    assert len(_lines(events, "GET /no-such-page")) == 1  # everything else still is


def _observer(level: str, log_format: str):
    """What twistd -n (no --logfile: stdout) logs to with these pulsyflux options."""
    from pulsyflux import logs

    options = {"nodaemon": True, "logfile": None, "logger": None}
    logs.configure(options, level, log_format)
    assert options["logger"] == "pulsyflux.logs.twistd_observer"  # what twistd will import and call
    return logs.twistd_observer()


def _emit(observer, level: LogLevel, text: str, **fields) -> None:
    import time

    observer({"log_level": level, "log_format": text, "log_time": time.time(), "log_namespace": "test", **fields})


def _plugin_cache_event(observer) -> None:
    """What twisted.plugin logs (through the legacy log.msg) when it cannot write dropin.cache."""
    text = "Unable to write to plugin cache /site/twisted/plugins/dropin.cache: error number 13"
    fmt = "Unable to write to plugin cache %(path)s: error number %(errno)d"
    _emit(observer, LogLevel.info, "{log_text}", format=fmt, log_text=text)


def test_log_level_and_plugin_cache_noise(capsys):
    observer = _observer("warn", "text")
    _emit(observer, LogLevel.info, "an info line")
    _emit(observer, LogLevel.warn, "a warning")
    shown = capsys.readouterr().out
    assert "a warning" in shown and "an info line" not in shown

    _plugin_cache_event(_observer("info", "text"))
    assert capsys.readouterr().out == ""
    _plugin_cache_event(_observer("debug", "text"))  # debug shows it
    assert "Unable to write to plugin cache /site/" in capsys.readouterr().out


def test_json_lines(capsys):
    import json

    _emit(_observer("info", "json"), LogLevel.info, "hello {who}", who="operator")
    [line] = capsys.readouterr().out.splitlines()
    record = json.loads(line)
    assert (record["level"], record["logger"], record["message"]) == ("info", "test", "hello operator")
    assert record["time"].endswith("+00:00")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--log-level", "loud"], "twistd pulsyflux: --log-level must be one of debug, info, warn, error, critical"),
        (["--log-format", "xml"], "twistd pulsyflux: --log-format must be one of text, json, not 'xml'"),
    ],
)
def test_a_bad_log_option_is_one_line(tmp_path, args, says):
    assert refused(tmp_path, *args).startswith(says)


def test_json_and_a_logger_of_ones_own_are_one_choice_too_many(tmp_path):
    from twisted.scripts.twistd import ServerOptions

    with pytest.raises(SystemExit) as exited:
        ServerOptions().parseOptions(
            ["-n", "--pidfile=", "--logger=pulsyflux.logs.twistd_observer", "pulsyflux", "--log-format", "json"]
        )
    assert exited.value.code == "twistd pulsyflux: --log-format and twistd's --logger both choose how to log: give one"


@pytest_twisted.ensureDeferred
async def test_twistd_logs_json_lines(tmp_path):
    import json

    from .twistd_process import spawn_twistd

    proc = spawn_twistd(TWISTD.parent, tmp_path, "--port", "tcp:0:interface=127.0.0.1", "--log-format", "json")
    try:
        await proc.listening
    finally:
        assert await proc.terminate(), proc.output
    records = [json.loads(line) for line in proc.output.splitlines()]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any(record["message"] == "Server Shut Down." for record in records)


# -- size limits: in payload bytes ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_max_body_is_in_payload_bytes_for_published_messages():
    """A published payload of max_body bytes passes (its base64 is a third larger);
    one far past it is refused, saying the numbers, and counted once."""
    from pulsyflux import BrokerClient, ServerOverloaded
    from pulsyflux.testing import start_server

    server = await start_server(max_body=100_000)
    publisher = await BrokerClient.connect(server.address)
    subscriber = await BrokerClient.connect(server.address)
    try:
        subscription = await subscriber.subscribe("big")
        await publisher.publish("big", b"x" * 100_000)  # 133,336 bytes of base64 on the wire
        assert (await subscription.get()).payload == b"x" * 100_000
        with pytest.raises(ServerOverloaded) as refused:
            await publisher.publish("big", b"x" * 2_000_000)
        assert "1181912-byte limit for broker messages (payloads of up to 100000 bytes, in base64)" in str(
            refused.value
        )
        router = server.factory.router
        assert router.stats.errors["request too large"] == 1
    finally:
        await publisher.close()
        await subscriber.close()
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_max_body_still_bounds_other_requests_in_bytes():
    import uuid

    from pulsyflux import Consumer, Provider, ServerOverloaded
    from pulsyflux.testing import start_server

    server = await start_server(broker=False, max_body=100_000)
    channel = uuid.uuid4()
    provider = await Provider.connect(server.address, channel, handler=lambda data: b"ok")
    consumer = await Consumer.connect(server.address, channel)
    try:
        assert await consumer.send(b"x" * 100_000) == b"ok"
        with pytest.raises(ServerOverloaded, match="exceeds the server's 100000-byte limit$"):
            await consumer.send(b"x" * 100_001)
    finally:
        await consumer.close()
        await provider.close()
        await server.stop()
