"""The reactor a class runs on when its caller names none."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, TypeVar, overload

if TYPE_CHECKING:
    from ._types import IReactor

__all__ = ["default_reactor"]

_R = TypeVar("_R")


@overload
def default_reactor(reactor: None = None) -> IReactor: ...


@overload
def default_reactor(reactor: _R) -> _R: ...


def default_reactor(reactor: Optional[_R] = None) -> _R | IReactor:
    """``reactor``, or Twisted's global reactor when it is None.

    The global one is imported only then: importing it installs it, which a
    caller that passes its own (a test's ``Clock``, a ``MemoryReactorClock``)
    must not pay for, nor have done behind its back.
    """
    if reactor is None:
        from twisted.internet import reactor as installed

        return installed
    return reactor
