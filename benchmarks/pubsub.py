"""Measure broker throughput and latency, server + broker in a child process.

    python benchmarks/pubsub.py --runs 3
    python benchmarks/pubsub.py --fanouts 1,10 --json results.json

The same measurement as ``pulsyflux bench pubsub``; see docs/broker.md.
"""

from __future__ import annotations

import sys

from pulsyflux.bench import pubsub
from pulsyflux.bench.common import script_main

DESCRIPTION = (
    "Delivered messages/s (1->1, 1->10) and publish->receive latency through a pulsyflux broker "
    "running with its server in its own process."
)


def main(argv: list[str] | None = None) -> int:
    return script_main(pubsub, DESCRIPTION, argv)


if __name__ == "__main__":
    sys.exit(main())
