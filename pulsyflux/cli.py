"""The ``pulsyflux`` command (placeholder until the CLI lands)."""

import sys


def main(argv=None) -> int:
    print("pulsyflux: no commands yet", file=sys.stderr)
    return 2
