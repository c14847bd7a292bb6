"""``pulsyflux bench rpc``: request/response speed through a router in its own process.

Three processes, the same for pulsyflux and for the baseline:

* the benchmark (this process): the consumers, or the relay's clients;
* the router (``python -m pulsyflux.bench.rpc server``), or a bare byte relay;
* an echo provider (``python -m pulsyflux.bench.rpc provider PORT CHANNEL``),
  or a bare echo server (:mod:`pulsyflux.bench.relay`).

With ``--provider-in-process`` the echo provider runs in the router's
process instead, over the in-process link (``server with-provider CHANNEL``):
a round trip crosses two sockets instead of four, which is what the 1 MiB
echo is bound by on a small machine (docs/performance.md).

Each run measures, in this order: sequential 16-byte requests (req/s, p50,
p99) taking turns with the relay's round trips, requests with many in flight
(consumers x in flight), and 1 MiB echoes (MB/s, 10**6 bytes, one way) taking
turns with the same echo through the relay. The result holds every run and
the medians; the ratios to the relay are taken within each run so that
machine noise hits both sides alike.

    results = run(Options(runs=5), progress=print)
    print(format_report(results))
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Optional, cast

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IListeningPort
from twisted.python.failure import Failure

from pulsyflux.client import Consumer, Provider

from .common import (
    AUTH_SECRET_ENV,
    Child,
    Progress,
    add_run_arguments,
    cpu_seconds,
    entry_points,
    fmt,
    median,
    percentile,
    repeat,
    results,
    run_as_child,
    run_options,
    runs_text,
    sleep,
    spawn,
    verdict,
)
from .relay import RoundTripClient

if TYPE_CHECKING:
    from .._types import IReactor


__all__ = [
    "Options",
    "add_arguments",
    "options_from_args",
    "measure",
    "run",
    "format_report",
    "start_router",
    "GO_REFERENCE",
]

# The Go original on the same 2-core machine (issue 2); its consumers broke
# under 10 concurrent consumers, so it has no in-flight figure.
GO_REFERENCE = {"sequential_req_per_s": 4334, "sequential_p50_us": 206, "echo_1mib_mb_per_s": 46}
SLICE = 0.1  # seconds: the sequential measurement alternates relay and router this often
# Issue 13's targets: one at a time within 5% of the bare relay, 60,000 requests/s in flight, 1 GB/s echo.
TARGETS = {"sequential_vs_relay": 0.95, "inflight_req_per_s": 60_000, "echo_1mib_mb_per_s": 1_000}


@dataclass
class Options:
    """What to measure; the defaults are the issue's figures."""

    runs: int = 5  # repetitions; medians are reported
    duration: float = 2.0  # seconds per measurement
    warmup: float = 0.5  # seconds of load before anything is counted
    payload: int = 16  # bytes per request, sequential and in flight
    consumers: int = 10
    inflight: int = 16  # requests in flight per consumer
    large: int = 1 << 20  # bytes per request of the echo measurement
    baseline: bool = True  # also measure the bare relay
    relay_immediate: bool = False  # the relay sends at once too, as pulsyflux does (pulsyflux.writer)
    auth: bool = False  # the router checks tokens (--auth): every client presents one (docs/security.md)
    provider_in_process: bool = False  # the echo provider in the router's process: two sockets a round trip, not four
    python: str = sys.executable  # the interpreter for the child processes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of :class:`Options` as command-line flags (shared by every front end)."""
    d = Options()
    add_run_arguments(parser, d)
    parser.add_argument("--payload", type=int, default=d.payload, help=f"request size in bytes (default {d.payload})")
    parser.add_argument("--consumers", type=int, default=d.consumers, help=f"consumers (default {d.consumers})")
    parser.add_argument(
        "--inflight", type=int, default=d.inflight, help=f"requests in flight per consumer (default {d.inflight})"
    )
    parser.add_argument(
        "--large", type=int, default=d.large, help=f"bytes per echo request, 0 to skip (default {d.large})"
    )
    parser.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the bare relay baseline")
    parser.add_argument(
        "--relay-immediate",
        action="store_true",
        help="the relay, its echo and its client send at once as pulsyflux does, instead of with transport.write",
    )
    parser.add_argument(
        "--auth",
        action="store_true",
        help="the router checks tokens and grants (as with twistd --auth); the provider and consumers present one",
    )
    parser.add_argument(
        "--provider-in-process",
        action="store_true",
        help="the echo provider runs in the router's process over the in-process link (two sockets a round trip "
        "instead of four); the relay baseline keeps its three processes",
    )


