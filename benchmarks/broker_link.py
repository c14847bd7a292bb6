"""The broker's own link to its server: BrokerService, local subscribers, ``service.publish``.

Everything runs in one process, so every hop between the broker and the
router is the broker's link (in-process since issue 8, TCP loopback before):
deliveries per second and CPU microseconds per delivery (process time, so
a busy machine changes the first figure more than the second).

    python benchmarks/broker_link.py --messages 20000 --subscribers 10
    PYTHONPATH=/path/to/other/checkout python benchmarks/broker_link.py   # compare
"""

from __future__ import annotations

import argparse
import time

from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred

from pulsyflux.service import BrokerService

WINDOW = 1000  # publishes in flight at most


async def measure(messages: int, subscribers: int, payload: int) -> dict[str, float]:
    svc = BrokerService("tcp:0:interface=127.0.0.1", reactor=reactor, grace=0)
    svc.startService()
    try:
        await svc.whenReady()
        subs = [await svc.subscribe("t", buffer=10_000) for _ in range(subscribers)]
        body = b"x" * payload

        async def read(sub) -> None:
            for _ in range(messages):
                await sub.get()

        async def publish() -> None:
            flight = []
            for _ in range(messages):
                flight.append(svc.publish("t", body))
                if len(flight) >= WINDOW:
                    await DeferredList(flight, fireOnOneErrback=True)
                    flight = []
            await DeferredList(flight, fireOnOneErrback=True)

        wall, cpu = time.perf_counter(), time.process_time()
        work = [ensureDeferred(publish())] + [ensureDeferred(read(sub)) for sub in subs]
        await DeferredList(work, fireOnOneErrback=True, consumeErrors=True)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        await svc.stopService()
    deliveries = messages * subscribers
    return {"deliveries_per_s": deliveries / wall, "cpu_us_per_delivery": 1e6 * cpu / deliveries}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--subscribers", type=int, default=10)
    parser.add_argument("--payload", type=int, default=100)
    args = parser.parse_args()
    result: dict[str, float] = {}

    async def run() -> None:
        result.update(await measure(args.messages, args.subscribers, args.payload))

    def done(outcome):
        reactor.stop()
        return outcome

    reactor.callWhenRunning(lambda: ensureDeferred(run()).addBoth(done))
    reactor.run()
    print(
        f"{args.subscribers} subscriber(s): {result['deliveries_per_s']:,.0f} deliveries/s, "
        f"{result['cpu_us_per_delivery']:.2f} CPU us per delivery"
    )


if __name__ == "__main__":
    main()
