"""``main`` (the console script and ``python -m pulsyflux``) and ``run_command`` (the same in a running reactor)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Optional, Sequence

from twisted.python.failure import Failure

from .parser import parse_args
from .runner import EXIT_ERROR, report, run

if TYPE_CHECKING:
    from .._types import IReactor

__all__ = ["main", "run_command"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``pulsyflux`` console script and ``python -m pulsyflux``."""
    args = parse_args(argv)
    if isinstance(args, int):
        return args
    return run(args.func, args)


async def run_command(reactor: IReactor, argv: Sequence[str]) -> int:
    """Run one command on a reactor that is already running; return its exit status.

    ``main`` without the process around it: the same parsing, output on
    ``sys.stdout``/``sys.stderr`` and one-line errors, but no ``reactor.run``
    and no signal handling (Ctrl-C is the process's). For tests and for
    programs that embed the commands; a usage error returns 2 instead of exiting.
    """
    try:
        args = parse_args(argv)
    except SystemExit as exited:
        return exited.code if isinstance(exited.code, int) else EXIT_ERROR if exited.code else 0
    if isinstance(args, int):
        return args
    try:
        result = await args.func(reactor, args)
    except Exception:
        return report(Failure(), args)
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
