"""CPU the client library spends per delivery: publisher and subscribers here, the server in a child process.

`pulsyflux bench pubsub` adds its own bookkeeping per message (a timestamp
in each payload, latency samples); this measures only what an application
pays: ``BrokerClient.publish`` per message and ``async for`` over each
subscription, the publisher staying at most 2,000 messages ahead of the
slowest subscriber (nothing dropped). The server and its broker run as
``pulsyflux bench pubsub`` runs them (``BrokerService`` in a child process).

    python benchmarks/pubsub_client.py --messages 100000
    python benchmarks/pubsub_client.py --messages 20000 --subscribers 10
    python benchmarks/pubsub_client.py --messages 100000 --publish-many     # one Deferred per top-up
    python -m cProfile -s tottime benchmarks/pubsub_client.py --messages 50000 | head -40
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred

from pulsyflux import BrokerClient, Message
from pulsyflux.bench.common import cpu_seconds, spawn


async def measure(messages: int, subscribers: int, payload: int, window: int, many: bool = False) -> dict:
    child = spawn(reactor, sys.executable, "server", "pulsyflux.bench.pubsub", "server")
    try:
        address = f"127.0.0.1:{int(await child.ready)}"
        publisher = await BrokerClient.connect(address, reactor=reactor)
        subscriber = await BrokerClient.connect(address, reactor=reactor)
        subs = [await subscriber.subscribe("client-cost", buffer=1000) for _ in range(subscribers)]
        received = [0] * subscribers
        published = [0]
        body = b"x" * payload

        one = Message("client-cost", body)

        def top_up() -> None:
            limit = min(messages, min(received) + window)
            if many and published[0] < limit:
                publisher.publish_many([one] * (limit - published[0]))
                published[0] = limit
            while published[0] < limit:
                publisher.publish("client-cost", body)
                published[0] += 1

        async def read(index: int, sub: Any) -> None:
            async for _ in sub:
                received[index] += 1
                if not received[index] & 63:
                    top_up()
                if received[index] >= messages:
                    return

        server0, wall0, cpu0 = cpu_seconds(child.pid), time.perf_counter(), time.process_time()
        readers = [Deferred.fromCoroutine(read(i, s)) for i, s in enumerate(subs)]
        top_up()
        for reader in readers:
            await reader
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        server = cpu_seconds(child.pid) - server0
        deliveries = messages * subscribers
        await publisher.close()
        await subscriber.close()
        return {
            "deliveries_per_s": deliveries / wall,
            "client_us_per_delivery": cpu / deliveries * 1e6,
            "server_us_per_delivery": server / deliveries * 1e6,
            "dropped": sum(s.dropped for s in subs),
        }
    finally:
        await child.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000, help="messages published (default 100000)")
    parser.add_argument("--subscribers", type=int, default=1, help="subscriptions of the topic (default 1)")
    parser.add_argument("--payload", type=int, default=100, help="payload bytes (default 100)")
    parser.add_argument("--window", type=int, default=2_000, help="messages ahead of the slowest (default 2000)")
    parser.add_argument(
        "--publish-many",
        action="store_true",
        help="publish each top-up with one publish_many instead of a publish each",
    )
    args = parser.parse_args()

    async def run() -> None:
        r = await measure(args.messages, args.subscribers, args.payload, args.window, args.publish_many)
        print(
            f"{args.messages * args.subscribers:,} deliveries ({args.subscribers} subscribers, {args.payload} B): "
            f"{r['deliveries_per_s']:,.0f}/s; CPU per delivery: client {r['client_us_per_delivery']:.2f} us, "
            f"server {r['server_us_per_delivery']:.2f} us; {r['dropped']} dropped"
        )

    task.react(lambda _reactor: Deferred.fromCoroutine(run()))  # exits 1 with the traceback if run fails


if __name__ == "__main__":
    main()
