"""Redis pub/sub through a raw pipelined client (Twisted + hiredis's reply parser).

    python benchmarks/peers/redis_peer.py --port 6379 [--duration S --warmup S]

Prints one JSON line with the pub/sub rows (see workload.py). PUBLISH commands
are written as the RESP bytes and go out with ``transport.write`` (so the
commands of one reactor turn leave in one write, pipelined); the publisher's
integer replies are read and dropped. Each subscriber is a connection of its
own that SUBSCRIBEs to the topic; hiredis splits what arrives into messages.
Redis has no request/reply of its own, so the request rows are not measured.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import workload
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol


def command(*parts: bytes) -> bytes:
    """One RESP command (an array of bulk strings)."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


class Publisher(Protocol):
    """Writes PUBLISH commands; drops the replies (each says how many subscribers got the message)."""

    transport: Any  # a TCP (or process) transport, set before connectionMade

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)

    def publisher(self, topic: bytes) -> Callable[[bytes], None]:
        head = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n" % (len(topic), topic)
        write = self.transport.write

        def publish(payload: bytes) -> None:
            write(b"%s$%d\r\n%s\r\n" % (head, len(payload), payload))

        return publish

    def dataReceived(self, data: bytes) -> None:
        pass  # ":N\r\n" per PUBLISH


class Subscriber(Protocol):
    """One SUBSCRIBE; every ["message", topic, payload] push goes to ``on_message``."""

    transport: Any  # a TCP (or process) transport, set before connectionMade

    def __init__(self) -> None:
        import hiredis

        self.reader = hiredis.Reader()
        self.on_message: Callable[[bytes], None] = lambda payload: None
        self.subscribed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)

    def subscribe(self, topic: bytes, on_message: Callable[[bytes], None]) -> "Deferred[None]":
        self.on_message = on_message
        self.transport.write(command(b"SUBSCRIBE", topic))
        return self.subscribed

    def dataReceived(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        gets, on_message = reader.gets, self.on_message
        reply = gets()
        while reply is not False:
            if reply[0] == b"message":
                on_message(reply[2])
            elif reply[0] == b"subscribe" and not self.subscribed.called:
                self.subscribed.callback(None)
            reply = gets()


async def run(reactor: Any, port: int, settings: workload.Settings) -> dict:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    counter = iter(range(1 << 30))

    async def pair(n: int) -> tuple:
        topic = b"bench.%d.%s" % (next(counter), os.urandom(4).hex().encode())
        publisher = await connectProtocol(endpoint, Publisher())
        subscribers = [await connectProtocol(endpoint, Subscriber()) for _ in range(n)]
        subscribes = [lambda on_message, s=s: s.subscribe(topic, on_message) for s in subscribers]

        async def close() -> None:
            for protocol in [publisher, *subscribers]:
                protocol.transport.loseConnection()

        return publisher.publisher(topic), subscribes, close

    return await workload.pubsub(reactor, pair, settings)


def main(argv: list[str]) -> int:
    settings, rest = workload.settings_from_argv(argv)
    if len(rest) != 2 or rest[0] != "--port":
        sys.exit("usage: redis_peer.py --port PORT [--duration S] [--warmup S]")
    from twisted.internet import reactor

    return workload.main(reactor, lambda: run(reactor, int(rest[1]), settings))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
