"""Measure pulsyflux request/response speed against a bare Twisted relay.

    python benchmarks/rpc.py --runs 5
    python benchmarks/rpc.py --json results.json

The same measurement as ``pulsyflux bench rpc``; see docs/performance.md.
"""

from __future__ import annotations

import sys

from pulsyflux.bench import rpc
from pulsyflux.bench.common import script_main

DESCRIPTION = (
    "Sequential, in-flight and 1 MiB echo speed of a pulsyflux router in its own process, "
    "with a bare Twisted byte relay (same hops) as the baseline."
)


def main(argv: list[str] | None = None) -> int:
    return script_main(rpc, DESCRIPTION, argv)


if __name__ == "__main__":
    sys.exit(main())
