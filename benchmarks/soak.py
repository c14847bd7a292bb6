"""Soak benchmark (not a test): a server under steady mixed load for a set time.

The server (router + broker, as ``twistd pulsyflux`` runs them) lives in its
own process so its memory can be measured; this process runs the clients:
50 consumers sending requests back to back to 5 providers, 1 publisher, and
20 subscribers of which 5 read deliberately slowly. At the end it reports
requests completed, messages published and delivered, drops (which must be
the slow subscribers' counted drops and nothing else), errors, and the
server's peak RSS (VmHWM).

    python benchmarks/soak.py                 # 60 s
    python benchmarks/soak.py --seconds 10 --rate 500
    python benchmarks/soak.py --own-broker    # the broker in the server process, linked in-process
    python benchmarks/soak.py --auth          # the same, checking tokens and grants (twistd --auth)

With ``--auth`` every client presents a token granting exactly what it does
(its channel, the soak topic) and the server's own broker checks each
publish and subscription; compare it with ``--own-broker``, the same setup
without checks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from typing import Any

CONSUMERS, PROVIDERS, SUBSCRIBERS, SLOW = 50, 5, 20, 5
TOPIC = "soak"
SECRET_ENV = "PULSYFLUX_SOAK_AUTH_SECRET"  # --auth: the HS256 secret, given to the server process


def token(grants: dict[str, list[str]]) -> str | None:
    """A token granting ``grants`` when the server checks them (--auth), else None."""
    secret = os.environ.get(SECRET_ENV)
    if not secret:
        return None
    from pulsyflux.auth.tokens import Key, mint

    return mint(Key.hs256("soak", secret), grants, 3600, subject="soak")


def serve(own_broker: bool = False) -> None:
    """The server process: router + broker on an ephemeral loopback port; stats on request.

    The broker connects over TCP, or in-process with ``own_broker`` (as
    ``twistd pulsyflux`` runs it; the one that checks rights under --auth).
    """
    from twisted.internet import reactor, stdio
    from twisted.internet.defer import ensureDeferred
    from twisted.protocols.basic import LineReceiver

    from pulsyflux.server import ServerFactory

    factory = ServerFactory(reactor)
    if os.environ.get(SECRET_ENV):
        from pulsyflux.auth.grants import Grants
        from pulsyflux.auth.tokens import Authority, Key

        factory.router.enable_auth(Authority([Key.hs256("soak", os.environ[SECRET_ENV])], Grants.none()))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    address = f"127.0.0.1:{port.getHost().port}"
    state: dict[str, Any] = {"broker": None}

    class Commands(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            if line.strip() == b"stats":
                broker = state["broker"]
                stats = factory.stats
                report = {
                    "requests_routed": stats.requests_routed,
                    "frames_dropped": stats.frames_dropped,
                    "errors": dict(stats.errors),
                    "broker": broker.stats() if broker is not None else None,
                    "auth": factory.router.gate.stats() if factory.router.gate is not None else None,
                }
                self.sendLine(json.dumps(report).encode())

        def connectionLost(self, reason: Any = None) -> None:
            reactor.stop()

    async def start() -> None:
        try:
            from pulsyflux.broker import Broker

            if own_broker:
                from pulsyflux.service import connect_own_broker

                state["broker"] = await connect_own_broker(factory, reactor)
            else:
                state["broker"] = await Broker.connect(address, reactor=reactor)
        except ImportError:
            pass
        print(f"READY {address} {'broker' if state['broker'] else 'no-broker'}", flush=True)

    stdio.StandardIO(Commands())
    ensureDeferred(start())
    reactor.run()


def peak_rss_kib(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                fields[key] = int(value.split()[0])
    return fields


async def soak(
    reactor: Any, address: str, seconds: float, rate: int, pubsub: bool, server_stats: Any
) -> dict[str, Any]:
    from twisted.internet.defer import Deferred, gatherResults
    from twisted.internet.task import LoopingCall, deferLater

    from pulsyflux import Consumer, Provider

    channel = uuid.uuid4()
    payload = os.urandom(1024)
    provide, consume = token({"provide": [str(channel)]}), token({"consume": [str(channel)]})
    providers = [
        await Provider.connect(address, channel, handler=lambda data: data, token=provide) for _ in range(PROVIDERS)
    ]
    consumers = [await Consumer.connect(address, channel, token=consume) for _ in range(CONSUMERS)]
    errors: Counter[str] = Counter()
    counts = Counter()
    running = [True]

    async def request_loop(consumer: Consumer) -> None:
        while running[0]:
            try:
                reply = await consumer.send(payload, timeout=10)
                if reply != payload:
                    errors["wrong reply"] += 1
                counts["requests"] += 1
            except Exception as error:  # counted and reported, never hidden
                errors[f"request: {type(error).__name__}: {error}"] += 1

    loops = [Deferred.fromCoroutine(request_loop(c)) for c in consumers]
    subscribers: list[dict[str, Any]] = []
    clients: list[Any] = []
    publisher = None
    if pubsub:
        from pulsyflux.broker import BrokerClient, SubscriptionClosed

        subscribe, publish = token({"subscribe": [TOPIC]}), token({"publish": [TOPIC]})
        for i in range(SUBSCRIBERS):
            client = await BrokerClient.connect(address, reactor=reactor, token=subscribe)
            clients.append(client)
            subscribers.append({"slow": i < SLOW, "sub": await client.subscribe(TOPIC), "received": 0, "order": 0})
        publisher = await BrokerClient.connect(address, reactor=reactor, token=publish)

        async def subscriber_loop(entry: dict[str, Any]) -> None:
            sub = entry["sub"]
            while True:
                try:
                    msg = await sub.get()
                except SubscriptionClosed:
                    return
                if msg.topic != TOPIC:
                    continue
                number = int(msg.payload)
                if number <= entry["order"] and entry["received"]:
                    errors["out of order"] += 1
                entry["order"] = number
                entry["received"] += 1
                if entry["slow"] and slow_mode[0]:
                    await deferLater(reactor, 0.05, lambda: None)  # 20 messages a second at most

        slow_mode = [True]
        sub_loops = [Deferred.fromCoroutine(subscriber_loop(e)) for e in subscribers]

        def publish_tick() -> None:
            for _ in range(max(1, rate // 100)):
                counts["published"] += 1
                d = publisher.publish(TOPIC, b"%d" % counts["published"])
                d.addErrback(lambda f: errors.update([f"publish: {f.type.__name__}: {f.getErrorMessage()}"]))

        ticker = LoopingCall(publish_tick)
        ticker.clock = reactor
        ticker.start(0.01)

    started = time.monotonic()
    await deferLater(reactor, seconds, lambda: None)
    running[0] = False
    elapsed = time.monotonic() - started
    await gatherResults(loops, consumeErrors=True)
    result: dict[str, Any] = {"seconds": round(elapsed, 1), "requests": counts["requests"]}
    if pubsub:
        ticker.stop()
        # Everyone now reads at full speed until every message is accounted
        # for: received, or dropped and counted (bounded wait).
        slow_mode[0] = False
        fast = [e for e in subscribers if not e["slow"]]
        slow = [e for e in subscribers if e["slow"]]
        for _ in range(1200):
            if all(e["received"] + e["sub"].dropped >= counts["published"] for e in subscribers):
                break
            await deferLater(reactor, 0.05, lambda: None)
        result["server_before_close"] = server_stats()
        result.update(
            published=counts["published"],
            delivered=sum(e["received"] for e in subscribers),
            fast_received_min_max=[min(e["received"] for e in fast), max(e["received"] for e in fast)],
            slow_received=[e["received"] for e in slow],  # slow for the run, then drained at full speed
            fast_dropped=[e["sub"].dropped for e in fast],
            slow_dropped=[e["sub"].dropped for e in slow],
        )
        for client in clients + [publisher]:
            await client.close()
        await gatherResults(sub_loops, consumeErrors=True)
    for client in consumers + providers:
        await client.close()
    result["errors"] = dict(errors)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the load runs (default 60)")
    parser.add_argument("--rate", type=int, default=500, help="messages published per second (default 500)")
    parser.add_argument("--no-pubsub", action="store_true", help="requests only: no broker, publisher, subscribers")
    parser.add_argument(
        "--own-broker", action="store_true", help="the broker runs in the server process, linked in-process"
    )
    parser.add_argument(
        "--auth",
        action="store_true",
        help="the server checks tokens and grants (implies --own-broker, whose broker checks publish/subscribe)",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server process
    args = parser.parse_args(argv)
    own_broker = args.own_broker or args.auth
    if args.serve:
        serve(own_broker)
        return 0
    if args.auth:
        os.environ[SECRET_ENV] = os.urandom(32).hex()  # the server process inherits it

    here = os.path.dirname(os.path.abspath(__file__))
    server = subprocess.Popen(
        [sys.executable, os.path.join(here, "soak.py"), "--serve"] + (["--own-broker"] if own_broker else []),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        ready = server.stdout.readline().split()
        if not ready or ready[0] != "READY":
            raise SystemExit(f"server did not start: {ready}")
        address, has_broker = ready[1], ready[2] == "broker"
        pubsub = has_broker and not args.no_pubsub

        from twisted.internet import reactor
        from twisted.internet.defer import Deferred

        outcome: dict[str, Any] = {}

        def finished(result: Any) -> None:
            outcome["result"] = result
            reactor.stop()

        def server_stats() -> dict[str, Any]:
            server.stdin.write("stats\n")
            server.stdin.flush()
            return json.loads(server.stdout.readline())  # a blocking moment, outside the measured load

        d = Deferred.fromCoroutine(soak(reactor, address, args.seconds, args.rate, pubsub, server_stats))
        d.addBoth(finished)
        reactor.run()
        result = outcome["result"]
        if not isinstance(result, dict):
            result.raiseException()
        stats = server_stats()
        from pulsyflux.bench.common import cpu_seconds

        # CPU over the whole soak, set-up included (the same in every mode): compare per request and message.
        cpu = {"server": cpu_seconds(server.pid), "clients": cpu_seconds(os.getpid())}
        result["cpu_seconds"] = {name: round(value, 2) for name, value in cpu.items()}
        work = result["requests"] + result.get("delivered", 0)
        result["cpu_us_per_request_or_delivery"] = {name: round(value / work * 1e6, 1) for name, value in cpu.items()}
        result["server"] = {**peak_rss_kib(server.pid), **stats}
        if pubsub:
            broker = result.pop("server_before_close")["broker"]
            result["broker_dropped"] = broker["dropped"]
            result["drops_match"] = broker["dropped"] == sum(result["slow_dropped"]) and not any(result["fast_dropped"])
            result["all_accounted"] = (
                all(r + d == result["published"] for r, d in zip(result["slow_received"], result["slow_dropped"]))
                and result["fast_received_min_max"] == [result["published"]] * 2
            )
        print(json.dumps(result, default=str).replace(', "', ',\n "'))
        return 0
    finally:
        server.stdin.close()
        server.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
