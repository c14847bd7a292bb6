"""Tokens and grants: who may provide, consume, publish and subscribe (docs/security.md).

Twisted-free: :mod:`.grants` (patterns and the rights they give),
:mod:`.tokens` (verifying and minting JWTs with PyJWT) and :mod:`.config`
(the ``--auth FILE`` format). Names are imported on first use (PEP 562), so
``import pulsyflux.auth.grants`` loads neither PyJWT nor Twisted.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import AuthConfigError, load_auth_file
    from .grants import GrantError, Grants
    from .tokens import Authority, Identity, TokenError, mint

_LAZY = {
    "AuthConfigError": "config",
    "load_auth_file": "config",
    "Grants": "grants",
    "GrantError": "grants",
    "Authority": "tokens",
    "Identity": "tokens",
    "TokenError": "tokens",
    "mint": "tokens",
}

__all__ = [
    "AuthConfigError",
    "Authority",
    "GrantError",
    "Grants",
    "Identity",
    "TokenError",
    "load_auth_file",
    "mint",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
