"""The Python cost of one request in the router, in one process: per request, and before its frames leave.

A ``ServerProtocol`` for a consumer and one for a provider, on transports that
only note when they are written to (no socket, no reactor turn), are fed one
16-byte request (START, CHUNK, END in one read) and its response
(RESPONSE_START, RESPONSE_CHUNK, RESPONSE_END in one read), ``--requests``
times (``--batch`` requests per read). Printed: the medians, over all
requests, of the time from each read to the first write it causes (what the
router adds to a round trip before the next process can start), and of the
CPU of both reads together. The kernel's part (recv, send, epoll) is not in
it: ``pulsyflux bench rpc`` measures the whole.

    python benchmarks/rpc_cost.py --requests 30000
    python benchmarks/rpc_cost.py --requests 30000 --batch 16     # requests in flight
    python -m cProfile -s tottime benchmarks/rpc_cost.py --requests 20000 | head -30
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from typing import Any, Optional

from twisted.internet import reactor

from pulsyflux.server.protocol import ServerFactory
from pulsyflux.wire import codec

_clock = time.perf_counter


class _NotingTransport:
    """Enough of a TCP transport for a ServerProtocol: notes the time of the first write after ``reset``."""

    disconnecting = False

    def __init__(self) -> None:
        self.first_write: Optional[float] = None

    def write(self, data: bytes) -> None:
        if self.first_write is None:
            self.first_write = _clock()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def getPeer(self) -> str:
        return "memory"


def measure(requests: int, batch: int) -> dict[str, float]:
    factory = ServerFactory(reactor)
    consumer, provider = factory.buildProtocol(None), factory.buildProtocol(None)
    to_consumer, to_provider = _NotingTransport(), _NotingTransport()
    consumer.makeConnection(to_consumer)  # type: ignore[arg-type]  # what the router uses of a transport
    provider.makeConnection(to_provider)  # type: ignore[arg-type]
    channel, client_id = uuid.uuid4().bytes, uuid.uuid4().bytes
    provider.dataReceived(codec.encode_registration(codec.ROLE_PROVIDER, uuid.uuid4().bytes, channel, os.urandom(16)))
    consumer.dataReceived(codec.encode_registration(codec.ROLE_CONSUMER, client_id, channel, os.urandom(16)))
    routing, body = client_id + channel, b"x" * 16
    request_hop, response_hop, cpu = [], [], []
    for _ in range(max(1, requests // batch)):
        ids = [os.urandom(16) for _ in range(batch)]
        pieces: list[bytes] = []
        for request_id in ids:
            codec.write_request(pieces.append, request_id, 30_000, client_id, channel, body)
        request = b"".join(pieces)
        response = b"".join(
            codec.encode_frame(codec.RESPONSE_START, request_id, routing)
            + codec.encode_frame(codec.RESPONSE_CHUNK, request_id, body)
            + codec.encode_frame(codec.RESPONSE_END, request_id)
            for request_id in ids
        )
        to_consumer.first_write = to_provider.first_write = None
        cpu_before, started = time.process_time(), _clock()
        consumer.dataReceived(request)
        answered = _clock()
        provider.dataReceived(response)
        cpu.append((time.process_time() - cpu_before) / batch)
        assert to_provider.first_write is not None and to_consumer.first_write is not None
        request_hop.append(to_provider.first_write - started)
        response_hop.append(to_consumer.first_write - answered)
        reactor.runUntilCurrent()  # cancelled timers are cleaned up as in a running reactor
    return {
        "request_to_write_us": statistics.median(request_hop) * 1e6,
        "response_to_write_us": statistics.median(response_hop) * 1e6,
        "cpu_per_request_us": sum(cpu) / len(cpu) * 1e6,
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=30_000, help="requests to route (default 30,000)")
    parser.add_argument("--batch", type=int, default=1, help="requests per read, as with many in flight (default 1)")
    args = parser.parse_args(argv)
    result = measure(args.requests, max(1, args.batch))
    print(
        f"router, {args.batch} per read: read -> first write {result['request_to_write_us']:.2f} us (request), "
        f"{result['response_to_write_us']:.2f} us (response); CPU {result['cpu_per_request_us']:.2f} us per request"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
