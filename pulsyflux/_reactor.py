"""The reactor a class runs on when its caller names none."""

from __future__ import annotations

from typing import Any

__all__ = ["default_reactor"]


def default_reactor(reactor: Any = None) -> Any:
    """``reactor``, or Twisted's global reactor when it is None.

    The global one is imported only then: importing it installs it, which a
    caller that passes its own (a test's ``Clock``, a ``MemoryReactorClock``)
    must not pay for, nor have done behind its back.
    """
    if reactor is None:
        from twisted.internet import reactor as installed

        return installed
    return reactor