def options_from_args(args: argparse.Namespace) -> Options:
    return Options(
        **run_options(args),
        payload=args.payload,
        consumers=max(1, args.consumers),
        inflight=max(1, args.inflight),
        large=args.large,
        baseline=args.baseline,
        relay_immediate=getattr(args, "relay_immediate", False),
        auth=getattr(args, "auth", False),
        provider_in_process=getattr(args, "provider_in_process", False),
    )


# -- measurements ----------------------------------------------------------------


def _sequential(consumer: Consumer, payload: bytes, duration: float) -> "Deferred[list[float]]":
    """One request at a time; fires with every round-trip time in seconds."""
    done: Deferred[list[float]] = Deferred()
    samples: list[float] = []
    perf_counter = time.perf_counter
    deadline = perf_counter() + duration

    def fire() -> None:
        consumer.send(payload, 30.0).addCallbacks(answered, done.errback, (perf_counter(),))

    def answered(reply: bytes, started: float) -> None:
        now = perf_counter()
        samples.append(now - started)
        if len(reply) != len(payload):
            done.errback(RuntimeError(f"echo returned {len(reply)} bytes for {len(payload)}"))
        elif now < deadline:
            fire()
        else:
            done.callback(samples)

    fire()
    return done


class _Flood:
    """Keeps ``inflight`` requests outstanding on every consumer; counts answers."""

    def __init__(self, consumers: list[Consumer], payload: bytes, inflight: int) -> None:
        self.consumers = consumers
        self.payload = payload
        self.inflight = inflight
        self.answered = 0
        self.failed = 0
        self.first_error: Optional[str] = None
        self.outstanding = 0
        self.stopping = False
        self.drained: Deferred[None] = Deferred()

    def start(self) -> None:
        for consumer in self.consumers:
            for _ in range(self.inflight):
                self._fire(consumer)

    def stop(self) -> "Deferred[None]":
        self.stopping = True
        if self.outstanding == 0 and not self.drained.called:
            self.drained.callback(None)
        return self.drained

    def _fire(self, consumer: Consumer) -> None:
        self.outstanding += 1
        consumer.send(self.payload, 30.0).addCallbacks(
            self._answered, self._failed, callbackArgs=(consumer,), errbackArgs=(consumer,)
        )

    def _answered(self, reply: bytes, consumer: Consumer) -> None:
        self.outstanding -= 1
        self.answered += 1
        self._next(consumer)

    def _failed(self, failure: Failure, consumer: Consumer) -> None:
        self.outstanding -= 1
        self.failed += 1
        if self.first_error is None:
            self.first_error = f"{failure.type.__name__}: {failure.getErrorMessage()}"
        self._next(consumer)

    def _next(self, consumer: Consumer) -> None:
        if not self.stopping:
            self._fire(consumer)
        elif self.outstanding == 0 and not self.drained.called:
            self.drained.callback(None)


async def _flood(reactor: IReactor, consumers: list[Consumer], options: Options, cpu: _CpuMeter) -> dict:
    flood = _Flood(consumers, b"x" * options.payload, options.inflight)
    flood.start()
    await sleep(reactor, options.warmup)
    cpu.start()
    count0, t0 = flood.answered, time.perf_counter()
    await sleep(reactor, options.duration)
    count1, t1 = flood.answered, time.perf_counter()
    cpu.stop()
    await flood.stop()
    return {
        "req_per_s": (count1 - count0) / (t1 - t0),
        "cpu_us": cpu.per_request_us(count1 - count0),
        "failed": flood.failed,
        "first_error": flood.first_error,
    }


def _latency_summary(samples: list[float], elapsed: float) -> dict:
    ordered = sorted(samples)
    return {
        "req_per_s": len(samples) / elapsed,
        "p50_us": percentile(ordered, 0.50) * 1e6,
        "p99_us": percentile(ordered, 0.99) * 1e6,
        "count": len(samples),
    }


