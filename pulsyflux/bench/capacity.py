"""``pulsyflux bench capacity``: what the *server* sustains, loaded from several client processes.

``bench pubsub`` runs every client in one process, so it measures that
process as much as the server. Here the server and its broker run in a child
process of their own (``--server-python`` picks its interpreter: PyPy, say;
give it twice to measure two servers step by step, interleaved) and the load
comes from separate client processes that cost as little per message as the
protocol allows, so that the server, not the clients, is what runs out:

* ``--publishers`` publisher processes, each sending the same pre-encoded
  batch of ``--publish-batch`` messages, as a busy :class:`~pulsyflux.BrokerClient`
  sends (in the binary encoding it agrees with the broker; with ``--encoding json``
  a JSON array, as Go publishers send) over one Consumer, four requests in flight;
* up to ``--subscriber-processes`` subscriber processes sharing the N
  subscriptions of a step. Each subscription is what a ``BrokerClient``
  subscription is on the wire (a Provider connection of its own, announced to
  the broker, answering its probe with the encoding it reads), but its
  handler only counts the messages of each forward (by length, or a
  substring count for JSON) and answers ``ok``.

The publishers never run more than ``window`` messages ahead of the slowest
subscription (the subscriber processes report what they read every 20 ms,
and this process passes the limit on), so the broker never drops: what is
measured is sustained, not buffered. A step warms up until the server's CPU
per delivery has settled (three one-second readings within 10%: PyPy's JIT
needs a few seconds), then counts for ``--duration``: deliveries per second
(each process counts its own, over its own clock) and messages per second
(deliveries / subscribers: what every subscriber got), the
server's CPU (``/proc``) per message and per delivery, and from that what the
server would sustain with a whole core to itself. With ``--pin`` (the default
with two CPUs or more) the server runs on CPU 0 and every client on the
others. Before the steps: the server's idle memory per registered connection
and per subscription (resident set, ``/proc``).

    results = run(Options(runs=3, server_python=["pypy3"]), progress=print)
    print(format_report(results))
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.python.failure import Failure

from ..wire.messages import BINARY_MAGIC, CONTROL_PREFIX, DROPPED, split_binary
from .common import (
    Child,
    Progress,
    cpu_seconds,
    entry_points,
    fmt,
    machine,
    median,
    public_options,
    run_as_child,
    script_main,
    sleep,
)

if TYPE_CHECKING:
    from .._types import IReactor


__all__ = [
    "Options",
    "add_arguments",
    "options_from_args",
    "measure",
    "run",
    "format_report",
    "main",
    "count_forward",
    "settled",
]

_REPORT_EVERY = 0.02  # seconds between a subscriber process's reports
_BACKLOG_BUDGET = 256 << 20  # bytes of JSON the window may leave in forwards and backlogs, over all subscribers
_SUBSCRIBER_BUDGET = 4 << 20  # and for one subscriber (the broker's default limit is 8 MiB)
_REQUEST_BUDGET = 256 << 10  # bytes of JSON in one publish request at most (as the broker's forwards)
_SUBSCRIBE_AT_ONCE = 8  # a broker sets up at most 8 subscriptions of one client at once
_PUBLISH_IN_FLIGHT = 4  # publish requests in flight per publisher (as BrokerClient's Publisher)
_SETTLE_WINDOW = 1.0  # seconds per warm-up reading
_SETTLE_READINGS = 3  # readings in a row ...
_SETTLE_SPREAD = 0.10  # ... within 10% of each other: settled


@dataclass
class Options:
    """What to measure; the defaults are the issue's steps."""

    runs: int = 3  # repetitions; medians are reported
    duration: float = 3.0  # seconds counted per step
    warmup: float = 3.0  # seconds of load at least before counting
    max_warmup: float = 30.0  # seconds of load at most before counting, settled or not
    subscribers: list[int] = field(default_factory=lambda: [1, 10, 100, 1000, 10000])
    payload: int = 100  # bytes per message in the subscriber steps
    sizes: list[int] = field(default_factory=lambda: [10, 1000, 10000, 100000])  # at one subscriber
    publishers: int = 2  # publisher processes
    publish_batch: int = 100  # messages per publish request, at most
    subscriber_processes: int = 2  # at most this many subscriber processes share a step's subscriptions
    window: int = 8000  # messages the publishers may be ahead of the slowest subscription
    idle_connections: int = 2000  # for the idle memory per connection
    idle_subscriptions: int = 2000  # for the idle memory per subscription
    encoding: str = "binary"  # what publishers send and subscribers read: "binary" (our clients') or "json" (Go's)
    pin: bool = (os.cpu_count() or 1) >= 2  # server on CPU 0, clients on the others
    server_python: list[str] = field(default_factory=lambda: [sys.executable])  # the servers' interpreters
    python: str = sys.executable  # the clients' interpreter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of :class:`Options` as command-line flags (shared by every front end)."""
    d = Options()
    parser.add_argument("--runs", type=int, default=d.runs, help=f"repetitions, medians reported (default {d.runs})")
    parser.add_argument("--duration", type=float, default=d.duration, help=f"seconds per step (default {d.duration})")
    parser.add_argument(
        "--warmup",
        type=float,
        default=d.warmup,
        help=f"seconds of load at least before counting; more until the server's CPU per delivery settles "
        f"(default {d.warmup})",
    )
    parser.add_argument(
        "--max-warmup",
        type=float,
        default=d.max_warmup,
        help=f"seconds of load at most before counting, settled or not (default {d.max_warmup})",
    )
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
        "--publish-batch",
        type=int,
        default=d.publish_batch,
        help=f"messages per publish request at most, fewer where the window or 256 KiB needs it "
        f"(default {d.publish_batch}; 1: every message its own request)",
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
        "--encoding",
        choices=("binary", "json"),
        default=d.encoding,
        help="how messages travel: 'binary' (what pulsyflux's own clients agree with the broker) or 'json' "
        f"(what Go publishers and subscribers send and read) (default {d.encoding})",
    )
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=d.pin,
        help="run the server on CPU 0 and the clients on the other CPUs (default: on with two CPUs or more)",
    )
    parser.add_argument(
        "--server-python",
        action="append",
        metavar="INTERPRETER",
        help="the server's Python (e.g. a PyPy venv's bin/python with pulsyflux installed; default: this one); "
        "twice: both servers measured, step by step in turn, with their ratios",
    )


