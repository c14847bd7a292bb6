"""Publish cost against the number of wildcard subscriptions (issue 11): it must stay flat.

The broker's fan-out (``Fanout.handle``: decode, topic rule, matching,
backlog, forward) in one process, with N subscriptions whose forwarding
lines answer at once (no sockets: what changes with N is the matching, so
that is what is left to measure). Only one subscription matches each
publish; the others are patterns of three shapes (``orders.*.pI``,
``sI.>``, ``*.xI.*``), so the trie is wide at three levels. ``plain``
is the same with N plain topics, for comparison.

    python benchmarks/subjects.py                       # N = 10, 100, 1000, 10000; medians of 3
    python benchmarks/subjects.py --counts 10,10000 --runs 5

Reports CPU microseconds per publish (process time, so a busy machine
changes it less than wall time) and each N's cost as a ratio of N = 10's.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from pulsyflux.broker.fanout import Fanout
from pulsyflux.broker.outlet import Outlet
from pulsyflux.wire import messages


class _Line:
    """Stands in for a forwarding Consumer: every forward is accepted at once."""

    reconnecting = False
    connected = True

    def __init__(self) -> None:
        self.channel_id = uuid.uuid4().bytes
        self.sent = 0

    def send(self, body: bytes, timeout: float = 0) -> Any:
        self.sent += 1
        return succeed(b"ok")


def _fanout() -> Fanout:
    return Fanout(
        None,
        Clock(),
        backlog=10_000,
        batch=256,
        window=4,
        reconnect=False,
        rejoin_patience=10.0,
        backlog_bytes=8 << 20,
        total_backlog_bytes=256 << 20,
        max_subscriptions=100_000,
        max_setups=64,
        max_setups_per_client=8,
    )


def _subscribe(fanout: Fanout, pattern: str) -> _Line:
    line = _Line()
    outlet = Outlet(fanout, pattern, line, None, fanout.backlog, fanout.backlog_bytes, pattern)  # type: ignore[arg-type]
    fanout.enlist(outlet)
    fanout.outlets[uuid.UUID(bytes=line.channel_id)] = outlet
    return line


def _patterns(count: int, kind: str) -> list[str]:
    if kind == "plain":
        return [f"t{i}" for i in range(count)]
    shapes = ("orders.*.p{}", "s{}.>", "*.x{}.*")
    return [shapes[i % 3].format(i) for i in range(count)]


def measure(count: int, kind: str, publishes: int) -> float:
    """CPU microseconds per publish with ``count`` subscriptions of ``kind``, one of them matching."""
    fanout = _fanout()
    for pattern in _patterns(count - 1, kind):
        _subscribe(fanout, pattern)
    topic = "t-match" if kind == "plain" else "orders.eu.paris"
    target = _subscribe(fanout, topic if kind == "plain" else "orders.*.paris")
    body = messages.encode(topic, b"x" * 100)
    handle = fanout.handle
    for _ in range(1000):  # warm up
        handle(body)
    start = time.process_time()
    for _ in range(publishes):
        handle(body)
    spent = time.process_time() - start
    assert fanout.delivered == publishes + 1000 and target.sent, "the matching subscription got every message"
    return spent / publishes * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="10,100,1000,10000", help="subscription counts (default 10,...,10000)")
    parser.add_argument("--publishes", type=int, default=20_000, help="publishes per measurement (default 20000)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions, medians reported (default 3)")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.counts.split(",")]
    results: dict[str, dict[int, list[float]]] = {"plain": {}, "wildcard": {}}
    for _ in range(args.runs):
        for count in counts:  # interleaved: each run sees the same machine for every N
            for kind in results:
                results[kind].setdefault(count, []).append(measure(count, kind, args.publishes))
    print(f"fan-out CPU us per publish (medians of {args.runs}; one of N subscriptions matches)")
    for kind, by_count in results.items():
        base = statistics.median(by_count[counts[0]])
        cells = []
        for count in counts:
            value = statistics.median(by_count[count])
            cells.append(f"N={count}: {value:.2f} us ({value / base:.2f}x)")
        print(f"  {kind:<9} " + "   ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
