"""``pulsyflux bench capacity``: what the *server* sustains, loaded from several client processes.

``bench pubsub`` runs every client in one process, so it measures that
process as much as the server. Here the server and its broker run in a child
process of their own (``--server-python`` picks its interpreter: PyPy, say),
and the load comes from separate client processes, always on this
interpreter:

* ``--publishers`` publisher processes, each one :class:`~pulsyflux.BrokerClient`
  publishing as fast as it is allowed;
* up to ``--subscriber-processes`` subscriber processes sharing the N
  subscriptions of a step between them.

The publishers never run more than ``window`` messages ahead of the slowest
subscription (the subscriber processes report what they read every 20 ms,
and this process passes the limit on), so the broker never drops: what is
measured is sustained, not buffered. Each step reports messages published
and deliveries per second (each process counts its own, over its own clock),
and the server's CPU seconds (``/proc``) per message and per delivery: that
cost is the server's capacity, whatever the clients on the same cores
managed. Steps: 1, 10, 100, 1,000 and 10,000 subscribers at 100 bytes, then
the message sizes at one subscriber. Before them: the server's idle memory
per registered connection and per subscription (resident set, ``/proc``).

    results = run(Options(runs=3, server_python="pypy3"), progress=print)
    print(format_report(results))
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore

from .common import (
    Child,
    Progress,
    cpu_seconds,
    fmt,
    machine,
    median,
    public_options,
    run_as_child,
    run_blocking,
    script_main,
    sleep,
    start,
)

__all__ = ["Options", "add_arguments", "options_from_args", "measure", "run", "format_report", "main"]

_REPORT_EVERY = 0.02  # seconds between a subscriber process's reports
_BACKLOG_BUDGET = 64 << 20  # bytes of JSON the window may leave queued in the broker, over all subscribers
_SUBSCRIBER_BUDGET = 4 << 20  # and for one subscriber (the broker's default limit is 8 MiB)
_SUBSCRIBE_AT_ONCE = 8  # a broker sets up at most 8 subscriptions of one client at once


@dataclass
class Options:
    """What to measure; the defaults are the issue's steps."""

    runs: int = 3  # repetitions; medians are reported
    duration: float = 3.0  # seconds counted per step
    warmup: float = 1.0  # seconds of load before counting
    subscribers: list[int] = field(default_factory=lambda: [1, 10, 100, 1000, 10000])
    payload: int = 100  # bytes per message in the subscriber steps
    sizes: list[int] = field(default_factory=lambda: [10, 1000, 10000, 100000])  # at one subscriber
    publishers: int = 2  # publisher processes
    subscriber_processes: int = 2  # at most this many subscriber processes share a step's subscriptions
    window: int = 5000  # messages the publishers may be ahead of the slowest subscription
    idle_connections: int = 1000  # for the idle memory per connection
    idle_subscriptions: int = 1000  # for the idle memory per subscription
    server_python: str = sys.executable  # the server's interpreter
    python: str = sys.executable  # the clients' interpreter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of :class:`Options` as command-line flags (shared by every front end)."""
    d = Options()
    parser.add_argument("--runs", type=int, default=d.runs, help=f"repetitions, medians reported (default {d.runs})")
    parser.add_argument("--duration", type=float, default=d.duration, help=f"seconds per step (default {d.duration})")
    parser.add_argument("--warmup", type=float, default=d.warmup, help=f"seconds before counting (default {d.warmup})")
    parser.add_argument(
        "--subscribers",
        default=",".join(map(str, d.subscribers)),
        help="comma-separated subscriber counts, one step each (default 1,10,100,1000,10000)",
    )
    parser.add_argument(
        "--payload", type=int, default=d.payload, help=f"payload bytes in the subscriber steps (default {d.payload})"
    )
    parser.add_argument(
        "--sizes",
        default=",".join(map(str, d.sizes)),
        help="comma-separated payload sizes measured at one subscriber ('' for none; default 10,1000,10000,100000)",
    )
    parser.add_argument(
        "--publishers", type=int, default=d.publishers, help=f"publisher processes (default {d.publishers})"
    )
    parser.add_argument(
        "--subscriber-processes",
        type=int,
        default=d.subscriber_processes,
        help=f"subscriber processes at most (default {d.subscriber_processes})",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=d.window,
        help=f"messages published ahead of the slowest subscription, at most (default {d.window})",
    )
    parser.add_argument(
        "--idle-connections",
        type=int,
        default=d.idle_connections,
        help=f"connections opened to measure idle memory (default {d.idle_connections}; 0 skips)",
    )
    parser.add_argument(
        "--idle-subscriptions",
        type=int,
        default=d.idle_subscriptions,
        help=f"subscriptions opened to measure idle memory (default {d.idle_subscriptions}; 0 skips)",
    )
    parser.add_argument(
        "--server-python",
        default=d.server_python,
        metavar="INTERPRETER",
        help="the server's Python (e.g. a PyPy venv's bin/python with pulsyflux installed; default: this one)",
    )


