"""The ``pulsyflux`` command: talk to a running server from a shell.

    $ pulsyflux request 6f1c...-... 'hello' --timeout 2
    $ pulsyflux sub orders --count 1 --json

One idea per module: ``runner`` (a command on the reactor, failures as one
line), ``arguments`` (argument types), ``commands`` (the subcommands),
``stats`` (the stats formatter), ``progress`` (the bench progress bar),
``parser`` (the argument parser) and ``program`` (``main``, ``run_command``).
The names below are imported on first use (PEP 562).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:  # the names for type checkers and IDEs; at run time, __getattr__
    from .parser import build_parser
    from .program import main, run_command
    from .runner import CLIError

__all__ = ["main", "run_command", "build_parser", "CLIError"]

# Submodule -> the public names it defines.
__getattr__, __dir__ = lazy_exports(
    __name__, {"program": "main run_command", "parser": "build_parser", "runner": "CLIError"}
)
