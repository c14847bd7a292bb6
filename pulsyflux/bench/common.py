"""What every benchmark shares: its child processes, CPU readings, medians, and its front ends.

A benchmark module (:mod:`pulsyflux.bench.rpc`, :mod:`pulsyflux.bench.pubsub`)
provides ``Options``, ``add_arguments``, ``options_from_args``, ``measure``,
``run`` and ``format_report``; the pieces that are the same for all of them
live here so each module holds only its own measurement::

    child = spawn(reactor, sys.executable, "router", "pulsyflux.bench.rpc", "server")
    port = int(await child.ready)

A script in ``benchmarks/`` is then one call::

    sys.exit(script_main(rpc, "What rpc measures."))
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from dataclasses import asdict
from types import ModuleType
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Coroutine, Optional, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from ..endpoints import port_number

if TYPE_CHECKING:
    from .._types import IReactor
    from ..auth.tokens import Authority
    from ..broker import Broker
    from ..service import BrokerService


__all__ = [
    "verdict",
    "runs_text",
    "Progress",
    "Child",
    "spawn",
    "run_as_child",
    "cpu_seconds",
    "cpu_per",
    "last_cpu",
    "place",
    "CPU_PLACEMENTS",
    "repeat",
    "results",
    "serve_broker",
    "add_run_arguments",
    "run_options",
    "waiting_seconds",
    "percentile",
    "median",
    "sleep",
    "machine",
    "public_options",
    "start",
    "run_blocking",
    "entry_points",
    "failures",
    "fmt",
    "script_main",
    "verdict",
    "runs_text",
]

Progress = Callable[[str], None]
_O = TypeVar("_O")  # a kind's Options


# -- child processes -------------------------------------------------------------


class Child(ProcessProtocol):
    """A child process whose first line of output says it is ready (usually its port)."""

    transport: IProcessTransport  # set before connectionMade, as for any ProcessProtocol

    def __init__(self, name: str) -> None:
        self.name = name
        self.ready: Deferred[str] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self._out = b""
        self._err = b""

    def outReceived(self, data: bytes) -> None:
        self._out += data
        if not self.ready.called and b"\n" in self._out:
            line, _, self._out = self._out.partition(b"\n")
            self.ready.callback(line.decode().strip())

    def errReceived(self, data: bytes) -> None:
        self._err = (self._err + data)[-4000:]

    def processEnded(self, reason: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(
                RuntimeError(f"{self.name} exited before it was ready:\n{self._err.decode(errors='replace')}")
            )
        self.ended.callback(None)

    @property
    def pid(self) -> int:
        return self.transport.pid

    def stop(self) -> "Deferred[None]":
        try:
            self.transport.signalProcess("TERM")
        except Exception:
            pass  # already gone
        return self.ended


def spawn(reactor: IReactor, python: str, name: str, module: str, *args: str) -> Child:
    """Start ``python -m module args...`` with this process's environment."""
    child = Child(name)
    argv = [python, "-m", module, *args]
    reactor.spawnProcess(child, python, argv, env=dict(os.environ))
    return child


def run_as_child(reactor: IReactor) -> None:
    """Run the reactor until stopped, or until the benchmark that started this process is gone.

    A benchmark stopped with Ctrl-C never gets to stop its children; they
    notice that their parent changed and exit instead of lingering.
    """
    from twisted.internet.task import LoopingCall

    parent = os.getppid()

    def check_parent() -> None:
        if os.getppid() != parent:
            reactor.stop()

    LoopingCall(check_parent).start(0.5, now=False)
    reactor.run()


# -- readings and statistics -----------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def last_cpu(pid: int) -> Optional[int]:
    """The CPU a process runs on, or last ran on while it sleeps (Linux /proc; None elsewhere).

    Whether two processes that take turns share one CPU decides a one-at-a-time
    latency: on one CPU it is the two processes' work added up, on two it is
    mostly the wake-ups between them.
    """
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rpartition(")")[2].split()[36])
    except (OSError, IndexError, ValueError):
        return None


CPU_PLACEMENTS = ("any", "one", "two")