def _ints(text: str) -> list[int]:
    return [max(1, int(n)) for n in str(text).split(",") if n.strip()]


def options_from_args(args: argparse.Namespace) -> Options:
    return Options(
        runs=max(1, args.runs),
        duration=args.duration,
        warmup=max(0.0, args.warmup),
        max_warmup=max(args.warmup, args.max_warmup),
        subscribers=_ints(args.subscribers),
        payload=max(1, args.payload),
        sizes=_ints(args.sizes),
        publishers=max(1, args.publishers),
        publish_batch=max(1, args.publish_batch),
        subscriber_processes=max(1, args.subscriber_processes),
        window=max(1, args.window),
        idle_connections=max(0, args.idle_connections),
        idle_subscriptions=max(0, args.idle_subscriptions),
        encoding=args.encoding,
        pin=bool(args.pin),
        server_python=args.server_python or [sys.executable],
    )


# -- what the children count, and when a step has warmed up (plain functions: tested) -------

_MESSAGE = b'{"Topic":'  # every message the broker forwards starts so (a payload is base64: never in it)
_CONTROL = b'{"Topic":"$pulsyflux/'
_CONTROL_TOPIC = CONTROL_PREFIX.encode("ascii")
_DROPPED_TOTAL = re.compile(rb'"\$pulsyflux/dropped".*?"dropped":"(\d+)"')


def count_forward(body: bytes, record_size: int = 0) -> tuple[int, int]:
    """(messages, drop total or -1) in a forward the broker sent a subscriber: a C-speed count, no decode.

    Control messages (a drop notice, a probe) are not counted as messages;
    a drop notice's total (dropped so far for that subscription) is returned.
    A binary forward of records of ``record_size`` bytes each (all the
    load's messages are alike) is counted by its length; one with a control
    record in it is read with the codec.
    """
    if body[:4] == BINARY_MAGIC:
        if _CONTROL_TOPIC not in body and record_size:
            return (len(body) - len(BINARY_MAGIC)) // record_size, -1
        count, dropped = 0, -1
        for topic, _, _, headers in split_binary(body):
            if topic.startswith(CONTROL_PREFIX):
                if topic == DROPPED and headers:
                    dropped = int(headers.get("dropped", -1))
            else:
                count += 1
        return count, dropped
    count = body.count(_MESSAGE)
    if _CONTROL not in body:
        return count, -1
    count -= body.count(_CONTROL)
    found = _DROPPED_TOTAL.search(body)
    return count, int(found.group(1)) if found else -1