class _CpuMeter:
    """CPU time each named process spends between ``start`` and ``stop``, summed."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.used = dict.fromkeys(pids, 0.0)
        self._before: dict[str, float] = {}

    def start(self) -> None:
        self._before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> None:
        for name, pid in self.pids.items():
            self.used[name] += cpu_seconds(pid) - self._before[name]

    def per_request_us(self, count: int) -> dict[str, float]:
        return {name: used / max(count, 1) * 1e6 for name, used in self.used.items()}


async def _interleaved(options: Options, clients: dict, size: int) -> tuple[dict, Optional[dict]]:
    """Round trips of ``size`` bytes one at a time through the router and the bare relay, taking turns.

    The machine's speed drifts from second to second (other processes);
    alternating the two every ``SLICE`` seconds makes their ratio fair.
    Returns the router's summary and the relay's (None without a baseline),
    each with CPU microseconds per round trip by process.
    """
    consumer = clients["consumers"][0]
    payload = b"x" * size
    slices = max(1, round(options.duration / SLICE))
    slice_time = options.duration / slices
    relay_samples: list[float] = []
    samples: list[float] = []
    relay_elapsed = elapsed = 0.0
    cpu = _CpuMeter(clients["pids"]["router"])
    relay_cpu = _CpuMeter(clients["pids"].get("relay", {}))
    for _ in range(slices):
        if options.baseline:
            relay_cpu.start()
            started = time.perf_counter()
            relay_samples += await clients["relay"].run(size, slice_time)
            relay_elapsed += time.perf_counter() - started
            relay_cpu.stop()
        cpu.start()
        started = time.perf_counter()
        samples += await _sequential(consumer, payload, slice_time)
        elapsed += time.perf_counter() - started
        cpu.stop()
    router = _latency_summary(samples, elapsed)
    router["cpu_us"] = cpu.per_request_us(len(samples))
    if not options.baseline:
        return router, None
    relay = _latency_summary(relay_samples, relay_elapsed)
    relay["cpu_us"] = relay_cpu.per_request_us(len(relay_samples))
    return router, relay


async def _sequential_pair(options: Options, clients: dict) -> dict:
    """Small requests one at a time, router and relay interleaved; their ratio is taken within the run."""
    router, relay = await _interleaved(options, clients, options.payload)
    result = {"sequential": router}
    if relay is not None:
        result["relay"] = relay
        result["sequential_vs_relay"] = router["req_per_s"] / relay["req_per_s"]
    return result


async def _echo_pair(options: Options, clients: dict) -> dict:
    """The large echo (MB/s one way) through the router and through the bare relay, interleaved.

    The relay forwards bytes as they arrive (no frames), so its figure is what
    the same three processes and four sockets give in Twisted: the router's
    echo is judged against it within the run, not against another hour's machine.
    """
    router, relay = await _interleaved(options, clients, options.large)
    result = {"echo": router}
    router["mb_per_s"] = router["req_per_s"] * options.large / 1e6
    if relay is not None:
        relay["mb_per_s"] = relay["req_per_s"] * options.large / 1e6
        result["relay_echo"] = relay
        result["echo_vs_relay"] = router["mb_per_s"] / relay["mb_per_s"]
    return result


async def _run_once(reactor: IReactor, options: Options, clients: dict) -> dict:
    result = await _sequential_pair(options, clients)
    cpu = _CpuMeter(clients["pids"]["router"])
    result["inflight"] = await _flood(reactor, clients["consumers"], options, cpu)
    if options.large:
        result.update(await _echo_pair(options, clients))
    return result


def _ms(us: Optional[float]) -> Optional[float]:
    return None if us is None else us / 1000


def _summarise(options: Options, runs: list[dict]) -> dict:
    medians: dict[str, Any] = {
        "sequential_req_per_s": median(runs, "sequential", "req_per_s"),
        "sequential_p50_us": median(runs, "sequential", "p50_us"),
        "sequential_p99_us": median(runs, "sequential", "p99_us"),
        "relay_rt_per_s": median(runs, "relay", "req_per_s"),
        "relay_p50_us": median(runs, "relay", "p50_us"),
        "relay_p99_us": median(runs, "relay", "p99_us"),
        "sequential_vs_relay": median(runs, "sequential_vs_relay"),
        "inflight_req_per_s": median(runs, "inflight", "req_per_s"),
        "echo_1mib_mb_per_s": median(runs, "echo", "mb_per_s"),
        "echo_p50_ms": _ms(median(runs, "echo", "p50_us")),
        "relay_echo_mb_per_s": median(runs, "relay_echo", "mb_per_s"),
        "relay_echo_p50_ms": _ms(median(runs, "relay_echo", "p50_us")),
        "echo_vs_relay": median(runs, "echo_vs_relay"),
    }
    for phase in ("sequential", "relay", "inflight", "echo", "relay_echo"):
        names: dict[str, Any] = next((r[phase]["cpu_us"] for r in runs if phase in r), {})
        medians[f"{phase}_cpu_us"] = {name: median(runs, phase, "cpu_us", name) for name in names}
    return results(
        options,
        runs,
        medians,
        go=dict(GO_REFERENCE),
        targets=dict(TARGETS),
        failed_requests=sum(r.get("inflight", {}).get("failed", 0) for r in runs),
    )


async def _measure(reactor: IReactor, options: Options, progress: Progress) -> dict:
    children: list[Child] = []
    clients: dict = {"consumers": [], "pids": {}}
    try:
        progress("starting the router and an echo provider")
        token = None
        if options.auth:  # the children read the key from their environment (spawn passes it on)
            os.environ[_SECRET_ENV] = os.urandom(32).hex()
            token = _bench_token()
        channel = str(uuid.uuid4())
        inproc = ["with-provider", channel] if options.provider_in_process else []
        server = spawn(reactor, options.python, "router", "pulsyflux.bench.rpc", "server", *inproc)
        children.append(server)
        port = int(await server.ready)  # with its provider registered, if it has one
        address = f"127.0.0.1:{port}"
        clients["pids"]["router"] = {"client": os.getpid(), "router": server.pid}
        if not options.provider_in_process:
            provider = spawn(reactor, options.python, "provider", "pulsyflux.bench.rpc", "provider", str(port), channel)
            children.append(provider)
            await provider.ready
            clients["pids"]["router"]["provider"] = provider.pid
        for _ in range(options.consumers):
            clients["consumers"].append(await Consumer.connect(address, channel, reactor=reactor, token=token))
        if options.baseline:
            progress("starting the bare relay and echo server")
            mode = ["immediate"] if options.relay_immediate else []
            echo = spawn(reactor, options.python, "echo", "pulsyflux.bench.relay", "echo", *mode)
            children.append(echo)
            echo_port = int(await echo.ready)
            relay = spawn(reactor, options.python, "relay", "pulsyflux.bench.relay", "relay", str(echo_port), *mode)
            children.append(relay)
            relay_port = int(await relay.ready)
            clients["pids"]["relay"] = {"client": os.getpid(), "relay": relay.pid, "echo": echo.pid}
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", relay_port)
            relay_client = await connectProtocol(endpoint, RoundTripClient(options.relay_immediate))
            await relay_client.connected_d
            clients["relay"] = relay_client

        progress("warming up")
        warm = Options(**{**asdict(options), "duration": options.warmup, "runs": 1})
        await _run_once(reactor, warm, clients)

        runs = await repeat(options, progress, lambda o: _run_once(reactor, o, clients), _one_line)
        return _summarise(options, runs)
    finally:
        os.environ.pop(_SECRET_ENV, None)  # a later run in this process is what its own options say
        for consumer in clients["consumers"]:
            await consumer.close()
        if "relay" in clients:
            clients["relay"].transport.loseConnection()
        await DeferredList([child.stop() for child in reversed(children)])


measure, run = entry_points(_measure, Options)


# -- reporting -------------------------------------------------------------------


def _one_line(result: dict) -> str:
    parts = []
    if "relay" in result:
        parts.append(f"relay {result['relay']['req_per_s']:,.0f} rt/s")
    seq = result["sequential"]
    parts.append(f"sequential {seq['req_per_s']:,.0f} req/s (p50 {seq['p50_us']:.0f} us, p99 {seq['p99_us']:.0f} us)")
    if "sequential_vs_relay" in result:
        parts.append(f"ratio {result['sequential_vs_relay']:.2f}")
    parts.append(f"in flight {result['inflight']['req_per_s']:,.0f} req/s")
    if result["inflight"]["failed"]:
        parts.append(f"{result['inflight']['failed']} FAILED ({result['inflight']['first_error']})")
    if "echo" in result:
        parts.append(f"echo {result['echo']['mb_per_s']:,.0f} MB/s")
    if "relay_echo" in result:
        parts.append(f"relay echo {result['relay_echo']['mb_per_s']:,.0f} MB/s, ratio {result['echo_vs_relay']:.2f}")
    return "; ".join(parts)


def _topology(options: dict) -> str:
    if options.get("provider_in_process"):
        return "router in its own process, the echo provider in it (in-process link)"
    return "router and echo provider in their own processes"


def format_report(results: dict) -> str:
    """The results as a short report a person reads: what was measured, then each target's verdict."""
    m = results["medians"]
    o = results["options"]
    go = results["go"]
    t = results["targets"]
    lines = [
        f"pulsyflux bench rpc: {runs_text(len(results['runs']))}, {o['duration']} s per measurement, "
        f"{_topology(o)} ({results['machine']['cpus']} CPUs, "
        f"Python {results['machine']['python']})",
        f"  {'one at a time, {} B'.format(o['payload']):<30} {fmt(m['sequential_req_per_s']):>9} req/s   "
        f"p50 {fmt(m['sequential_p50_us'])} us  p99 {fmt(m['sequential_p99_us'])} us",
    ]
    if m["relay_rt_per_s"] is not None:
        baseline = "Twisted relay, immediate" if o.get("relay_immediate") else "bare Twisted relay"
        lines.append(
            f"  {baseline + ' (baseline)':<30} {fmt(m['relay_rt_per_s']):>9} rt/s    "
            f"p50 {fmt(m['relay_p50_us'])} us  p99 {fmt(m['relay_p99_us'])} us"
        )
    in_flight = "in flight, {} x {}".format(o["consumers"], o["inflight"])
    lines.append(f"  {in_flight:<30} {fmt(m['inflight_req_per_s']):>9} req/s")
    if m["echo_1mib_mb_per_s"] is not None:
        echo = "echo {:,} B".format(o["large"])
        lines.append(f"  {echo:<30} {fmt(m['echo_1mib_mb_per_s']):>9} MB/s    p50 {fmt(m['echo_p50_ms'], '.1f')} ms")
    if m.get("relay_echo_mb_per_s") is not None:
        baseline = "echo, relay immediate" if o.get("relay_immediate") else "echo, bare relay"
        lines.append(
            f"  {baseline + ' (baseline)':<30} {fmt(m['relay_echo_mb_per_s']):>9} MB/s    "
            f"p50 {fmt(m['relay_echo_p50_ms'], '.1f')} ms"
        )
    # The targets are for its three processes; one process fewer is not judged by them as if it were.
    lines.append(
        "targets (not the issue's topology: the provider is in the router's process)"
        if o.get("provider_in_process")
        else "targets"
    )
    if m["relay_rt_per_s"] is not None:
        lines.append(
            f"  {'one at a time / baseline':<30} {fmt(m['sequential_vs_relay'], '.2f'):>9}         "
            f"{verdict(m['sequential_vs_relay'], t['sequential_vs_relay'])}"
        )
    lines.append(
        f"  {'in flight':<30} {fmt(m['inflight_req_per_s']):>9} req/s   "
        f"{verdict(m['inflight_req_per_s'], t['inflight_req_per_s'])}"
    )
    if m["echo_1mib_mb_per_s"] is not None:
        lines.append(
            f"  {'echo':<30} {fmt(m['echo_1mib_mb_per_s']):>9} MB/s    "
            f"{verdict(m['echo_1mib_mb_per_s'], t['echo_1mib_mb_per_s'])}"
        )
    if m.get("echo_vs_relay") is not None:  # not a target: where the router stands against the same hops
        lines.append(f"  {'echo / baseline echo':<30} {fmt(m['echo_vs_relay'], '.2f'):>9}         (no target)")
    lines.append(
        f"the Go pulsyflux on a machine like this: {go['sequential_req_per_s']:,} req/s one at a time "
        f"(p50 {go['sequential_p50_us']} us), {go['echo_1mib_mb_per_s']} MB/s echo; with requests in flight "
        "it fails ('response ID mismatch')"
    )
    lines.append("CPU time per request, microseconds, by process:")
    for phase in ("relay", "sequential", "inflight", "relay_echo", "echo"):
        used = m.get(f"{phase}_cpu_us")
        if used:
            lines.append(
                f"  {phase.replace('_', ' '):<11}" + "  ".join(f"{name} {fmt(value)}" for name, value in used.items())
            )
    if results["failed_requests"]:
        failed = results["failed_requests"]
        lines.append(f"{failed} {'request' if failed == 1 else 'requests'} FAILED")
    return "\n".join(lines)