def _ints(text: str) -> list[int]:
    return [max(1, int(n)) for n in str(text).split(",") if n.strip()]


def options_from_args(args: argparse.Namespace) -> Options:
    return Options(
        runs=max(1, args.runs),
        duration=args.duration,
        warmup=args.warmup,
        subscribers=_ints(args.subscribers),
        payload=max(1, args.payload),
        sizes=_ints(args.sizes),
        publishers=max(1, args.publishers),
        subscriber_processes=max(1, args.subscriber_processes),
        window=max(1, args.window),
        idle_connections=max(0, args.idle_connections),
        idle_subscriptions=max(0, args.idle_subscriptions),
        server_python=args.server_python,
    )


# -- the parent's side -----------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class _Reporter(Child):
    """A client process: ready on its first line, then lines of ``clock count [least]``."""

    def __init__(self, name: str, on_line: Optional[Callable[["_Reporter"], None]] = None) -> None:
        super().__init__(name)
        self.on_line = on_line
        self.samples: list[tuple[float, int]] = []  # (its monotonic clock, its count)
        self.least = 0  # subscribers: messages read by its slowest subscription

    def outReceived(self, data: bytes) -> None:
        if not self.ready.called:
            super().outReceived(data)
            data, self._out = self._out, b""
        self._out += data
        *lines, self._out = self._out.split(b"\n")
        for line in lines:
            fields = line.split()
            if len(fields) >= 2:
                self.samples.append((float(fields[0]), int(fields[1])))
                if len(fields) >= 3:
                    self.least = int(fields[2])
        if lines and self.on_line is not None:
            self.on_line(self)

    def rate(self, t0: float, t1: float) -> float:
        """Its count's growth per second between two of our monotonic clock readings (CLOCK_MONOTONIC is system-wide)."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return 0.0
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def _spawn(reactor: Any, python: str, child: Child, *args: str) -> Child:
    argv = [python, "-m", "pulsyflux.bench.capacity", *args]
    reactor.spawnProcess(child, python, argv, env=dict(os.environ))
    return child


async def _stop_all(children: list[Child]) -> None:
    await DeferredList([child.stop() for child in children])


def _window(options: Options, subscribers: int, size: int) -> int:
    """The publishers' lead, small enough that every backlog fits the broker's limits together."""
    text = size * 4 // 3 + 64  # a message as JSON with base64, in every subscriber's backlog
    return max(16, min(options.window, _BACKLOG_BUDGET // (subscribers * text), _SUBSCRIBER_BUDGET // text))


async def _step(reactor: Any, options: Options, address: str, server_pid: int, n: int, size: int) -> dict:
    topic = f"capacity-{n}-{size}-{uuid.uuid4()}"
    procs = min(n, options.subscriber_processes)
    shares = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
    window = _window(options, n, size)
    publishers: list[_Reporter] = []

    def top_up(_: _Reporter) -> None:
        least = min(s.least for s in subscribers)
        share = (least + window) // len(publishers) if publishers else 0
        for pub in publishers:
            pub.transport.write(b"%d\n" % share)

    subscribers = [_Reporter(f"subscriber {i}", top_up) for i in range(procs)]
    children: list[Child] = []
    try:
        for sub, share in zip(subscribers, shares):
            children.append(_spawn(reactor, options.python, sub, "sub", address, topic, str(share)))
        await DeferredList([s.ready for s in subscribers], fireOnOneErrback=True, consumeErrors=True)
        for i in range(options.publishers):
            pub = _Reporter(f"publisher {i}")
            children.append(_spawn(reactor, options.python, pub, "pub", address, topic, str(size)))
            publishers.append(pub)
        await DeferredList([p.ready for p in publishers], fireOnOneErrback=True, consumeErrors=True)
        top_up(subscribers[0])
        await sleep(reactor, options.warmup)
        t0, cpu0 = time.monotonic(), cpu_seconds(server_pid)
        await sleep(reactor, options.duration)
        t1, cpu1 = time.monotonic(), cpu_seconds(server_pid)
    except Exception as e:
        await _stop_all(children)
        raise RuntimeError(f"step {n} subscribers, {size} bytes: {e}") from e
    await _stop_all(children)
    published = sum(p.rate(t0, t1) for p in publishers)
    deliveries = sum(s.rate(t0, t1) for s in subscribers)
    cpu = (cpu1 - cpu0) / (t1 - t0)  # server CPU seconds per second
    return {
        "subscribers": n,
        "payload": size,
        "window": window,
        "msgs_per_s": published,
        "deliveries_per_s": deliveries,
        "server_cpu_percent": cpu * 100,
        "server_us_per_msg": cpu / published * 1e6 if published else None,
        "server_us_per_delivery": cpu / deliveries * 1e6 if deliveries else None,
    }


async def _idle_memory(reactor: Any, options: Options, address: str, server_pid: int) -> dict:
    if not (options.idle_connections or options.idle_subscriptions):
        return {}
    child = _Reporter("idle")
    _spawn(reactor, options.python, child, "idle", address, str(options.idle_connections))
    try:
        await child.ready
        await sleep(reactor, 0.5)
        base = rss_bytes(server_pid)
        child.transport.write(b"connect\n")
        await _line(reactor, child, "connected")
        with_connections = rss_bytes(server_pid)
        child.transport.write(b"subscribe %d\n" % options.idle_subscriptions)
        await _line(reactor, child, "subscribed")
        with_subscriptions = rss_bytes(server_pid)
    finally:
        await child.stop()
    result: dict[str, Any] = {"server_rss_base": base}
    if options.idle_connections:
        result["bytes_per_connection"] = (with_connections - base) / options.idle_connections
    if options.idle_subscriptions:
        result["bytes_per_subscription"] = (with_subscriptions - with_connections) / options.idle_subscriptions
    return result


async def _line(reactor: Any, child: _Reporter, word: str, timeout: float = 300.0) -> None:
    """Wait until the child printed ``clock <count> ...`` after a command (its count says which reply)."""
    seen = len(child.samples)
    waited = 0.0
    while len(child.samples) == seen:
        if child.ended.called or waited > timeout:
            raise RuntimeError(f"the idle-memory process did not answer '{word}'")
        await sleep(reactor, 0.05)
        waited += 0.05
    await sleep(reactor, 0.5)  # let the server settle before its memory is read


async def _measure(reactor: Any, options: Options, progress: Progress) -> dict:
    progress(f"starting the server and broker process ({options.server_python})")
    server = Child("server")
    _spawn(reactor, options.server_python, server, "server")
    try:
        port = int(await server.ready)
        address = f"127.0.0.1:{port}"
        progress("idle memory")
        idle = await _idle_memory(reactor, options, address, server.pid)
        plan = [(n, options.payload) for n in options.subscribers] + [(1, size) for size in options.sizes]
        progress("warming up")
        await _step(reactor, options, address, server.pid, 1, options.payload)
        runs = []
        for number in range(1, options.runs + 1):
            progress(f"run {number}/{options.runs}")
            steps = {}
            for n, size in plan:
                try:
                    result = await _step(reactor, options, address, server.pid, n, size)
                except RuntimeError as e:  # one step failing (a client gave up) does not lose the others
                    progress(str(e).splitlines()[0])
                    continue
                steps[f"{n}x{size}"] = result
                progress(_one_line(result))
            runs.append(steps)
        return _summarise(options, idle, runs, plan)
    finally:
        await server.stop()


def _one_line(r: dict) -> str:
    return (
        f"{r['subscribers']:>6} subscribers x {r['payload']:>6} B: {r['msgs_per_s']:,.0f} msgs/s, "
        f"{r['deliveries_per_s']:,.0f} deliveries/s, server CPU {r['server_cpu_percent']:.0f}%, "
        f"{fmt(r['server_us_per_msg'], ',.1f')} us/msg, {fmt(r['server_us_per_delivery'], ',.2f')} us/delivery"
    )


def _summarise(options: Options, idle: dict, runs: list[dict], plan: list[tuple[int, int]]) -> dict:
    medians: dict[str, Any] = {}
    for n, size in plan:
        key = f"{n}x{size}"
        medians[key] = {
            "subscribers": n,
            "payload": size,
            **{
                name: median(runs, key, name)
                for name in (
                    "msgs_per_s",
                    "deliveries_per_s",
                    "server_cpu_percent",
                    "server_us_per_msg",
                    "server_us_per_delivery",
                )
            },
        }
    return {
        "options": public_options(options) | {"server_python": options.server_python},
        "machine": machine(),
        "server": _interpreter(options.server_python),
        "idle": idle,
        "medians": medians,
        "runs": runs,
        "failed": 0,
    }


def _interpreter(python: str) -> str:
    import subprocess

    code = "import platform, sys; print(platform.python_implementation(), platform.python_version())"
    try:
        return subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return python


def measure(reactor: Any, options: Options, progress: Optional[Progress] = None) -> "Deferred[dict]":
    """Run the benchmark on a running reactor; fires with the results dict."""
    return start(_measure, reactor, options, progress)


def run(options: Optional[Options] = None, progress: Optional[Progress] = None) -> dict:
    """Run the benchmark to completion on the global reactor (once per process)."""
    return run_blocking(measure, options or Options(), progress)


def format_report(results: dict) -> str:
    """The results as a table a person reads."""
    idle = results["idle"]
    lines = [
        f"pulsyflux bench capacity: server on {results['server']}, medians of {len(results['runs'])} runs, "
        f"{results['options']['publishers']} publisher processes ({results['machine']['cpus']} CPUs, "
        f"clients on Python {results['machine']['python']})",
        "  subscribers  payload      msgs/s  deliveries/s  server CPU  us/msg  us/delivery",
    ]
    for m in results["medians"].values():
        lines.append(
            f"  {m['subscribers']:>11,} {m['payload']:>8,} {fmt(m['msgs_per_s']):>11} {fmt(m['deliveries_per_s']):>13}"
            f" {fmt(m['server_cpu_percent']):>10}% {fmt(m['server_us_per_msg'], ',.1f'):>7}"
            f" {fmt(m['server_us_per_delivery'], ',.2f'):>12}"
        )
    if idle:
        lines.append(
            f"  idle server memory: {fmt(idle.get('bytes_per_connection'))} bytes per connection, "
            f"{fmt(idle.get('bytes_per_subscription'))} bytes per subscription "
            f"(resident {idle['server_rss_base'] / 2**20:.0f} MiB before)"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m pulsyflux.bench.capacity [options]``; ``server``/``sub``/``pub``/``idle`` for the children."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["server"], ["sub"], ["pub"], ["idle"]):
        _child(argv)
        return 0
    description = "What the server sustains, loaded from several client processes."
    return script_main(sys.modules[__name__], description, argv, prog="pulsyflux bench capacity")


# -- the children ------------------------------------------------------------------------


def _say(*fields: Any) -> None:
    print(time.monotonic(), *fields, flush=True)


def _child(argv: list[str]) -> None:
    from twisted.internet import reactor

    def failed(failure: Any) -> None:
        print(failure.getErrorMessage(), file=sys.stderr, flush=True)
        if reactor.running:
            reactor.stop()

    if argv[0] == "server":
        reactor.callWhenRunning(_server, reactor, failed)
    else:
        works: dict[str, Callable[..., Any]] = {"sub": _subscriber, "pub": _publisher, "idle": _idle}
        work = works[argv[0]]
        reactor.callWhenRunning(lambda: Deferred.fromCoroutine(work(reactor, *argv[1:])).addErrback(failed))
    run_as_child(reactor)


def _server(reactor: Any, failed: Callable[[Any], None]) -> None:
    """A BrokerService with room for the largest step: 10,000 subscriptions are 10,000 more connections."""
    from pulsyflux.endpoints import port_number
    from pulsyflux.server import ServerFactory
    from pulsyflux.service import BrokerService

    factory = ServerFactory(reactor, max_connections=30_000)
    service = BrokerService("tcp:0:interface=127.0.0.1", reactor=reactor, factory=factory, max_subscriptions=30_000)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    ready = service.whenReady().addCallback(lambda _: service.server.whenListening())
    ready.addCallbacks(lambda port: print(port_number(port), flush=True), failed)


async def _patient_connect(kind: Any, address: str, reactor: Any, attempts: int = 10) -> Any:
    """Connect, trying again while a server busy with thousands of subscriptions answers late."""
    for attempt in range(attempts):
        try:
            return await kind.connect(address, reactor=reactor)
        except Exception:
            if attempt == attempts - 1:
                raise
            await sleep(reactor, 0.5)


async def _subscribe_many(client: Any, topic: str, count: int) -> list[Any]:
    gate = DeferredSemaphore(_SUBSCRIBE_AT_ONCE)
    done = await DeferredList(
        [gate.run(client.subscribe, topic, 1000) for _ in range(count)], fireOnOneErrback=True, consumeErrors=True
    )
    return [sub for _, sub in done]


async def _subscriber(reactor: Any, address: str, topic: str, count: str) -> None:
    """Read ``count`` subscriptions of ``topic``; report the total read and the slowest's count."""
    from twisted.internet.task import LoopingCall

    from pulsyflux.broker import BrokerClient

    client = await _patient_connect(BrokerClient, address, reactor)
    subs = await _subscribe_many(client, topic, int(count))
    counts = [0] * len(subs)

    async def read(index: int, sub: Any) -> None:
        async for _ in sub:
            counts[index] += 1

    for index, sub in enumerate(subs):
        Deferred.fromCoroutine(read(index, sub))
    print("ready", flush=True)
    LoopingCall(lambda: _say(sum(counts), min(counts))).start(_REPORT_EVERY)