def settled(readings: list[Optional[float]], count: int = _SETTLE_READINGS, spread: float = _SETTLE_SPREAD) -> bool:
    """Whether the last ``count`` readings (server CPU per delivery) are all there and within ``spread``."""
    last = readings[-count:]
    if len(last) < count or any(r is None or r <= 0 for r in last):
        return False
    values = [r for r in last if r is not None]
    return max(values) <= min(values) * (1 + spread)


def _window(options: Options, subscribers: int, size: int) -> int:
    """The publishers' lead, small enough that every backlog fits the broker's limits together."""
    text = _text_size(size)
    return max(16, min(options.window, _BACKLOG_BUDGET // (subscribers * text), _SUBSCRIBER_BUDGET // text))


def _text_size(size: int) -> int:
    return size * 4 // 3 + 64  # a message as JSON with base64


def _publish_batch(options: Options, window: int, size: int) -> int:
    """Messages per publish request: never more than a publisher's share of the window allows to flow."""
    share = window // (2 * options.publishers)
    return max(1, min(options.publish_batch, share, _REQUEST_BUDGET // _text_size(size)))


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
    """A client process: ready on its first line, then lines of ``clock count [least [dropped]]``."""

    def __init__(self, name: str, on_line: Optional[Callable[["_Reporter"], None]] = None) -> None:
        super().__init__(name)
        self.on_line = on_line
        self.samples: list[tuple[float, int]] = []  # (its monotonic clock, its count)
        self.least = 0  # subscribers: messages read by its slowest subscription
        self.dropped = 0  # subscribers: messages the broker told its subscriptions it dropped

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
                if len(fields) >= 4:
                    self.dropped = int(fields[3])
        if lines and self.on_line is not None:
            self.on_line(self)

    def count_at(self, t: float) -> Optional[tuple[float, int]]:
        """Its last sample at or before ``t`` (our monotonic clock: CLOCK_MONOTONIC is system-wide)."""
        found = None
        for sample in reversed(self.samples):
            if sample[0] <= t:
                found = sample
                break
        return found

    def rate(self, t0: float, t1: float) -> float:
        """Its count's growth per second between two of our clock readings."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return 0.0
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def _spawn(reactor: IReactor, python: str, child: Child, *args: str, cpus: Optional[set[int]] = None) -> Child:
    argv = [python, "-m", "pulsyflux.bench.capacity", *args]
    reactor.spawnProcess(child, python, argv, env=dict(os.environ))
    if cpus:
        try:
            os.sched_setaffinity(child.pid, cpus)
        except (AttributeError, OSError):
            pass  # not Linux, or the process is gone: unpinned
    return child


def _cpu_sets(pin: bool) -> tuple[Optional[set[int]], Optional[set[int]]]:
    """(the server's CPUs, the clients' CPUs), or (None, None) unpinned."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None, None
    if not pin or len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


async def _stop_all(children: list[Child]) -> None:
    await DeferredList([child.stop() for child in children])


class _Server:
    """One server process under test."""

    def __init__(self, python: str, child: Child, name: str) -> None:
        self.python = python
        self.child = child
        self.name = name
        self.address = ""

    @property
    def pid(self) -> int:
        return self.child.pid


async def _step(
    reactor: IReactor, options: Options, server: _Server, n: int, size: int, client_cpus: Optional[set[int]]
) -> dict:
    topic = f"capacity-{n}-{size}-{uuid.uuid4()}"
    procs = min(n, options.subscriber_processes)
    shares = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
    window = _window(options, n, size)
    batch = _publish_batch(options, window, size)
    publishers: list[_Reporter] = []

    def top_up(_: _Reporter) -> None:
        least = min(s.least for s in subscribers)
        share = (least + window) // len(publishers) if publishers else 0
        for pub in publishers:
            pub.transport.write(b"%d\n" % share)

    subscribers = [_Reporter(f"subscriber {i}", top_up) for i in range(procs)]
    children: list[Child] = []
    address = server.address
    try:
        began = time.monotonic()
        for sub, share in zip(subscribers, shares):
            children.append(
                _spawn(
                    reactor,
                    options.python,
                    sub,
                    "sub",
                    address,
                    topic,
                    str(share),
                    str(size),
                    options.encoding,
                    cpus=client_cpus,
                )  # fmt: skip
            )
        await DeferredList([s.ready for s in subscribers], fireOnOneErrback=True, consumeErrors=True)
        setup = time.monotonic() - began
        for i in range(options.publishers):
            pub = _Reporter(f"publisher {i}")
            children.append(
                _spawn(
                    reactor,
                    options.python,
                    pub,
                    "pub",
                    address,
                    topic,
                    str(size),
                    str(batch),
                    options.encoding,
                    cpus=client_cpus,
                )  # fmt: skip
            )
            publishers.append(pub)
        await DeferredList([p.ready for p in publishers], fireOnOneErrback=True, consumeErrors=True)
        top_up(subscribers[0])
        warmed, steady = await _warm_up(reactor, options, server.pid, subscribers)
        clients = [c.pid for c in children]
        t0, cpu0, ccpu0 = time.monotonic(), cpu_seconds(server.pid), sum(map(cpu_seconds, clients))
        await sleep(reactor, options.duration)
        t1, cpu1, ccpu1 = time.monotonic(), cpu_seconds(server.pid), sum(map(cpu_seconds, clients))
        resident = rss_bytes(server.pid)  # with the step's subscriptions and its load
    except Exception as e:
        await _stop_all(children)
        raise RuntimeError(f"step {n} subscribers, {size} bytes: {e}") from e
    await _stop_all(children)
    published = sum(p.rate(t0, t1) for p in publishers)
    deliveries = sum(s.rate(t0, t1) for s in subscribers)
    # Messages per second are those every subscriber received: with thousands of subscribers a publish
    # is answered only after its whole fan-out, so the publishers' own count moves in rare steps.
    sustained = deliveries / n
    cpu = (cpu1 - cpu0) / (t1 - t0)  # server CPU seconds per second
    per_msg = cpu / sustained * 1e6 if sustained else None
    per_delivery = cpu / deliveries * 1e6 if deliveries else None
    return {
        "subscribers": n,
        "payload": size,
        "window": window,
        "publish_batch": batch,
        "setup_s": setup,
        "warmup_s": warmed,
        "settled": steady,
        "msgs_per_s": sustained,
        "published_per_s": published,
        "deliveries_per_s": deliveries,
        "dropped": sum(s.dropped for s in subscribers),
        "server_rss_mib": resident / 2**20,
        "server_cpu_percent": cpu * 100,
        "clients_cpu_percent": (ccpu1 - ccpu0) / (t1 - t0) * 100,
        "server_us_per_msg": per_msg,
        "server_us_per_delivery": per_delivery,
        "core_msgs_per_s": 1e6 / per_msg if per_msg else None,
        "core_deliveries_per_s": 1e6 / per_delivery if per_delivery else None,
    }


async def _warm_up(
    reactor: IReactor, options: Options, server_pid: int, subscribers: list[_Reporter]
) -> tuple[float, bool]:
    """Load until the server's CPU per delivery has settled (at least ``warmup`` s, at most ``max_warmup``).

    Returns (seconds warmed, settled).
    """
    began = time.monotonic()
    readings: list[Optional[float]] = []
    while True:
        elapsed = time.monotonic() - began
        if elapsed >= options.warmup and settled(readings):
            return elapsed, True
        if elapsed >= options.max_warmup:
            return elapsed, False
        t0, cpu0 = time.monotonic(), cpu_seconds(server_pid)
        await sleep(reactor, min(_SETTLE_WINDOW, max(options.warmup, 0.05)))
        t1, cpu1 = time.monotonic(), cpu_seconds(server_pid)
        deliveries = sum(s.rate(t0, t1) for s in subscribers) * (t1 - t0)
        readings.append((cpu1 - cpu0) / deliveries if deliveries > 0 else None)


async def _idle_memory(reactor: IReactor, options: Options, server: _Server, cpus: Optional[set[int]]) -> dict:
    if not (options.idle_connections or options.idle_subscriptions):
        return {}
    child = _Reporter("idle")
    _spawn(reactor, options.python, child, "idle", server.address, str(options.idle_connections), cpus=cpus)
    try:
        await child.ready
        await sleep(reactor, 0.5)
        base = rss_bytes(server.pid)
        child.transport.write(b"connect\n")
        await _line(reactor, child, "connected")
        with_connections = rss_bytes(server.pid)
        child.transport.write(b"subscribe %d\n" % options.idle_subscriptions)
        await _line(reactor, child, "subscribed")
        with_subscriptions = rss_bytes(server.pid)
    finally:
        await child.stop()
    result: dict[str, Any] = {"server_rss_base": base}
    if options.idle_connections:
        result["bytes_per_connection"] = (with_connections - base) / options.idle_connections
    if options.idle_subscriptions:
        result["bytes_per_subscription"] = (with_subscriptions - with_connections) / options.idle_subscriptions
    return result


async def _line(reactor: IReactor, child: _Reporter, word: str, timeout: float = 300.0) -> None:
    """Wait until the child printed ``clock <count> ...`` after a command (its count says which reply)."""
    seen = len(child.samples)
    waited = 0.0
    while len(child.samples) == seen:
        if child.ended.called or waited > timeout:
            raise RuntimeError(f"the idle-memory process did not answer '{word}'")
        await sleep(reactor, 0.05)
        waited += 0.05
    await sleep(reactor, 0.5)  # let the server settle before its memory is read


async def _start_server(reactor: IReactor, python: str, name: str, cpus: Optional[set[int]]) -> _Server:
    server = _Server(python, Child(name), name)
    _spawn(reactor, python, server.child, "server", cpus=cpus)
    port = int(await server.child.ready)
    server.address = f"127.0.0.1:{port}"
    return server


async def _measure(reactor: IReactor, options: Options, progress: Progress) -> dict:
    server_cpus, client_cpus = _cpu_sets(options.pin)
    ours = os.sched_getaffinity(0) if server_cpus else None
    if server_cpus and client_cpus:
        progress(f"pinned: servers on CPU {sorted(server_cpus)}, clients and this process on {sorted(client_cpus)}")
        os.sched_setaffinity(0, client_cpus)
    servers: list[_Server] = []
    try:
        for i, python in enumerate(options.server_python):
            name = f"server {chr(ord('A') + i)}"
            progress(f"starting {name} ({python})")
            servers.append(await _start_server(reactor, python, name, server_cpus))
        idle = {}
        for server in servers:
            progress(f"idle memory of {server.name}")
            idle[server.name] = await _idle_memory(reactor, options, server, client_cpus)
        plan = [(n, options.payload) for n in options.subscribers] + [(1, size) for size in options.sizes]
        runs: dict[str, list[dict]] = {server.name: [] for server in servers}
        for number in range(1, options.runs + 1):
            progress(f"run {number}/{options.runs}")
            steps: dict[str, dict] = {server.name: {} for server in servers}
            for n, size in plan:
                for server in servers:  # in turn, step by step: the machine's other load hits both alike
                    try:
                        result = await _step(reactor, options, server, n, size, client_cpus)
                    except RuntimeError as e:  # one step failing (a client gave up) does not lose the others
                        progress(f"{server.name}: {str(e).splitlines()[0]}")
                        continue
                    steps[server.name][f"{n}x{size}"] = result
                    progress(f"{server.name}: {_one_line(result)}")
            for server in servers:
                runs[server.name].append(steps[server.name])
        return _summarise(options, servers, idle, runs, plan, pinned=server_cpus is not None)
    finally:
        await DeferredList([server.child.stop() for server in servers])
        if ours:
            os.sched_setaffinity(0, ours)


def _one_line(r: dict) -> str:
    return (
        f"{r['subscribers']:>6} subscribers x {r['payload']:>6} B: {r['msgs_per_s']:,.0f} msgs/s, "
        f"{r['deliveries_per_s']:,.0f} deliveries/s, server CPU {r['server_cpu_percent']:.0f}% "
        f"(clients {r['clients_cpu_percent']:.0f}%), {fmt(r['server_us_per_msg'], ',.1f')} us/msg, "
        f"{fmt(r['server_us_per_delivery'], ',.2f')} us/delivery, warmed {r['warmup_s']:.0f} s"
        f"{'' if r['settled'] else ' (not settled)'}, set up in {r['setup_s']:.1f} s"
        + (f", {r['dropped']:,} DROPPED" if r["dropped"] else "")
    )


_MEASURES = (
    "msgs_per_s",
    "published_per_s",
    "deliveries_per_s",
    "server_cpu_percent",
    "clients_cpu_percent",
    "server_us_per_msg",
    "server_us_per_delivery",
    "core_msgs_per_s",
    "core_deliveries_per_s",
    "warmup_s",
    "setup_s",
    "dropped",
    "server_rss_mib",
)


def _summarise(
    options: Options,
    servers: list[_Server],
    idle: dict,
    runs: dict[str, list[dict]],
    plan: list[tuple[int, int]],
    pinned: bool,
) -> dict:
    out = []
    for server in servers:
        medians: dict[str, Any] = {}
        for n, size in plan:
            key = f"{n}x{size}"
            medians[key] = {
                "subscribers": n,
                "payload": size,
                "publish_batch": median(runs[server.name], key, "publish_batch"),
                **{name: median(runs[server.name], key, name) for name in _MEASURES},
            }
        out.append(
            {
                "name": server.name,
                "server": _interpreter(server.python),
                "idle": idle.get(server.name, {}),
                "medians": medians,
                "runs": runs[server.name],
            }
        )
    ratios: dict[str, Any] = {}
    if len(servers) >= 2:
        first, second = servers[0].name, servers[1].name
        for n, size in plan:
            key = f"{n}x{size}"
            ratios[key] = {
                name: _median_ratio(runs[second], runs[first], key, name)
                for name in ("msgs_per_s", "server_us_per_delivery", "core_msgs_per_s")
            }
    options_out = public_options(options)
    return {
        "options": options_out,
        "machine": machine() | {"pinned": pinned},
        "servers": out,
        "ratios": ratios,  # second server / first, medians of each run's ratio
        "failed": sum(1 for s in out for m in s["medians"].values() if m["msgs_per_s"] is None),
    }


def _median_ratio(top: list[dict], bottom: list[dict], key: str, name: str) -> Optional[float]:
    values = []
    for a, b in zip(top, bottom):
        x, y = a.get(key, {}).get(name), b.get(key, {}).get(name)
        if x and y:
            values.append(x / y)
    return statistics.median(values) if values else None


def _interpreter(python: str) -> str:
    import subprocess

    code = "import platform, sys; print(platform.python_implementation(), platform.python_version())"
    try:
        return subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return python


measure, run = entry_points(_measure, Options)


def format_report(results: dict) -> str:
    """The results as tables a person reads."""
    options = results["options"]
    cpus = results["machine"]["cpus"]
    sharing = (
        f"server pinned to CPU 0, the {options['publishers']} publisher and up to {options['subscriber_processes']} "
        f"subscriber processes to the other {cpus - 1}"
        if results["machine"].get("pinned")
        else f"server and clients unpinned on {cpus} CPUs"
    )
    lines = [
        f"pulsyflux bench capacity ({sharing}; clients on Python {results['machine']['python']}; "
        f"{options['encoding']} encoding)"
    ]
    for s in results["servers"]:
        lines += [
            f"{s['name']}: {s['server']}, medians of {len(s['runs'])} runs",
            "  subscribers  payload batch      msgs/s  deliveries/s  server CPU  clients CPU  us/msg  us/delivery"
            "  msgs/s at 1 core  deliveries/s at 1 core  server MiB",
        ]
        for m in s["medians"].values():
            lines.append(
                f"  {m['subscribers']:>11,} {m['payload']:>8,} {fmt(m['publish_batch']):>5}"
                f" {fmt(m['msgs_per_s']):>11} {fmt(m['deliveries_per_s']):>13}"
                f" {fmt(m['server_cpu_percent']):>10}% {fmt(m['clients_cpu_percent']):>11}%"
                f" {fmt(m['server_us_per_msg'], ',.1f'):>7} {fmt(m['server_us_per_delivery'], ',.2f'):>12}"
                f" {fmt(m['core_msgs_per_s']):>17} {fmt(m['core_deliveries_per_s']):>23}"
                f" {fmt(m['server_rss_mib']):>11}" + (f"  ({fmt(m['dropped'])} dropped)" if m["dropped"] else "")
            )
        idle = s["idle"]
        if idle:
            lines.append(
                f"  idle server memory: {fmt(idle.get('bytes_per_connection'))} bytes per connection, "
                f"{fmt(idle.get('bytes_per_subscription'))} bytes per subscription "
                f"(resident {idle['server_rss_base'] / 2**20:.0f} MiB before)"
            )
    if results["ratios"]:
        a, b = results["servers"][0], results["servers"][1]
        lines += [
            f"{b['name']} / {a['name']} ({b['server']} / {a['server']}), medians of each run's ratio:",
            "  subscribers  payload  msgs/s measured  server CPU per delivery  msgs/s at 1 core",
        ]
        for key, r in results["ratios"].items():
            m = a["medians"][key]
            lines.append(
                f"  {m['subscribers']:>11,} {m['payload']:>8,} {fmt(r['msgs_per_s'], '.2f'):>15}x"
                f" {fmt(r['server_us_per_delivery'], '.2f'):>23}x {fmt(r['core_msgs_per_s'], '.2f'):>16}x"
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

    def failed(failure: Failure) -> None:
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


def _server(reactor: IReactor, failed: Callable[[Any], None]) -> None:
    """A BrokerService with room for the largest step: 10,000 subscriptions are 10,000 connections.

    The collector is set as ``twistd pulsyflux`` sets it, the listen backlog
    is 1,024 (Twisted's default is 50), and the backlog bound is raised
    because every subscriber's backlog holds the same message objects (the
    broker counts a message once per subscriber; memory holds it once).
    """
    from pulsyflux.endpoints import port_number
    from pulsyflux.server.collector import tune_collector

    tune_collector()  # as twistd pulsyflux does
    from pulsyflux.server import ServerFactory
    from pulsyflux.service import BrokerService

    factory = ServerFactory(reactor, max_connections=30_000)
    service = BrokerService(
        "tcp:0:interface=127.0.0.1:backlog=1024",
        reactor=reactor,
        factory=factory,
        max_subscriptions=30_000,
        total_backlog_bytes=4 << 30,
    )
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    ready = service.whenReady().addCallback(lambda _: service.server.whenListening())
    ready.addCallbacks(lambda port: print(port_number(port), flush=True), failed)


async def _patient(connect: Callable[..., Any], *args: Any, attempts: int = 20, **kwargs: Any) -> Any:
    """Connect, trying again while a server busy with thousands of subscriptions answers late."""
    from twisted.internet import reactor

    for attempt in range(attempts):
        try:
            return await connect(*args, **kwargs)
        except Exception:
            if attempt == attempts - 1:
                raise
            await sleep(reactor, 0.5)


async def _broker_consumer(reactor: IReactor, address: str) -> tuple[Any, bool]:
    """A Consumer on the broker's channel, once the broker answers there; and whether it reads binary."""
    from pulsyflux.broker.link import DEFAULT_BROKER_CHANNEL, EMPTY_BATCH, reads_binary, send_until_registered
    from pulsyflux.client import Consumer

    consumer = await _patient(Consumer.connect, address, DEFAULT_BROKER_CHANNEL, reactor=reactor)
    answer = await send_until_registered(consumer, EMPTY_BATCH, reactor, timeout=30.0, patience=30.0)
    return consumer, reads_binary(answer)


async def _subscriber(reactor: IReactor, address: str, topic: str, count: str, size: str, encoding: str) -> None:
    """``count`` subscriptions of ``topic`` that count what they get; report the total, the slowest's
    count and the drops the broker told of."""
    from twisted.internet.task import LoopingCall

    from pulsyflux.broker.link import OK, OK_BINARY, PROBE
    from pulsyflux.broker.subscription import MESSAGES_INCOMPLETE
    from pulsyflux.client import Provider
    from pulsyflux.wire import messages
    from pulsyflux.wire.errors import PulsyfluxError

    announcer, _ = await _broker_consumer(reactor, address)
    counts = [0] * int(count)
    dropped = [0] * int(count)
    total = [0]
    held: list[Any] = []

    # The probe's answer says which encoding the broker forwards in (docs/protocol.md).
    welcome = OK_BINARY if encoding == "binary" else OK
    record_size = len(messages.encode_record(topic, b"x" * int(size), None))

    def counter(index: int) -> Callable[[bytes], bytes]:
        def handle(body: bytes) -> bytes:
            if body == PROBE:
                return welcome
            got, drops = count_forward(body, record_size)
            counts[index] += got
            total[0] += got
            if drops >= 0:
                dropped[index] = drops
            return OK

        return handle

    async def subscribe(index: int) -> None:
        channel = uuid.uuid4()
        provider = await _patient(
            Provider.connect,
            address,
            channel,
            handler=counter(index),
            reactor=reactor,
            max_incomplete=MESSAGES_INCOMPLETE,
        )
        held.append(provider)
        body = messages.control(messages.SUBSCRIBE, topic=topic, channel=str(channel)).encode("utf-8")
        for attempt in range(200):
            try:
                await announcer.send(body, timeout=60.0)
                return
            except PulsyfluxError as error:  # "too many subscriptions being set up ...; try again"
                if "try again" not in str(error) or attempt == 199:
                    raise
                await sleep(reactor, 0.05)

    gate = DeferredSemaphore(_SUBSCRIBE_AT_ONCE)
    await DeferredList(
        [gate.run(subscribe, i) for i in range(int(count))],
        fireOnOneErrback=True,
        consumeErrors=True,
    )
    print("ready", flush=True)
    LoopingCall(lambda: _say(total[0], min(counts), sum(dropped))).start(_REPORT_EVERY)


async def _publisher(reactor: IReactor, address: str, topic: str, size: str, batch: str, encoding: str) -> None:
    """Publish batches of ``batch`` messages to ``topic`` up to the limit this process reads on stdin;
    report how many the broker accepted."""
    from twisted.internet import stdio
    from twisted.internet.task import LoopingCall
    from twisted.protocols.basic import LineReceiver

    from pulsyflux.wire import messages

    consumer, binary = await _broker_consumer(reactor, address)
    if encoding == "binary" and not binary:
        raise RuntimeError("the server's broker does not read the binary encoding (try --encoding json)")
    per_request = int(batch)
    payload = b"x" * int(size)
    if encoding == "binary":  # the broker said it reads it (its answer to the empty batch)
        body = messages.encode_records([messages.encode_record(topic, payload, None)] * per_request)
    else:
        body = messages.encode_batch([messages.encode_text(topic, payload, None)] * per_request)
    state = {"limit": 0, "sent": 0, "accepted": 0, "in_flight": 0}

    def accepted(_: Any) -> None:
        state["accepted"] += per_request
        state["in_flight"] -= 1
        publish_to_limit()

    def failed(failure: Failure) -> None:
        print(failure.getErrorMessage(), file=sys.stderr, flush=True)
        reactor.stop()

    def publish_to_limit() -> None:
        send = consumer.send
        while state["in_flight"] < _PUBLISH_IN_FLIGHT and state["sent"] + per_request <= state["limit"]:
            state["sent"] += per_request
            state["in_flight"] += 1
            send(body, timeout=0).addCallbacks(accepted, failed)

    class Limits(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            state["limit"] = max(state["limit"], int(line))
            publish_to_limit()

    stdio.StandardIO(Limits(), reactor=reactor)
    print("ready", flush=True)
    LoopingCall(lambda: _say(state["accepted"])).start(_REPORT_EVERY)


async def _idle(reactor: IReactor, address: str, connections: str) -> None:
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
        gate = DeferredSemaphore(_SUBSCRIBE_AT_ONCE)
        topic = f"idle-{uuid.uuid4()}"
        done = await DeferredList(
            [gate.run(client.subscribe, topic, 1000) for _ in range(count)], fireOnOneErrback=True, consumeErrors=True
        )
        held.extend(sub for _, sub in done)
        _say(count)

    def fail(failure: Failure) -> None:
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
