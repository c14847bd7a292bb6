"""The workloads every peer runs, written once against a tiny adapter interface.

This module imports Twisted only (no pulsyflux), because the Crossbar client
runs in Crossbar's own virtualenv. Each peer script gives it:

* for pub/sub, ``connect_pair()`` -> (publish, subscribe): ``publish(payload)``
  sends one message to the bench topic without waiting (pipelined);
  ``subscribe(on_message)`` fires once the server has the subscription, and
  then ``on_message(payload)`` is called once per delivered message;
* for requests, ``call(payload)`` -> Deferred firing with the reply.

The shapes and sizes are those of ``pulsyflux bench rpc`` and ``pulsyflux
bench pubsub`` (see their module docs): 16-byte requests one at a time; 10
clients x 16 requests in flight; 1 MiB echoed one at a time; 100-byte messages
flooded 1 -> 1 and 1 -> 10 with the publisher at most ``window`` messages ahead
of the slowest subscriber (so nothing is dropped); 2,000 messages one at a time
for the publish -> receive latency.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Coroutine, Optional

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

STAMP = struct.Struct(">d")


@dataclass
class Settings:
    duration: float = 1.0  # seconds per measurement
    warmup: float = 0.3  # seconds of load before counting
    payload: int = 16  # bytes per request (pulsyflux bench rpc)
    consumers: int = 10  # request clients in flight
    inflight: int = 16  # requests in flight per client
    large: int = 1 << 20  # bytes per echo
    message: int = 100  # bytes per pub/sub message (pulsyflux bench pubsub)
    window: int = 2000  # messages the publisher may run ahead of the slowest subscriber
    latency_count: int = 2000  # messages one at a time for the latency
    server_pids: tuple[int, ...] = ()  # the server's processes, whose CPU time is read from /proc


def cpu_seconds(pids: tuple[int, ...]) -> float:
    """User + system CPU time of the processes (Linux /proc; 0 for one that is gone or elsewhere)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK
    return total


TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_us(settings: Settings, spent: float, count: int) -> Optional[float]:
    """The server's CPU microseconds per unit of work, or None if its processes are not known."""
    return spent / count * 1e6 if settings.server_pids and count else None


def settings_from_argv(argv: list[str]) -> tuple[Settings, list[str]]:
    """``--duration S``, ``--warmup S`` and ``--server-pids P,P`` out of ``argv``; the rest is the script's own."""
    settings, rest = Settings(), []
    items = iter(argv)
    for item in items:
        if item == "--duration":
            settings.duration = float(next(items))
        elif item == "--warmup":
            settings.warmup = float(next(items))
        elif item == "--server-pids":
            settings.server_pids = tuple(int(pid) for pid in next(items).split(",") if pid)
        else:
            rest.append(item)
    return settings, rest


def stamped(size: int) -> bytes:
    return STAMP.pack(time.perf_counter()) + b"x" * (size - STAMP.size)


def percentile(ordered: list[float], fraction: float) -> Optional[float]:
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else None


def sleep(reactor: Any, seconds: float) -> "Deferred[None]":
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


# -- requests --------------------------------------------------------------------

Call = Callable[[bytes], "Deferred[Any]"]


async def sequential(call: Call, size: int, duration: float) -> dict:
    """One request at a time for ``duration``: requests/s and p50 latency."""
    payload = b"x" * size
    samples = []
    perf_counter = time.perf_counter
    started = perf_counter()
    deadline = started + duration
    while True:
        t0 = perf_counter()
        reply = await call(payload)
        t1 = perf_counter()
        if len(reply) != size:
            raise RuntimeError(f"echo returned {len(reply)} bytes for {size}")
        samples.append(t1 - t0)
        if t1 >= deadline:
            break
    samples.sort()
    p50 = percentile(samples, 0.5)
    return {"per_s": len(samples) / (perf_counter() - started), "p50_us": p50 * 1e6 if p50 is not None else None}


