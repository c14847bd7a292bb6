"""Measure what the server sustains, loaded from several client processes.

    python benchmarks/capacity.py --runs 3
    python benchmarks/capacity.py --server-python /path/to/pypy-venv/bin/python --json pypy.json

The same measurement as ``pulsyflux bench capacity``; see docs/performance.md.
"""

from __future__ import annotations

import sys

from pulsyflux.bench import capacity
from pulsyflux.bench.common import script_main

DESCRIPTION = (
    "Messages and deliveries per second a pulsyflux server sustains with 1 to 10,000 subscribers and "
    "several message sizes, its CPU per message and per delivery, and its idle memory per connection "
    "and per subscription; the load comes from separate publisher and subscriber processes."
)


def main(argv: list[str] | None = None) -> int:
    return script_main(capacity, DESCRIPTION, argv)


if __name__ == "__main__":
    sys.exit(main())
