"""NATS pub/sub and request/reply through a raw client of the NATS text protocol over Twisted.

    python benchmarks/peers/nats_peer.py --port 4222 [--duration S --warmup S]

Prints one JSON line with the request rows and the pub/sub rows (see
workload.py). The client speaks the protocol itself: it answers the server's
INFO with CONNECT (verbose off, so no +OK per command), writes PUB commands
with ``transport.write`` (the commands of one reactor turn leave in one write,
pipelined), SUBs and then PINGs, and takes the PONG as the server's word that
the subscription is in place. Requests are NATS's own request/reply: the
requester subscribes to an inbox once and publishes each request with a
reply subject under it; a responder process (this script, ``responder``)
echoes each request's payload to its reply subject.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Optional

import workload
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

Handler = Callable[[bytes, list[bytes]], None]  # (payload, [subject, sid, (reply subject), size])


class Nats(Protocol):
    """One NATS connection: PUB, SUB, and MSG parsing; ``ready`` fires after the first PONG."""

    transport: Any  # a TCP (or process) transport, set before connectionMade

    def __init__(self) -> None:
        self.ready: Deferred[Nats] = Deferred()
        self.handlers: dict[bytes, Handler] = {}
        self.pongs: list[Deferred[None]] = []
        self.buffer = b""
        self.chunks: list[bytes] = []  # a large MSG still arriving: its pieces, unjoined
        self.chunked = 0
        self.need = 0  # bytes the buffer must hold before it can be parsed further
        self.sids = iter(range(1, 1 << 30))
        self.error: Optional[str] = None

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.write = self.transport.write

    def ping(self) -> "Deferred[None]":
        d: Deferred[None] = Deferred()
        self.pongs.append(d)
        self.write(b"PING\r\n")
        return d

    def subscribe(self, subject: bytes, handler: Handler) -> "Deferred[None]":
        sid = b"%d" % next(self.sids)
        self.handlers[sid] = handler
        self.write(b"SUB %s %s\r\n" % (subject, sid))
        return self.ping()

    def publisher(self, subject: bytes) -> Callable[[bytes], None]:
        write = self.write

        def publish(payload: bytes) -> None:
            write(b"PUB %s %d\r\n%s\r\n" % (subject, len(payload), payload))

        return publish

    def publish(self, subject: bytes, payload: bytes, reply: bytes) -> None:
        """One request: ``payload`` to ``subject``, its answer wanted on ``reply``."""
        self.write(b"PUB %s %s %d\r\n%s\r\n" % (subject, reply, len(payload), payload))

    def dataReceived(self, data: bytes) -> None:
        if self.need:
            self.chunks.append(data)
            self.chunked += len(data)
            if self.chunked < self.need:
                return
            data = b"".join(self.chunks)
            self.chunks, self.chunked, self.need = [], 0, 0
        else:
            data = self.buffer + data if self.buffer else data
        pos, size = 0, len(data)
        handlers = self.handlers
        while pos < size:
            end = data.find(b"\r\n", pos)
            if end < 0:
                break
            if data.startswith(b"MSG ", pos):
                head = data[pos + 4 : end].split(b" ")  # subject sid [reply] bytes
                start = end + 2
                stop = start + int(head[-1])
                if stop + 2 > size:
                    self.need = stop + 2 - pos
                    break
                handler = handlers.get(head[1])
                if handler is not None:
                    handler(data[start:stop], head)
                pos = stop + 2
                continue
            line = data[pos:end]
            pos = end + 2
            if line == b"PING":
                self.write(b"PONG\r\n")
            elif line == b"PONG":
                if self.pongs:
                    self.pongs.pop(0).callback(None)
            elif line.startswith(b"INFO "):
                if not self.ready.called:
                    self.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":false,"name":"bench"}\r\n')
                    self.ping().addCallback(lambda _: self.ready.callback(self))
            elif line.startswith(b"-ERR"):
                self.error = line.decode(errors="replace")[:200]
        rest = data[pos:]
        if self.need:
            self.chunks, self.chunked, self.buffer = [rest], len(rest), b""
        else:
            self.buffer = rest

    def connectionLost(self, reason: Any = None) -> None:
        why = RuntimeError(self.error or "the NATS server closed the connection")
        for d in self.pongs:
            d.errback(why)
        self.pongs = []


async def connect(reactor: Any, port: int) -> Nats:
    protocol = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Nats())
    return await protocol.ready


class Requester:
    """Requests over one connection: one inbox subscription, a reply subject per request."""

    def __init__(self, nats: Nats, service: bytes) -> None:
        self.nats = nats
        self.service = service
        self.inbox = b"_INBOX." + os.urandom(8).hex().encode() + b"."
        self.waiting: dict[bytes, Deferred[bytes]] = {}
        self.ids = iter(range(1 << 62))

    def start(self) -> "Deferred[None]":
        return self.nats.subscribe(self.inbox + b"*", self._reply)

    def _reply(self, payload: bytes, head: list[bytes]) -> None:
        waiting = self.waiting.pop(head[0], None)
        if waiting is not None:
            waiting.callback(payload)

    def call(self, payload: bytes) -> "Deferred[bytes]":
        reply = b"%s%d" % (self.inbox, next(self.ids))
        d: Deferred[bytes] = Deferred()
        self.waiting[reply] = d
        self.nats.publish(self.service, payload, reply)
        return d


def respond(port: int, service: bytes) -> None:
    """The responder process: echo every request on ``service`` to its reply subject."""
    from twisted.internet import reactor

    async def start() -> None:
        nats = await connect(reactor, port)
        write = nats.write

        def echo(payload: bytes, head: list[bytes]) -> None:
            if len(head) == 4:
                write(b"PUB %s %d\r\n%s\r\n" % (head[2], len(payload), payload))

        await nats.subscribe(service, echo)
        print("ready", flush=True)

    workload.serve_child(reactor, start)


async def run(reactor: Any, port: int, settings: workload.Settings, responder_python: str) -> dict:
    counter = iter(range(1 << 30))

    async def pair(n: int) -> tuple:
        subject = b"bench.%d.%s" % (next(counter), os.urandom(4).hex().encode())
        publisher = await connect(reactor, port)
        subscribers = [await connect(reactor, port) for _ in range(n)]
        subscribes = [
            lambda on_message, s=s: s.subscribe(subject, lambda payload, _head: on_message(payload))
            for s in subscribers
        ]

        async def close() -> None:
            for protocol in [publisher, *subscribers]:
                protocol.transport.loseConnection()

        return publisher.publisher(subject), subscribes, close

    service = b"bench.echo." + os.urandom(4).hex().encode()
    responder = workload.spawn(reactor, responder_python, __file__, "responder", str(port), service.decode())
    try:
        await responder.ready
        requesters = []
        for _ in range(settings.consumers):
            requester = Requester(await connect(reactor, port), service)
            await requester.start()
            requesters.append(requester)
        result = await workload.requests(reactor, [r.call for r in requesters], settings)
        for requester in requesters:
            requester.nats.transport.loseConnection()
    finally:
        await responder.stop()
    result.update(await workload.pubsub(reactor, pair, settings))
    return result


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "responder":
        respond(int(argv[1]), argv[2].encode())
        return 0
    settings, rest = workload.settings_from_argv(argv)
    if len(rest) != 2 or rest[0] != "--port":
        sys.exit("usage: nats_peer.py --port PORT [--duration S] [--warmup S]")
    from twisted.internet import reactor

    return workload.main(reactor, lambda: run(reactor, int(rest[1]), settings, sys.executable))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
