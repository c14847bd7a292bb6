"""Lazy re-exports for package ``__init__`` modules (PEP 562).

A package names its public objects per submodule and imports a submodule
only when one of its names is first asked for. That keeps ``import
pulsyflux.wire.codec`` (or any other Twisted-free module) from importing
the server, the clients and the reactor through a package ``__init__`` on
the way.

    __getattr__, __dir__ = lazy_exports(__name__, {"router": "Router Peer", "protocol": "ServerFactory"})
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping

__all__ = ["lazy_exports"]


def lazy_exports(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``; ``names``: submodule -> its public names, space-separated.

    A name is imported from ``package.<submodule>`` on first use and then
    stored in the package, so later lookups are plain module attributes.
    """
    home = {name: module for module, listed in names.items() for name in listed.split()}

    def __getattr__(name: str) -> Any:
        module = home.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(home))

    return __getattr__, __dir__