def place(placement: str, here: int, children: list[int]) -> Optional[set[int]]:
    """Pin the bench (``here``) and its server ``children`` as ``placement`` says; returns what to restore.

    ``any``: the kernel decides (nothing pinned, None returned); ``one``: all on
    the first CPU this process may use; ``two``: the bench there and the
    children on the next one. Linux only (``os.sched_setaffinity``).
    """
    if placement == "any":
        return None
    if placement not in CPU_PLACEMENTS:
        raise ValueError(f"unknown CPU placement {placement!r}: choose from {', '.join(CPU_PLACEMENTS)}")
    if not hasattr(os, "sched_setaffinity"):
        raise RuntimeError("--cpus one or two pins processes to CPUs, which needs Linux (os.sched_setaffinity)")
    allowed = os.sched_getaffinity(here)
    cpus = sorted(allowed)
    if placement == "two" and len(cpus) < 2:
        raise RuntimeError("--cpus two needs two CPUs, and this process may use one")
    first, other = cpus[0], cpus[1] if placement == "two" else cpus[0]
    os.sched_setaffinity(here, {first})
    for pid in children:
        os.sched_setaffinity(pid, {other})
    return allowed


def cpu_per(pids: dict[str, int], before: dict[str, float], count: int) -> dict[str, float]:
    """Microseconds of CPU each process spent per unit of work since ``before`` (``{name: cpu_seconds}``)."""
    return {name: (cpu_seconds(pids[name]) - spent) / max(1, count) * 1e6 for name, spent in before.items()}


