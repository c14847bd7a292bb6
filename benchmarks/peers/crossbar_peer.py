"""Crossbar.io with Autobahn|Python clients (Twisted) over WAMP RawSocket with MessagePack.

    <crossbar venv>/bin/python benchmarks/peers/crossbar_peer.py --port 8080 [--duration S --warmup S]

Runs in Crossbar's own virtualenv (it needs autobahn; nothing of it enters the
project's). Prints one JSON line with the request and pub/sub rows (see
workload.py). Every client is an ``ApplicationSession`` of its own on a
connection of its own, joined to ``realm1``: requests are WAMP calls to a
procedure that a callee process (this script, ``callee``) registers and that
returns its argument; messages are WAMP publishes (unacknowledged, the
default) to a topic each subscriber session subscribes to.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import workload
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint

REALM = "realm1"


async def join(reactor: Any, port: int) -> Any:
    """A session joined to the realm over RawSocket + MessagePack."""
    from autobahn.twisted.rawsocket import WampRawSocketClientFactory
    from autobahn.twisted.wamp import ApplicationSession
    from autobahn.wamp.serializer import MsgPackSerializer
    from autobahn.wamp.types import ComponentConfig

    joined: Deferred[Any] = Deferred()

    class Session(ApplicationSession):  # type: ignore[misc]
        def onJoin(self, details: Any) -> None:
            joined.callback(self)

        def onDisconnect(self) -> None:
            if not joined.called:
                joined.errback(RuntimeError("Crossbar closed the connection before the session joined"))

    factory = WampRawSocketClientFactory(lambda: Session(ComponentConfig(realm=REALM)), serializer=MsgPackSerializer())
    protocol = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    protocol.transport.setTcpNoDelay(True)
    return await joined


def callee(port: int, procedure: str) -> None:
    """The callee process: registers ``procedure``, which returns its argument."""
    from twisted.internet import reactor

    async def start() -> None:
        session = await join(reactor, port)
        await session.register(lambda payload: payload, procedure)
        print("ready", flush=True)

    workload.serve_child(reactor, start)


async def run(reactor: Any, port: int, settings: workload.Settings) -> dict:
    procedure = "bench.echo." + os.urandom(4).hex()
    helper = workload.spawn(reactor, sys.executable, __file__, "callee", str(port), procedure)
    sessions = []
    try:
        await helper.ready
        for _ in range(settings.consumers):
            sessions.append(await join(reactor, port))
        calls = [lambda payload, s=s: s.call(procedure, payload) for s in sessions]
        result = await workload.requests(reactor, calls, settings)
    finally:
        for session in sessions:
            session.leave()
        await helper.stop()

    counter = iter(range(1 << 30))

    async def pair(n: int) -> tuple:
        topic = f"bench.{next(counter)}.{os.urandom(4).hex()}"
        publisher = await join(reactor, port)
        subscribers = [await join(reactor, port) for _ in range(n)]
        subscribes = [lambda on_message, s=s: s.subscribe(on_message, topic) for s in subscribers]

        async def close() -> None:
            for session in [publisher, *subscribers]:
                session.leave()

        return (lambda payload: publisher.publish(topic, payload)), subscribes, close

    result.update(await workload.pubsub(reactor, pair, settings))
    return result


def main(argv: list[str]) -> int:
    import txaio

    txaio.use_twisted()
    if len(argv) == 3 and argv[0] == "callee":
        callee(int(argv[1]), argv[2])
        return 0
    settings, rest = workload.settings_from_argv(argv)
    if len(rest) != 2 or rest[0] != "--port":
        sys.exit("usage: crossbar_peer.py --port PORT [--duration S] [--warmup S]")
    from twisted.internet import reactor

    return workload.main(reactor, lambda: run(reactor, int(rest[1]), settings))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