async def _publisher(reactor: Any, address: str, topic: str, size: str) -> None:
    """Publish to ``topic`` up to the limit this process reads on stdin; report how many the broker accepted."""
    from twisted.internet import stdio
    from twisted.internet.task import LoopingCall
    from twisted.protocols.basic import LineReceiver

    from pulsyflux.broker import BrokerClient

    client = await _patient_connect(BrokerClient, address, reactor)
    payload = b"x" * int(size)
    state = {"limit": 0, "sent": 0, "accepted": 0}

    def accepted(_: Any) -> None:
        state["accepted"] += 1

    def publish_to_limit() -> None:
        publish = client.publish
        while state["sent"] < state["limit"]:
            publish(topic, payload).addCallback(accepted)
            state["sent"] += 1

    class Limits(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            state["limit"] = max(state["limit"], int(line))
            publish_to_limit()

    stdio.StandardIO(Limits(), reactor=reactor)
    print("ready", flush=True)
    LoopingCall(lambda: _say(state["accepted"])).start(_REPORT_EVERY)


async def _idle(reactor: Any, address: str, connections: str) -> None:
    """On ``connect``: open registered connections that stay idle; on ``subscribe N``: N idle subscriptions."""
    from twisted.internet import stdio
    from twisted.protocols.basic import LineReceiver

    from pulsyflux.broker import BrokerClient
    from pulsyflux.client import Consumer

    held: list[Any] = []

    async def connect() -> None:
        gate = DeferredSemaphore(32)
        for start_at in range(0, int(connections), 256):
            batch = range(start_at, min(start_at + 256, int(connections)))
            held.extend(
                r
                for _, r in await DeferredList(
                    [gate.run(Consumer.connect, address, uuid.uuid4(), reactor=reactor) for _ in batch],
                    fireOnOneErrback=True,
                    consumeErrors=True,
                )
            )
        _say(len(held))

    async def subscribe(count: int) -> None:
        client = await BrokerClient.connect(address, reactor=reactor)
        held.append(client)
        held.extend(await _subscribe_many(client, f"idle-{uuid.uuid4()}", count))
        _say(count)

    def fail(failure: Any) -> None:
        print(failure.getErrorMessage(), file=sys.stderr, flush=True)
        reactor.stop()

    class Commands(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            word, _, arg = line.decode().partition(" ")
            work = connect() if word == "connect" else subscribe(int(arg))
            Deferred.fromCoroutine(work).addErrback(fail)

    stdio.StandardIO(Commands(), reactor=reactor)
    print("ready", flush=True)


if __name__ == "__main__":
    sys.exit(main())