# -- child entry points ----------------------------------------------------------


def start_router(reactor: IReactor, provider_channel: Optional[str] = None) -> "Deferred[IListeningPort]":
    """The router child's server on 127.0.0.1 (port 0); fires with its port once it can serve.

    With ``provider_channel`` an echo Provider on that channel joins it over
    the in-process link first (``--provider-in-process``).
    """
    from pulsyflux.server import ServerFactory

    factory = ServerFactory(reactor)
    if os.environ.get(_SECRET_ENV):
        from pulsyflux.auth.grants import Grants
        from pulsyflux.auth.tokens import Authority, Key

        factory.router.enable_auth(Authority([Key.hs256("bench", os.environ[_SECRET_ENV])], Grants.none()))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    if provider_channel is None:
        return succeed(port)
    from pulsyflux.server.inproc import InProcessEndpoint

    token = _bench_token() if os.environ.get(_SECRET_ENV) else None
    endpoint = InProcessEndpoint(factory, reactor)
    connecting = Provider.connect(endpoint, provider_channel, handler=_echo, reactor=reactor, token=token)
    return connecting.addCallback(lambda provider: port)


def _serve(argv: list[str]) -> None:
    from twisted.internet import reactor

    if argv[:1] == ["server"] and (len(argv) == 1 or (len(argv) == 3 and argv[1] == "with-provider")):

        def ready(port: IListeningPort) -> None:
            print(cast(IPv4Address, port.getHost()).port, flush=True)

        channel = argv[2] if len(argv) == 3 else None
        reactor.callWhenRunning(lambda: start_router(reactor, channel).addCallbacks(ready, _child_failed))
    elif len(argv) == 3 and argv[0] == "provider":
        address, channel = f"127.0.0.1:{argv[1]}", argv[2]

        def connected(provider: Provider) -> None:
            print("ready", flush=True)

        token = _bench_token() if os.environ.get(_SECRET_ENV) else None
        reactor.callWhenRunning(
            lambda: Provider.connect(address, channel, handler=_echo, reactor=reactor, token=token).addCallbacks(
                connected, _child_failed
            )
        )
    else:
        sys.exit("usage: python -m pulsyflux.bench.rpc server [with-provider CHANNEL] | provider PORT CHANNEL")
    run_as_child(reactor)


def _child_failed(failure: Failure) -> None:
    """A child that cannot start says why (the parent shows it) and ends."""
    from twisted.internet import reactor

    print(failure.getErrorMessage(), file=sys.stderr, flush=True)
    reactor.stop()


def _echo(payload: bytes) -> bytes:
    return payload


_SECRET_ENV = AUTH_SECRET_ENV  # bench.common: the children check tokens with it


def _bench_token() -> str:
    """A token for every channel, signed with the secret the parent put in the environment."""
    from pulsyflux.auth.tokens import Key, mint

    key = Key.hs256("bench", os.environ[_SECRET_ENV])
    return mint(key, {"provide": ["*"], "consume": ["*"]}, 24 * 3600, subject="bench")


if __name__ == "__main__":
    _serve(sys.argv[1:])
