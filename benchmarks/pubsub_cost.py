"""CPU per delivered message over the whole pub/sub path, in one process: for profiles and instruction counts.

A BrokerService, one publishing BrokerClient and ``--subscribers``
subscriptions of another BrokerClient, all in this process and over TCP
loopback, so one profile holds the publisher's encode, the server's routing,
the broker's fan-out and the subscriber's decode and reads. The publisher
stays ``--window`` messages ahead of the slowest subscription (nothing is
dropped); every message is checked to arrive once and in order.

    python benchmarks/pubsub_cost.py --messages 20000 --subscribers 1
    python -m cProfile -s tottime benchmarks/pubsub_cost.py --messages 20000 | head -40
    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out python benchmarks/pubsub_cost.py --messages 5000

Under valgrind the instruction count (``Collected``, or ``callgrind_annotate``)
does not depend on other load on the machine: compare two versions by it.
``--warmup`` messages go first and are not counted in the CPU figure (the
count under valgrind includes them, and the start-up).
"""

from __future__ import annotations

import argparse
import struct
import time
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, DeferredList

from pulsyflux.broker import BrokerClient
from pulsyflux.service import BrokerService

_SEQ = struct.Struct(">Q")


async def measure(messages: int, subscribers: int, payload: int, window: int, warmup: int, batch: bool) -> dict:
    svc = BrokerService("tcp:0:interface=127.0.0.1", reactor=reactor, grace=0)
    svc.startService()
    pub = sub_client = None
    try:
        await svc.whenReady()
        address = f"127.0.0.1:{svc.server.port.getHost().port}"
        pub = await BrokerClient.connect(address, reactor=reactor)
        sub_client = await BrokerClient.connect(address, reactor=reactor)
        subs = [await sub_client.subscribe("cost", buffer=window) for _ in range(subscribers)]
        total = warmup + messages
        received = [0] * subscribers
        state = {"published": 0, "mark": None}
        filler = b"x" * max(0, payload - _SEQ.size)

        def top_up() -> None:
            limit = min(total, min(received) + window)
            while state["published"] < limit:
                # No timeout: under valgrind everything is 50 times slower.
                pub.publish("cost", _SEQ.pack(state["published"]) + filler, timeout=0).addErrback(failed)
                state["published"] += 1

        def failed(failure: Any) -> None:
            for reader in readers:
                if not reader.called:
                    reader.errback(failure)

        def count(index: int, seq: int) -> None:
            if seq != received[index]:
                raise AssertionError(f"subscriber {index}: message {seq} where {received[index]} was due")
            received[index] += 1
            if received[index] == warmup and min(received) == warmup:
                state["mark"] = (time.perf_counter(), time.process_time())
            if not received[index] & 63:
                top_up()

        async def read(index: int, sub: Any) -> None:
            unpack = _SEQ.unpack_from
            if batch and hasattr(sub, "batches"):
                async for msgs in sub.batches():
                    for msg in msgs:
                        count(index, unpack(msg.payload)[0])
                    if received[index] >= total:
                        return
            else:
                async for msg in sub:
                    count(index, unpack(msg.payload)[0])
                    if received[index] >= total:
                        return

        readers = [Deferred.fromCoroutine(read(i, s)) for i, s in enumerate(subs)]
        if not warmup:
            state["mark"] = (time.perf_counter(), time.process_time())
        top_up()
        await DeferredList(readers, fireOnOneErrback=True, consumeErrors=True)
        wall0, cpu0 = state["mark"]
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        deliveries = messages * subscribers
        return {
            "deliveries": deliveries,
            "dropped": sum(s.dropped for s in subs),
            "deliveries_per_s": deliveries / wall,
            "cpu_us_per_delivery": cpu / deliveries * 1e6,
            "cpu_us_per_message": cpu / messages * 1e6,
        }
    finally:
        for client in (pub, sub_client):
            if client is not None:
                await client.close()
        await svc.stopService()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000, help="messages counted (default 20000)")
    parser.add_argument("--warmup", type=int, default=2_000, help="messages before counting (default 2000)")
    parser.add_argument("--subscribers", type=int, default=1, help="subscriptions of the topic (default 1)")
    parser.add_argument("--payload", type=int, default=100, help="payload bytes, at least 8 (default 100)")
    parser.add_argument("--window", type=int, default=2_000, help="messages ahead of the slowest (default 2000)")
    parser.add_argument(
        "--batches", action="store_true", help="read with Subscription.batches() (where it exists) instead of get()"
    )
    args = parser.parse_args()

    async def run() -> None:
        r = await measure(args.messages, args.subscribers, max(8, args.payload), args.window, args.warmup, args.batches)
        print(
            f"{r['deliveries']:,} deliveries ({args.subscribers} subscribers, {args.payload} B): "
            f"{r['deliveries_per_s']:,.0f}/s, CPU {r['cpu_us_per_delivery']:.2f} us per delivery, "
            f"{r['cpu_us_per_message']:.2f} us per message, {r['dropped']} dropped"
        )

    task.react(lambda _reactor: Deferred.fromCoroutine(run()))  # exits 1 with the traceback if run fails


if __name__ == "__main__":
    main()
