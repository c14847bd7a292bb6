"""Measure broker throughput and latency, server + broker in a child process.

    python benchmarks/pubsub.py --runs 3
    python benchmarks/pubsub.py --fanouts 1,10 --json results.json

The same measurement as ``pulsyflux bench pubsub``; see docs/broker.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from pulsyflux.bench import pubsub


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Delivered messages/s (1->1, 1->10) and publish->receive latency through a pulsyflux broker "
        "running with its server in its own process.",
    )
    pubsub.add_arguments(parser)
    parser.add_argument("--json", metavar="FILE", help="also write every run's numbers to FILE ('-' for stdout)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    progress = None if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    results = pubsub.run(pubsub.options_from_args(args), progress)
    print(pubsub.format_report(results))
    if args.json == "-":
        json.dump(results, sys.stdout, indent=2)
        print()
    elif args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
