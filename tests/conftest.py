"""Shared fixtures: a real pulsyflux server on 127.0.0.1 with an ephemeral port, or one in memory."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Optional

import pytest
import pytest_twisted

from pulsyflux.testing import MemoryServer, start_server

from . import wheel_build
from .wheel_build import WheelBuild

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
# A copy of shared/wire-vectors.txt (frames captured from the Go implementation),
# kept in the repo so golden tests run wherever the suite does.
WIRE_VECTORS = Path(__file__).resolve().parent / "data" / "wire-vectors.txt"


_wheel_build: Optional[WheelBuild] = None  # where this process builds the wheel's virtualenv (wheel_build.py)


@pytest.hookimpl(trylast=True)  # after pytest-xdist's: it registers "dsession" where it distributes
def pytest_configure(config):
    """Under pytest-xdist the controller builds (its workers each collect every test)."""
    global _wheel_build
    if config.pluginmanager.hasplugin("dsession"):
        _wheel_build = WheelBuild()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    if _wheel_build is not None:
        node.workerinput["pulsyflux_wheel_build"] = str(_wheel_build.root)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    if _wheel_build is not None:
        _wheel_build.start(ids)


def pytest_collection_finish(session):
    """Start building the wheel's virtualenv now, in a thread, if test_install runs (not in a worker)."""
    global _wheel_build
    if _wheel_build is None and not hasattr(session.config, "workerinput"):
        _wheel_build = WheelBuild()
        _wheel_build.start(item.nodeid for item in session.items)


def pytest_sessionfinish(session):
    global _wheel_build
    if _wheel_build is not None:
        _wheel_build.finish()
        _wheel_build = None


def _built(config, part: str) -> Optional[dict]:
    """The part of the build made beside the tests; None if it was not (test_install selected later)."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        root = workerinput.get("pulsyflux_wheel_build")
        return wheel_build.result(Path(root), part) if root else None
    return wheel_build.result(_wheel_build.root, part) if _wheel_build is not None else None


@pytest.fixture(scope="session")
def _wheel(request, tmp_path_factory):
    """``(root, bindir)``: where the wheel was built, and its virtualenv's bin directory."""
    built = _built(request.config, "wheel")
    if built is not None:
        return Path(built["root"]), Path(built["bin"])
    from .twistd_process import build_wheel_venv

    root = tmp_path_factory.mktemp("wheel")
    return root, build_wheel_venv(root)


@pytest.fixture(scope="session")
def wheel_bin(_wheel):
    """The bin directory of a fresh virtualenv with the project's wheel installed (see twistd_process)."""
    return _wheel[1]


@pytest.fixture(scope="session")
def dists(_wheel):
    """``(sdist, wheel)``: the files ``wheel_bin`` was made from (the wheel was built from the sdist)."""
    dist = _wheel[0] / "dist"
    [sdist] = dist.glob("pulsyflux-*.tar.gz")
    [wheel] = dist.glob("pulsyflux-*.whl")
    return sdist, wheel


@pytest.fixture(scope="session")
def readme_installs(request, _wheel):
    """A :class:`~tests.twistd_process.ReadmeInstalls`: made beside the other tests when test_install runs."""
    from .twistd_process import ReadmeInstalls

    built = _built(request.config, "readme")
    return ReadmeInstalls(**built) if built is not None else ReadmeInstalls.make(_wheel[0])


@pytest.fixture
def server():
    """A :class:`~pulsyflux.testing.RunningServer` over TCP without its broker (tests start their own)."""
    running = pytest_twisted.blockon(start_server(broker=False))
    yield running
    pytest_twisted.blockon(running.stop())


@pytest.fixture
def limited():
    """``limited(**limits)``: a RunningServer (no broker) whose ServerFactory has those limits."""
    servers = []

    def start(**limits):
        started = []  # without a broker the server starts at once: callable inside a running test
        start_server(broker=False, **limits).addCallback(started.append)
        servers.extend(started)
        return started[0]

    yield start
    for running in servers:
        pytest_twisted.blockon(running.stop())


@pytest.fixture
def memory():
    """A :class:`~pulsyflux.testing.MemoryServer` without its broker; see ``helpers.clocked``."""
    running = MemoryServer(broker=False)
    yield running
    running.close()


@pytest.fixture
def channel():
    return uuid.uuid4()


@pytest.fixture
def cli():
    """Runs ``pulsyflux`` commands in this reactor (tests/console.py): ``await cli("request", ...)``."""
    from .console import InProcessCLI

    runner = InProcessCLI()
    yield runner
    runner.close()


@pytest.fixture
def redis_server():
    """A redis-server of the test's own on a free loopback port (skipped outside CI if Redis is missing)."""
    from .redis_process import RedisServer

    redis = RedisServer()
    redis.start()
    yield redis
    redis.stop()
