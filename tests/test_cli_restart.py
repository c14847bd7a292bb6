"""``sub --reconnect`` and ``reply --reconnect`` across real restarts of ``twistd pulsyflux``.

The server runs as its own process (tests/twistd_process.py) and is stopped
the way operators stop it, SIGTERM: a clean shutdown in which the broker
tells its subscribers it closed. The commands run in this reactor (the
``cli`` fixture): what matters here is the server's process boundary.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from pulsyflux import BrokerClient, Consumer

from .twistd_process import TwistdProcess

ensure = pytest_twisted.ensureDeferred
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_twistd(cwd: Path, port: int) -> TwistdProcess:
    """``twistd -n pulsyflux`` on ``port``, from this checkout (an editable install needs its plugin on the path)."""
    proto = TwistdProcess()
    twistd = str(Path(sys.executable).parent / "twistd")
    argv = [twistd, "-n", "--pidfile=", "pulsyflux", "--port", f"tcp:{port}:interface=127.0.0.1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    reactor.spawnProcess(proto, twistd, argv, env=env, path=str(cwd))
    return proto


def within(d, seconds: float = 30.0):
    """``d`` (a Deferred or a coroutine), failing with TimeoutError rather than hanging the test."""
    if not isinstance(d, Deferred):
        d = Deferred.fromCoroutine(d)
    return d.addTimeout(seconds, reactor)


async def publish(address: str, topic: str, payload: bytes) -> None:
    client = await BrokerClient.connect(address)
    try:
        await client.publish(topic, payload)
    finally:
        await client.close()


@ensure
async def test_sub_reconnect_waits_for_the_server_and_survives_sigterm_restarts(cli, tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    servers: list[TwistdProcess] = []
    sub = cli.start("sub", "-s", address, "news", "-n", "2", "--reconnect")
    try:
        # Down at start: it waits, and says so once.
        waiting = await within(sub.stderr.line("waiting for it"))
        assert "connection refused" in waiting and "--reconnect" in waiting
        servers.append(start_twistd(tmp_path, port))
        await within(servers[-1].listening)
        assert "subscribed to 'news'" in await within(sub.stderr.line("subscribed to 'news' at"))
        await publish(address, "news", b"before")
        assert await within(sub.stdout.line("before")) == "news: before\n"

        assert await within(servers[-1].terminate())  # SIGTERM: a clean shutdown, the broker says it closed
        lost = await within(sub.stderr.line("lost the broker"))
        assert "lost the broker for 'news'" in lost and "may be missed" in lost
        servers.append(start_twistd(tmp_path, port))
        await within(servers[-1].listening)
        back = await within(sub.stderr.line("again after"))
        assert "subscribed to 'news' again after" in back and "messages published meanwhile were missed" in back
        await publish(address, "news", b"after")
        code, out, err = await within(sub.finished())
        assert (code, out) == (0, b"news: before\nnews: after\n"), err
        assert b"subscription to 'news' closed" not in err
        assert err.count(b"lost the broker") == 1, err  # one line per loss, though both the notice and the line tell it
    finally:
        sub.stop()
        for server in servers:
            await within(server.terminate())


@ensure
async def test_reply_reconnect_says_when_its_connection_drops(cli, tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    channel = uuid.uuid4()
    servers = [start_twistd(tmp_path, port)]
    reply = cli.start("reply", "-s", address, str(channel), "--echo", "-n", "1", "--reconnect")
    try:
        await within(servers[-1].listening)
        await within(reply.stderr.line("replying on channel"))
        assert await within(servers[-1].terminate())
        lost = await within(reply.stderr.line("lost the connection"))
        assert f"pulsyflux reply: lost the connection to {address}" in lost and "reconnecting" in lost
        servers.append(start_twistd(tmp_path, port))
        await within(servers[-1].listening)
        assert "answering again" in await within(reply.stderr.line("reconnected to"))
        consumer = await Consumer.connect(address, channel)
        assert await consumer.send(b"still here") == b"still here"
        await consumer.close()
        assert (await within(reply.finished())).returncode == 0
    finally:
        reply.stop()
        for server in servers:
            await within(server.terminate())
