"""Measure pulsyflux request/response speed against a bare Twisted relay.

    python benchmarks/rpc.py --runs 5
    python benchmarks/rpc.py --json results.json

The same measurement as ``pulsyflux bench rpc``; see docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from pulsyflux.bench import rpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Sequential, in-flight and 1 MiB echo speed of a pulsyflux router in its own process, "
        "with a bare Twisted byte relay (same hops) as the baseline.",
    )
    rpc.add_arguments(parser)
    parser.add_argument("--json", metavar="FILE", help="also write every run's numbers to FILE ('-' for stdout)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    progress = None if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    results = rpc.run(rpc.options_from_args(args), progress)
    print(rpc.format_report(results))
    if args.json == "-":
        json.dump(results, sys.stdout, indent=2)
        print()
    elif args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    return 1 if results["failed_requests"] else 0


if __name__ == "__main__":
    sys.exit(main())