async def in_flight(reactor: Any, calls: list[Call], settings: Settings) -> tuple[float, Optional[float]]:
    """Every call keeps ``settings.inflight`` requests outstanding: answers per second, server CPU µs per answer."""
    payload = b"x" * settings.payload
    state: dict[str, Any] = {"answered": 0, "outstanding": 0, "stopping": False, "error": None}
    drained: Deferred[None] = Deferred()

    def fire(call: Call) -> None:
        state["outstanding"] += 1
        call(payload).addCallbacks(answered, failed, callbackArgs=(call,), errbackArgs=(call,))

    def answered(_reply: Any, call: Call) -> None:
        state["outstanding"] -= 1
        state["answered"] += 1
        after(call)

    def failed(failure: Any, call: Call) -> None:
        state["outstanding"] -= 1
        state["error"] = state["error"] or failure.getErrorMessage()
        after(call)

    def after(call: Call) -> None:
        if not state["stopping"]:
            fire(call)
        elif state["outstanding"] == 0 and not drained.called:
            drained.callback(None)

    for call in calls:
        for _ in range(settings.inflight):
            fire(call)
    await sleep(reactor, settings.warmup)
    cpu0, count0, t0 = cpu_seconds(settings.server_pids), state["answered"], time.perf_counter()
    await sleep(reactor, settings.duration)
    cpu1, count1, t1 = cpu_seconds(settings.server_pids), state["answered"], time.perf_counter()
    state["stopping"] = True
    await drained
    if state["error"]:
        raise RuntimeError(f"a request failed: {state['error']}")
    return (count1 - count0) / (t1 - t0), cpu_us(settings, cpu1 - cpu0, count1 - count0)


async def requests(reactor: Any, calls: list[Call], settings: Settings) -> dict:
    """The three request rows: one at a time, in flight, 1 MiB echo."""
    first = calls[0]
    await sequential(first, settings.payload, settings.warmup)
    one = await sequential(first, settings.payload, settings.duration)
    rate, cpu = await in_flight(reactor, calls[: settings.consumers], settings)
    await sequential(first, settings.large, settings.warmup)
    echo = await sequential(first, settings.large, settings.duration)
    return {
        "sequential_per_s": one["per_s"],
        "sequential_p50_us": one["p50_us"],
        "inflight_per_s": rate,
        "inflight_server_cpu_us": cpu,
        "echo_mb_per_s": echo["per_s"] * settings.large / 1e6,
    }


# -- pub/sub ---------------------------------------------------------------------

Publish = Callable[[bytes], Any]
Subscribe = Callable[[Callable[[bytes], None]], "Deferred[Any]"]


async def latency(publish: Publish, subscribe: Subscribe, settings: Settings) -> float:
    """Publish -> receive p50 in microseconds, one message in flight at a time."""
    samples: list[float] = []
    waiting: list[Deferred[None]] = []
    perf_counter, unpack = time.perf_counter, STAMP.unpack_from

    def received(payload: bytes) -> None:
        samples.append(perf_counter() - unpack(payload)[0])
        if waiting:
            waiting.pop().callback(None)

    await subscribe(received)
    for _ in range(settings.latency_count):
        d: Deferred[None] = Deferred()
        waiting.append(d)
        publish(stamped(settings.message))
        await d
    samples.sort()
    return (percentile(samples, 0.5) or 0.0) * 1e6


async def flood(
    reactor: Any, publish: Publish, subscribes: list[Subscribe], settings: Settings
) -> tuple[float, Optional[float]]:
    """Deliveries per second summed over the subscribers, and the server's CPU µs per delivery;
    the publisher stays ``window`` messages ahead of the slowest subscriber."""
    received = [0] * len(subscribes)
    state: dict[str, Any] = {"published": 0, "stopping": False}
    message = b"x" * settings.message

    def top_up() -> None:
        if state["stopping"]:
            return
        limit = min(received) + settings.window
        published = state["published"]
        while published < limit:
            publish(message)
            published += 1
        state["published"] = published

    flowing: Deferred[None] = Deferred()  # every subscriber has had a message: the warm-up starts

    def reader(index: int) -> Callable[[bytes], None]:
        def on_message(payload: bytes) -> None:
            count = received[index] = received[index] + 1
            if count == 1 and not flowing.called and min(received):
                flowing.callback(None)
            if not count & 63:
                top_up()

        return on_message

    for index, subscribe in enumerate(subscribes):
        await subscribe(reader(index))
    top_up()
    flowing.addTimeout(30, reactor)  # a server that delivers nothing fails the run instead of hanging it
    await flowing
    await sleep(reactor, settings.warmup)
    cpu0, count0, t0 = cpu_seconds(settings.server_pids), sum(received), time.perf_counter()
    await sleep(reactor, settings.duration)
    cpu1, count1, t1 = cpu_seconds(settings.server_pids), sum(received), time.perf_counter()
    state["stopping"] = True
    return (count1 - count0) / (t1 - t0), cpu_us(settings, cpu1 - cpu0, count1 - count0)


