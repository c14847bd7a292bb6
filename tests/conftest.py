"""Shared fixtures: a real pulsyflux server on 127.0.0.1 with an ephemeral port, or one in memory."""

from __future__ import annotations

import concurrent.futures
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
import pytest_twisted

from pulsyflux.testing import MemoryServer, start_server

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
# A copy of shared/wire-vectors.txt (frames captured from the Go implementation),
# kept in the repo so golden tests run wherever the suite does.
WIRE_VECTORS = Path(__file__).resolve().parent / "data" / "wire-vectors.txt"


_wheel_build: dict = {}


def pytest_collection_finish(session):
    """Start building the wheel's virtualenv now, in a thread, if test_install runs.

    It takes seconds (build the sdist, the wheel from it, install that offline), mostly
    waiting on child processes: done beside the other tests, not before
    test_install's first one. The ``wheel_bin`` fixture waits for it. The README's
    install commands (``readme_installs``, seconds of pip) follow it in the same thread.
    """
    if any(item.nodeid.startswith("tests/test_install.py") for item in session.items):
        from .twistd_process import ReadmeInstalls, build_wheel_venv

        root = Path(tempfile.mkdtemp(prefix="pulsyflux-wheel-"))
        _wheel_build["root"] = root
        executor = concurrent.futures.ThreadPoolExecutor(1)  # one job after the other: the second needs the first
        _wheel_build["future"] = executor.submit(build_wheel_venv, root)
        if any("test_readme_install_commands" in item.nodeid for item in session.items):
            _wheel_build["readme"] = executor.submit(_after_the_wheel, ReadmeInstalls, root)
        executor.shutdown(wait=False)


def _after_the_wheel(job, root):
    _wheel_build["future"].result()  # its failure is the wheel's, reported by ``wheel_bin``
    return job(root)


def pytest_sessionfinish(session):
    root = _wheel_build.pop("root", None)
    for name in ("future", "readme"):
        future = _wheel_build.pop(name, None)
        if future is not None:
            future.exception()  # let the build end before its folder goes
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def wheel_bin(tmp_path_factory):
    """The bin directory of a fresh virtualenv with the project's wheel installed (see twistd_process)."""
    future = _wheel_build.get("future")
    if future is None:  # test_install was not collected at first (e.g. selected by -k later)
        from .twistd_process import build_wheel_venv

        root = tmp_path_factory.mktemp("wheel")
        _wheel_build["root"] = root
        _wheel_build["future"] = future = concurrent.futures.Future()
        future.set_result(build_wheel_venv(root))
    return future.result()


@pytest.fixture(scope="session")
def dists(wheel_bin):
    """``(sdist, wheel)``: the files ``wheel_bin`` was made from (the wheel was built from the sdist)."""
    dist = _wheel_build["root"] / "dist"
    [sdist] = dist.glob("pulsyflux-*.tar.gz")
    [wheel] = dist.glob("pulsyflux-*.whl")
    return sdist, wheel


@pytest.fixture(scope="session")
def readme_installs(dists):
    """A :class:`~tests.twistd_process.ReadmeInstalls`: made beside the other tests when test_install runs."""
    future = _wheel_build.get("readme")
    if future is None:  # not selected at collection
        from .twistd_process import ReadmeInstalls

        _wheel_build["readme"] = future = concurrent.futures.Future()
        future.set_result(ReadmeInstalls(_wheel_build["root"]))
    return future.result()


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
