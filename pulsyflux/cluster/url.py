"""Where the cluster's Redis is: ``redis://`` and ``rediss://`` URLs (Twisted-free, no hiredis needed)."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Optional

__all__ = ["RedisAddress", "RedisError", "parse_redis_url"]


class RedisError(Exception):
    """Redis answered a command with an error (``-ERR ...``), or the URL is wrong."""


@dataclass(frozen=True)
class RedisAddress:
    """Where Redis is, from a ``redis://`` or ``rediss://`` URL."""

    host: str
    port: int = 6379
    db: int = 0
    username: Optional[str] = None
    password: Optional[str] = None
    tls: bool = False

    def __str__(self) -> str:
        """The URL without its password: safe to log and to show in /stats."""
        scheme = "rediss" if self.tls else "redis"
        user = f"{self.username}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{user}{host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """``redis://[[user]:password@]host[:port][/db]``, or ``rediss://`` for TLS."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise RedisError(f"not a Redis URL (want redis://HOST:PORT[/DB] or rediss://...): {url[:100]!r}")
    try:
        port = parts.port or 6379
    except ValueError:
        raise RedisError(f"bad port in Redis URL {url[:100]!r}") from None
    if not parts.hostname:
        raise RedisError(f"no host in Redis URL {url[:100]!r}")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise RedisError(f"the database in a Redis URL is a number: {path[:20]!r}")
    return RedisAddress(
        host=parts.hostname,
        port=port,
        db=int(path or 0),
        username=urllib.parse.unquote(parts.username) if parts.username else None,
        password=urllib.parse.unquote(parts.password) if parts.password is not None else None,
        tls=parts.scheme == "rediss",
    )