def waiting_seconds(pid: int) -> float:
    """Time a process was runnable but waiting for a CPU (Linux schedstat; 0 elsewhere).

    On a shared machine this says how much of a measurement was lost to other work.
    """
    try:
        with open(f"/proc/{pid}/schedstat") as stat:
            return int(stat.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def percentile(ordered: list[float], fraction: float) -> float:
    """The sample at ``fraction`` of the sorted ``ordered`` (NaN if there is none)."""
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def median(runs: list[dict], *path: str) -> Optional[float]:
    """The median over runs of the number at ``path`` in each; None if no run has one."""
    values = []
    for run_result in runs:
        value: Any = run_result
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            values.append(value)
    return statistics.median(values) if values else None


def sleep(reactor: IReactor, seconds: float) -> "Deferred[None]":
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def machine() -> dict:
    """What the results were measured on."""
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def public_options(options: Any) -> dict:
    """The options as the results report them (the interpreter path left out)."""
    return {k: v for k, v in asdict(options).items() if k != "python"}


# -- running ---------------------------------------------------------------------

Measure = Callable[[Any, Any, Progress], Coroutine[Any, Any, dict]]


def start(measure: Measure, reactor: IReactor, options: Any, progress: Optional[Progress]) -> "Deferred[dict]":
    """Run the coroutine function ``measure`` on a running reactor; fires with its results."""
    return Deferred.fromCoroutine(measure(reactor, options, progress or (lambda message: None)))


def run_blocking(
    measure: Callable[[Any, Any, Optional[Progress]], "Deferred[dict]"], options: Any, progress: Optional[Progress]
) -> dict:
    """Run ``measure(reactor, options, progress)`` to completion on the global reactor (once per process)."""
    from twisted.internet import reactor

    outcome: dict = {}

    def finish(result: object) -> None:
        outcome["result"] = result
        reactor.stop()

    reactor.callWhenRunning(lambda: measure(reactor, options, progress).addBoth(finish))
    reactor.run()
    result = outcome.get("result")
    if result is None:
        raise RuntimeError("the benchmark did not finish")
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


def entry_points(
    measure: Callable[[IReactor, _O, Progress], Coroutine[Any, Any, dict]], defaults: Callable[[], _O]
) -> tuple[Callable[..., "Deferred[dict]"], Callable[..., dict]]:
    """A benchmark kind's ``measure`` and ``run``, from its coroutine function ``measure``.

    ``measure(reactor, options, progress=None)`` runs it on a running reactor
    and fires with the results dict; ``run(options=None, progress=None)`` runs
    it to completion on the global reactor (once per process), with
    ``defaults()`` for options. Every kind has both: written once, here.
    """

    def measure_on(reactor: IReactor, options: _O, progress: Optional[Progress] = None) -> "Deferred[dict]":
        """Run the benchmark on a running reactor; fires with the results dict."""
        return start(measure, reactor, options, progress)

    def run(options: Optional[_O] = None, progress: Optional[Progress] = None) -> dict:
        """Run the benchmark to completion on the global reactor (once per process)."""
        return run_blocking(measure_on, options if options is not None else defaults(), progress)

    return measure_on, run


def failures(results: dict) -> int:
    """Failed requests (rpc) or failed publishes (pubsub) in a benchmark's results."""
    return results.get("failed_requests") or results.get("failed") or 0


# -- reporting -------------------------------------------------------------------


def fmt(value: Optional[float], spec: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, spec)


def verdict(value: Optional[float], target: float, at_least: bool = True, unit: str = "") -> str:
    """A measurement against its target, said plainly: ``meets target >= 25,000`` or ``MISSES ...``."""
    if value is None:
        return "not measured"
    good = value >= target if at_least else value <= target
    return ("meets" if good else "MISSES") + f" target {'>=' if at_least else '<='} {target:,}{unit}"


def runs_text(count: int) -> str:
    """``1 run`` / ``3 runs, medians``: how many runs a report's numbers come from."""
    return "1 run" if count == 1 else f"{count} runs, medians"


def script_main(
    module: ModuleType, description: str, argv: Optional[list[str]] = None, prog: Optional[str] = None
) -> int:
    """The command line of a benchmark script: the module's options, ``--json FILE`` and ``--quiet``.

    Prints the report; the exit status is 1 if any request or publish failed.

        sys.exit(script_main(pulsyflux.bench.rpc, "Request/response speed."))
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    module.add_arguments(parser)
    parser.add_argument("--json", metavar="FILE", help="also write every run's numbers to FILE ('-' for stdout)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    progress = None if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    results = module.run(module.options_from_args(args), progress)
    print(module.format_report(results))
    if args.json == "-":
        json.dump(results, sys.stdout, indent=2)
        print()
    elif args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    return 1 if failures(results) else 0


# -- options every benchmark takes ---------------------------------------------------


def add_run_arguments(parser: argparse.ArgumentParser, defaults: Any, measurement: str = "measurement") -> None:
    """``--runs``, ``--duration`` and ``--warmup``, with the benchmark's defaults (its ``Options()``)."""
    d = defaults
    parser.add_argument("--runs", type=int, default=d.runs, help=f"repetitions, medians reported (default {d.runs})")
    parser.add_argument(
        "--duration", type=float, default=d.duration, help=f"seconds per {measurement} (default {d.duration})"
    )
    parser.add_argument("--warmup", type=float, default=d.warmup, help=f"seconds before counting (default {d.warmup})")


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """What :func:`add_run_arguments` parsed, as ``Options`` keywords."""
    return {"runs": max(1, args.runs), "duration": args.duration, "warmup": args.warmup}


# -- what the benchmarks share about running -----------------------------------------


async def repeat(
    options: Any, progress: Progress, once: Callable[[Any], Awaitable[dict]], one_line: Callable[[dict], str]
) -> list[dict]:
    """``options.runs`` measurements by ``once(options)``, each reported on one line as it ends."""
    runs = []
    for number in range(1, options.runs + 1):
        progress(f"run {number}/{options.runs}")
        result = await once(options)
        runs.append(result)
        progress(one_line(result))
    return runs


def results(options: Any, runs: list[dict], medians: dict[str, Any], **rest: Any) -> dict:
    """The results document every benchmark returns: options, machine, medians, runs, then ``rest`` in order."""
    return {"options": public_options(options), "machine": machine(), "medians": medians, "runs": runs, **rest}


def serve_broker(
    reactor: IReactor, service: BrokerService, then: Callable[[Broker], object] = lambda result: result
) -> None:
    """A child process: run ``service`` (a BrokerService on port 0), print its port once ready and ``then``
    fired (the parent reads it), or print why not and stop."""

    def ready(port: IListeningPort) -> None:
        print(port_number(port), flush=True)

    def failed(failure: Failure) -> None:
        print(failure.getErrorMessage(), file=sys.stderr, flush=True)
        reactor.stop()

    def begin() -> None:
        service.startService()
        ready_port = service.whenReady().addCallback(then).addCallback(lambda _: service.server.whenListening())
        ready_port.addCallbacks(ready, failed)

    reactor.callWhenRunning(begin)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    run_as_child(reactor)


AUTH_SECRET_ENV = "PULSYFLUX_BENCH_AUTH_SECRET"  # --auth: the HS256 secret the parent gives its children


def use_auth_secret() -> None:
    """--auth: a fresh secret in the environment, which spawn() passes on to the children."""
    os.environ[AUTH_SECRET_ENV] = os.urandom(32).hex()


def bench_authority() -> Authority:
    """The server child's token checks under --auth: the parent's secret, no anonymous rights."""
    from pulsyflux.auth.grants import Grants
    from pulsyflux.auth.tokens import Authority, Key

    return Authority([Key.hs256("bench", os.environ[AUTH_SECRET_ENV])], Grants.none())


def bench_token(grants: dict[str, list[str]]) -> str:
    """A day's token with ``grants``, signed with the secret in the environment."""
    from pulsyflux.auth.tokens import Key, mint

    return mint(Key.hs256("bench", os.environ[AUTH_SECRET_ENV]), grants, 24 * 3600, subject="bench")
