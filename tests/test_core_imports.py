"""The sans-I/O core imports and works with Twisted made unimportable.

``pulsyflux/__init__.py`` and the package ``__init__``s import their public
names lazily (PEP 562), so ``import pulsyflux.wire.codec`` runs no server,
client or reactor code. The check
runs in a fresh interpreter whose import system refuses ``twisted`` and
``zope``, which is what "Twisted not installed" looks like to the code.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
import types

import pytest

CORE = ("codec", "messages", "errors", "printable", "ratelimit", "deadlines")

_BLOCK = """
import sys

class _NoTwisted:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("twisted", "zope"):
            raise ImportError(f"blocked for this test: {name}")
        return None

for _name in list(sys.modules):
    if _name.split(".")[0] in ("twisted", "zope"):
        del sys.modules[_name]
sys.meta_path.insert(0, _NoTwisted())
"""


def _run(body: str) -> subprocess.CompletedProcess[str]:
    code = _BLOCK + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_blocker_really_blocks_twisted() -> None:
    # The harness itself: without this, the test below could pass vacuously.
    done = _run("""
        try:
            import twisted.internet
        except ImportError:
            print("blocked")
        try:
            import pulsyflux.server.router
        except ImportError:
            print("server needs twisted")
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["blocked", "server", "needs", "twisted"]


def test_sans_io_core_imports_and_works_without_twisted() -> None:
    done = _run(f"""
        import pulsyflux
        from pulsyflux.wire import {", ".join(CORE)}
        from pulsyflux.broker import subjects  # the broker's matcher: Twisted-free in a package that is not
        from pulsyflux.broker import history
        from pulsyflux import Message, MessageError, PulsyfluxError  # the lazy names from the core

        rid = bytes(range(16))
        frame = codec.encode_frame(codec.RESPONSE, rid, b"hello")
        decoded = list(codec.FrameDecoder().feed(frame))
        assert decoded == [codec.Frame(codec.RESPONSE, 0, rid, b"hello")], decoded

        body = messages.encode("news", b"\\x00payload", {{"k": "v"}})
        assert messages.decode(body) == Message("news", b"\\x00payload", {{"k": "v"}})
        assert issubclass(MessageError, PulsyfluxError)
        assert printable.printable("a\\x00b") != "a\\x00b"
        index = subjects.Sublist()
        index.add("news.*", "sub")
        assert index.match("news.eu") == ["sub"], index.match("news.eu")
        from pulsyflux.auth import Authority, Grants, mint
        from pulsyflux.auth.tokens import Key
        key = Key.hs256("k", "s" * 32)
        assert Authority([key]).verify(mint(key, {{"publish": ["a.>"]}}, 60)).grants.may_publish("a.b")
        assert history.History(1).append("news", body.decode())[0].seq == 1

        from pulsyflux.cluster import shape, url  # how pub/sub is laid out on Redis, and where Redis is
        assert shape.channel_of("pulsyflux:", "orders.eu") == b"pulsyflux:m:orders"
        assert url.parse_redis_url("redis://h:1/2").db == 2

        loaded = sorted(n for n in sys.modules if n.split(".")[0] in ("twisted", "zope"))
        assert not loaded, loaded
        print("ok")
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


PACKAGES = (
    "pulsyflux",
    "pulsyflux.server",
    "pulsyflux.broker",
    "pulsyflux.auth",
    "pulsyflux.cli",
    "pulsyflux.http",
    "pulsyflux.client",
    "pulsyflux.cluster",
)


def test_packages_import_without_twisted() -> None:
    # A package __init__ re-exports lazily: importing it (on the way to a Twisted-free
    # submodule of its own) must not import Twisted.
    done = _run(f"""
        import importlib
        for name in {PACKAGES!r}:
            importlib.import_module(name)
        loaded = sorted(n for n in sys.modules if n.split(".")[0] in ("twisted", "zope"))
        assert not loaded, loaded
        print("ok")
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.parametrize("package", PACKAGES)
def test_lazy_public_names_match_all(package: str) -> None:
    # Every name in __all__ resolves, dir() lists it, and an unknown name is still an AttributeError.
    module = importlib.import_module(package)
    for name in module.__all__:
        value = getattr(module, name)
        if isinstance(value, (type, types.FunctionType)) and "<locals>" not in value.__qualname__:
            assert value.__name__ == name  # (not constants, type aliases, nor a made function: DEFAULT_BACKOFF)
    assert set(module.__all__) <= set(dir(module))
    try:
        module.NoSuchThing  # noqa: B018
    except AttributeError as e:
        assert "NoSuchThing" in str(e)
    else:
        raise AssertionError(f"{package}.NoSuchThing resolved")
