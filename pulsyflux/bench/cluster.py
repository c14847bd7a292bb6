"""``pulsyflux bench cluster``: pub/sub and requests across two servers sharing a Redis.

Four processes on this machine: a ``redis-server`` (Debian's, or whatever
``--redis-server`` names; no persistence, a free loopback port), servers
``a`` and ``b`` (``BrokerService`` with ``--cluster``, as ``twistd pulsyflux
--cluster`` runs them), and this one: a publisher and a consumer on ``a``,
a subscriber and an echo provider on ``b``, so every message and request
crosses Redis.

Each run measures, for 100-byte payloads:

* ``latency``: one message at a time, publish on a -> receive on b (p50, p99);
* ``flood``: the publisher keeps ``window`` messages ahead of the
  subscriber; messages/s across servers, and the CPU each process spent per
  message (a, b, Redis), which is what docs/cluster.md's sizing is made of;
* ``requests``: ``in_flight`` requests at a time from a consumer on a to a
  provider on b; requests/s and CPU per request.

    results = run(Options(runs=3), progress=print)
    print(format_report(results))
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from pulsyflux.broker import BrokerClient
from pulsyflux.client import Consumer, Provider

from .common import (
    Progress,
    add_run_arguments,
    cpu_per,
    cpu_seconds,
    entry_points,
    fmt,
    median,
    percentile,
    repeat,
    results,
    run_options,
    script_main,
    serve_broker,
    sleep,
    spawn,
    verdict,
)
from .pubsub import _Flood, _latency

if TYPE_CHECKING:
    from .._types import IReactor


__all__ = ["Options", "add_arguments", "options_from_args", "measure", "run", "format_report", "main", "TARGETS"]

# Issue 14's targets on a 2-core machine.
TARGETS = {"flood_msgs_per_s": 40_000, "requests_per_s": 15_000, "latency_p50_us": 500}


@dataclass
class Options:
    runs: int = 3  # repetitions; medians are reported
    duration: float = 3.0  # seconds per measurement
    warmup: float = 1.0  # seconds before counting
    latency_count: int = 1000  # messages in the one-at-a-time latency measurement
    payload: int = 100  # bytes per message and per request
    window: int = 2000  # messages the publisher may be ahead of the subscriber
    in_flight: int = 200  # requests in flight
    redis_server: str = "redis-server"  # the Redis to start
    python: str = sys.executable  # the interpreter for the servers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Options()
    add_run_arguments(parser, d)
    parser.add_argument(
        "--latency-count", type=int, default=d.latency_count, help=f"messages one at a time (default {d.latency_count})"
    )
    parser.add_argument("--payload", type=int, default=d.payload, help=f"payload bytes (default {d.payload})")
    parser.add_argument(
        "--window", type=int, default=d.window, help=f"messages the publisher runs ahead (default {d.window})"
    )
    parser.add_argument(
        "--in-flight", type=int, default=d.in_flight, help=f"requests in flight (default {d.in_flight})"
    )
    parser.add_argument(
        "--redis-server",
        default=d.redis_server,
        help="the redis-server program to start (default: redis-server on the PATH; apt-get install redis-server)",
    )


def options_from_args(args: argparse.Namespace) -> Options:
    return Options(
        **run_options(args),
        latency_count=max(10, args.latency_count),
        payload=max(8, args.payload),
        window=max(1, args.window),
        in_flight=max(1, args.in_flight),
        redis_server=args.redis_server,
    )


class _Redis(ProcessProtocol):
    """redis-server on a free port; ``ready`` fires once it accepts connections."""

    transport: Any  # the process transport, set before connectionMade

    def __init__(self) -> None:
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self._out = b""

    def outReceived(self, data: bytes) -> None:
        self._out = (self._out + data)[-4000:]
        if not self.ready.called and b"Ready to accept connections" in self._out:
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(f"redis-server exited:\n{self._out.decode(errors='replace')}"))
        self.ended.callback(None)

    def stop(self) -> "Deferred[None]":
        try:
            self.transport.signalProcess("KILL")
        except Exception:
            pass
        return self.ended


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _requests(reactor: IReactor, consumer: Consumer, options: Options, pids: dict[str, int]) -> dict:
    body = b"x" * options.payload
    state: dict[str, Any] = {"done": 0, "failed": 0, "stop": False, "error": None}
    finished: Deferred[None] = Deferred()
    running = [0]

    def one(_: Any = None) -> None:
        if state["stop"]:
            running[0] -= 1
            if not running[0] and not finished.called:
                finished.callback(None)
            return
        d = consumer.send(body, timeout=30)
        d.addCallbacks(ok, bad)

    def ok(_: Any) -> None:
        state["done"] += 1
        one()

    def bad(failure: Failure) -> None:
        state["failed"] += 1
        state["error"] = state["error"] or failure.getErrorMessage()
        one()

    for _ in range(options.in_flight):
        running[0] += 1
        one()
    await sleep(reactor, options.warmup)
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    done0, t0 = state["done"], time.perf_counter()
    await sleep(reactor, options.duration)
    done1, t1 = state["done"], time.perf_counter()
    cpu = cpu_per(pids, cpu0, done1 - done0)
    state["stop"] = True
    await finished
    return {
        "requests_per_s": (done1 - done0) / (t1 - t0),
        "cpu_us_per_request": cpu,
        "failed": state["failed"],
        "first_error": state["error"],
    }


async def _run_once(reactor: IReactor, clients: dict, options: Options) -> dict:
    topic = f"bench.{uuid.uuid4().hex}"
    sub = await clients["subscriber"].subscribe(topic, buffer=1000)
    await _settle(reactor, clients["publisher"], sub, topic)
    shared: Any = options  # the pubsub helpers read the fields both Options have (payload, window, ...)
    result: dict[str, Any] = {"latency": await _latency(clients["publisher"], sub, topic, shared)}
    flood = _Flood(clients["publisher"], topic, [sub], shared)
    flood.start()
    await sleep(reactor, options.warmup)
    pids = clients["pids"]
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    delivered0, t0 = flood.delivered, time.perf_counter()
    flood.sampling = True
    await sleep(reactor, options.duration)
    flood.sampling = False
    delivered1, t1 = flood.delivered, time.perf_counter()
    cpu = cpu_per(pids, cpu0, delivered1 - delivered0)
    flood.stopping = True
    await clients["subscriber"].unsubscribe(topic)
    for reader in flood.readers:
        await reader
    samples = sorted(flood.samples)
    result["flood"] = {
        "msgs_per_s": (delivered1 - delivered0) / (t1 - t0),
        "p50_us": percentile(samples, 0.5) * 1e6,
        "p99_us": percentile(samples, 0.99) * 1e6,
        "cpu_us_per_msg": cpu,
        "dropped": sub.dropped,
        "failed": flood.failed,
        "first_error": flood.first_error,
    }
    result["requests"] = await _requests(reactor, clients["consumer"], options, pids)
    return result


async def _settle(reactor: IReactor, publisher: BrokerClient, sub: Any, topic: str) -> None:
    """b's subscription reaches Redis a moment after it is set up: probe until one arrives, then
    read up to a marker (publishes keep their order) so no probe is left for the measurements."""
    first = sub.get()
    for _ in range(10_000):
        if first.called:
            break
        await publisher.publish(topic, b"probe")
    await first
    marker = uuid.uuid4().bytes
    await publisher.publish(topic, marker)
    while (await sub.get()).payload != marker:
        pass


def _summarise(options: Options, runs: list[dict]) -> dict:
    medians: dict[str, Optional[float]] = {
        "latency_p50_us": median(runs, "latency", "p50_us"),
        "latency_p99_us": median(runs, "latency", "p99_us"),
        "flood_msgs_per_s": median(runs, "flood", "msgs_per_s"),
        "flood_p50_us": median(runs, "flood", "p50_us"),
        "requests_per_s": median(runs, "requests", "requests_per_s"),
    }
    for name in ("bench", "a", "b", "redis"):
        medians[f"flood_cpu_us_per_msg_{name}"] = median(runs, "flood", "cpu_us_per_msg", name)
        medians[f"requests_cpu_us_per_request_{name}"] = median(runs, "requests", "cpu_us_per_request", name)
    return results(
        options,
        runs,
        medians,
        targets=dict(TARGETS),
        dropped=sum(r["flood"]["dropped"] for r in runs),
        failed=sum(r["flood"]["failed"] + r["requests"]["failed"] for r in runs),
    )


def _one_line(result: dict) -> str:
    f, r, lat = result["flood"], result["requests"], result["latency"]
    return (
        f"latency p50 {lat['p50_us']:.0f} us; flood {f['msgs_per_s']:,.0f} msgs/s (p50 {f['p50_us']:,.0f} us); "
        f"requests {r['requests_per_s']:,.0f}/s"
    )


async def _measure(reactor: IReactor, options: Options, progress: Progress) -> dict:
    binary = shutil.which(options.redis_server) or options.redis_server
    if not os.path.exists(binary):
        raise RuntimeError(f"{options.redis_server} not found: install Redis 7 (apt-get install redis-server)")
    port = _free_port()
    redis = _Redis()
    progress(f"starting redis-server on 127.0.0.1:{port}")
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    reactor.spawnProcess(redis, binary, argv, env=dict(os.environ), path=os.getcwd())
    servers: dict[str, Any] = {}
    clients: dict[str, Any] = {}
    try:
        await redis.ready
        url = f"redis://127.0.0.1:{port}/0"
        progress("starting servers a and b")
        for name in ("a", "b"):
            servers[name] = spawn(reactor, options.python, name, "pulsyflux.bench.cluster", "server", url, name)
        addresses = {name: f"127.0.0.1:{int(await child.ready)}" for name, child in servers.items()}
        clients["pids"] = {
            "bench": os.getpid(),
            "a": servers["a"].pid,
            "b": servers["b"].pid,
            "redis": redis.transport.pid,
        }
        clients["publisher"] = await BrokerClient.connect(addresses["a"], reactor=reactor)
        clients["subscriber"] = await BrokerClient.connect(addresses["b"], reactor=reactor)
        channel = uuid.uuid4()
        clients["provider"] = await Provider.connect(
            addresses["b"], channel, handler=lambda body: body, reactor=reactor
        )
        clients["consumer"] = await Consumer.connect(addresses["a"], channel, reactor=reactor)
        progress("waiting for a to see b's provider")
        for _ in range(1000):
            try:
                await clients["consumer"].send(b"probe", timeout=5)
                break
            except Exception:
                await sleep(reactor, 0.05)
        progress("warming up")
        warm = Options(**{**asdict(options), "duration": 0.5, "warmup": 0.2, "latency_count": 100})
        await _run_once(reactor, clients, warm)
        runs = await repeat(options, progress, lambda o: _run_once(reactor, clients, o), _one_line)
        return _summarise(options, runs)
    finally:
        for name in ("consumer", "provider", "publisher", "subscriber"):
            if name in clients:
                await clients[name].close()
        for child in servers.values():
            await child.stop()
        await redis.stop()


measure, run = entry_points(_measure, Options)


def format_report(results: dict) -> str:
    m, o, t = results["medians"], results["options"], results["targets"]

    def cpu(what: str, key: str) -> str:
        a, b, r, c = (fmt(m[f"{key}_{name}"], ".1f") for name in ("a", "b", "redis", "bench"))
        return f"  CPU per {what}: a {a} us, b {b} us, Redis {r} us, this process {c} us"

    return "\n".join(
        [
            f"pulsyflux bench cluster: medians of {len(results['runs'])} runs, {o['payload']}-byte payloads, "
            f"servers a and b and a redis-server on this machine ({results['machine']['cpus']} CPUs)",
            f"  latency a->b, one at a time   p50 {fmt(m['latency_p50_us'])} us  p99 {fmt(m['latency_p99_us'])} us"
            f"   {verdict(m['latency_p50_us'], t['latency_p50_us'], at_least=False)}",
            f"  pub/sub a->b, 1->1      {fmt(m['flood_msgs_per_s']):>9} msgs/s  p50 {fmt(m['flood_p50_us'])} us"
            f"   {verdict(m['flood_msgs_per_s'], t['flood_msgs_per_s'])}",
            cpu("message", "flood_cpu_us_per_msg"),
            f"  requests a->b in flight {fmt(m['requests_per_s']):>9} /s"
            f"   {verdict(m['requests_per_s'], t['requests_per_s'])}",
            cpu("request", "requests_cpu_us_per_request"),
            f"  dropped {results['dropped']}, failed {results['failed']}",
        ]
    )


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m pulsyflux.bench.cluster [options]`` (and ``server URL NAME`` for the children)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["server"]:
        _serve(argv[1], argv[2])
        return 0
    description = "Pub/sub and requests across two servers sharing a Redis."
    return script_main(sys.modules[__name__], description, argv, prog="pulsyflux bench cluster")


def _serve(url: str, name: str) -> None:
    """A child: a BrokerService in the cluster on an ephemeral loopback port; prints the port once linked."""
    from twisted.internet import reactor

    from pulsyflux.service import BrokerService

    service = BrokerService("tcp:0:interface=127.0.0.1", reactor=reactor, cluster=url, node_name=name)
    cluster = service.cluster
    assert cluster is not None  # cluster=url
    serve_broker(reactor, service, then=lambda _: cluster.link.when_up())


if __name__ == "__main__":
    sys.exit(main())