Pair = Callable[[int], Awaitable[tuple[Publish, list[Subscribe], Callable[[], Any]]]]


async def pubsub(reactor: Any, pair: Pair, s: Settings) -> dict:
    """The three pub/sub rows.

    ``pair(n)`` connects a publisher and ``n`` subscribers (a connection each)
    to a fresh topic and returns ``(publish, subscribes, close)``.
    """
    publish, subs, close = await pair(1)
    result: dict[str, Optional[float]] = {"latency_p50_us": await latency(publish, subs[0], s)}
    await close()
    for n in (1, 10):
        publish, subs, close = await pair(n)
        result[f"flood_{n}_per_s"], result[f"flood_{n}_server_cpu_us"] = await flood(reactor, publish, subs, s)
        await close()
    return result


class Child(ProcessProtocol):
    """A helper process (a responder, a callee) whose first line of output says it is ready."""

    transport: Any  # a TCP (or process) transport, set before connectionMade

    def __init__(self) -> None:
        self.ready: Deferred[str] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self._out = b""
        self._err = b""

    def outReceived(self, data: bytes) -> None:
        self._out += data
        if not self.ready.called and b"\n" in self._out:
            self.ready.callback(self._out.partition(b"\n")[0].decode().strip())

    def errReceived(self, data: bytes) -> None:
        self._err = (self._err + data)[-2000:]

    def processEnded(self, reason: Any) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError("helper exited: " + self._err.decode(errors="replace").strip()))
        self.ended.callback(None)

    def stop(self) -> "Deferred[None]":
        try:
            self.transport.signalProcess("TERM")
        except Exception:
            pass  # already gone
        return self.ended


def spawn(reactor: Any, python: str, script: str, *args: str) -> Child:
    """``python script args...`` with this process's environment."""
    child = Child()
    reactor.spawnProcess(child, python, [python, script, *args], env=dict(os.environ))
    return child


def serve_child(reactor: Any, start: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """A helper process: run ``start`` once the reactor runs; if it fails, say why on stderr and stop."""
    from twisted.internet.defer import Deferred

    def failed(failure: Any) -> None:
        print(failure.getErrorMessage(), file=sys.stderr, flush=True)
        reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(start()).addErrback(failed))
    run_as_child(reactor)


def run_as_child(reactor: Any) -> None:
    """Run the reactor until stopped or until the parent is gone (a stopped benchmark leaves nothing)."""
    from twisted.internet.task import LoopingCall

    parent = os.getppid()

    def check() -> None:
        if os.getppid() != parent:
            reactor.stop()

    LoopingCall(check).start(0.5, now=False)
    reactor.run()


def report(result: dict) -> None:
    """The one line a peer script prints: its numbers as JSON, read by run.py."""
    print(json.dumps(result), flush=True)


def main(reactor: Any, body: Callable[[], Awaitable[dict]]) -> int:
    """Run ``body`` on the reactor, print its result line, exit non-zero (with the reason) on failure."""
    outcome: dict = {}

    async def wrapped() -> None:
        try:
            outcome["result"] = await body()
        except BaseException as error:  # reported on stderr, read by run.py
            outcome["error"] = f"{type(error).__name__}: {error}"
        finally:
            reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(wrapped()))
    reactor.run()
    if "result" in outcome:
        report(outcome["result"])
        return 0
    print(outcome.get("error", "the measurement did not finish"), file=sys.stderr)
    return 1
