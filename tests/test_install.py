"""What a user gets from ``pip install``: ``twistd pulsyflux`` works, the sdist is a testable tree.

The wheel is installed into an empty virtualenv (not the source tree), and
twistd runs as a separate process, as it would on a server. Everything here
works offline (``PIP_NO_INDEX=1``): one sdist and one wheel are built per
session and installed with what this virtualenv already has.
"""

from __future__ import annotations

import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer

from pulsyflux import Consumer, NoProviderError, Provider

from .twistd_process import REPO, spawn_twistd


def test_plugin_is_known_after_install(wheel_bin, tmp_path):
    result = subprocess.run(
        [str(wheel_bin / "twistd"), "pulsyflux", "--help"], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    assert "--port" in result.stdout


@pytest_twisted.ensureDeferred
async def test_bare_port_listens_on_loopback(wheel_bin, tmp_path):
    import socket

    with socket.socket() as probe:  # find a free port, then hand it to twistd
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = spawn_twistd(wheel_bin, tmp_path, "--port", str(port))
    try:
        assert await proc.listening == f"127.0.0.1:{port}"
    finally:
        assert await proc.terminate(), proc.output


@pytest_twisted.ensureDeferred
async def test_unix_socket_endpoint(wheel_bin, tmp_path):
    path = tmp_path / "pf.sock"
    proc = spawn_twistd(wheel_bin, tmp_path, "--port", f"unix:{path}")
    try:
        assert await proc.listening == f"unix:{path}"
        channel = uuid.uuid4()
        provider = await Provider.connect(f"unix:path={path}", channel, handler=lambda data: data * 2)
        consumer = await Consumer.connect(f"unix:path={path}", channel)
        assert await consumer.send(b"ab") == b"abab"
        await defer.gatherResults([consumer.close(), provider.close()])
    finally:
        assert await proc.terminate(), proc.output


@pytest_twisted.ensureDeferred
async def test_twistd_serves_requests_and_the_broker_and_stops_on_sigterm(wheel_bin, tmp_path):
    """One twistd for both (a start costs a Python and a Twisted import): requests, then pub/sub."""
    from pulsyflux import BrokerClient, Message

    proc = spawn_twistd(wheel_bin, tmp_path, "--port", "tcp:0:interface=127.0.0.1")
    try:
        address = await proc.listening
        assert address.startswith("127.0.0.1:")
        channel = uuid.uuid4()
        provider = await Provider.connect(address, channel, handler=lambda data: b"from twistd: " + data)
        consumer = await Consumer.connect(address, channel)
        assert await consumer.send(b"hi") == b"from twistd: hi"
        await consumer.close()
        await provider.close()
        subscriber = await BrokerClient.connect(address)  # the default broker channel
        publisher = await BrokerClient.connect(address)
        sub = await subscriber.subscribe("e2e")
        await publisher.publish("e2e", b"through twistd", {"k": "v"})
        assert await sub.get() == Message("e2e", b"through twistd", {"k": "v"})
        await publisher.close()
    finally:
        clean = await proc.terminate()
    assert clean, proc.output
    # The broker ended the subscription when twistd shut down.
    assert [msg async for msg in sub] == []
    await subscriber.close()
    assert "pulsyflux broker on channel" in proc.output  # what test_twistd_without_the_broker looks for
    # The install's twisted/plugins cache cannot be written (as for a user of a
    # root-owned install): Twisted says so at every start unless silenced.
    assert "plugin cache" not in proc.output


@pytest_twisted.ensureDeferred
async def test_twistd_without_the_broker(wheel_bin, tmp_path):
    from pulsyflux.broker.link import DEFAULT_BROKER_CHANNEL

    proc = spawn_twistd(wheel_bin, tmp_path, "--port", "tcp:0:interface=127.0.0.1", "--no-broker")
    try:
        address = await proc.listening
        # Nobody answers on the default broker channel (one request: BrokerClient.connect would retry
        # for a second, in case a broker had only just connected)...
        consumer = await Consumer.connect(address, DEFAULT_BROKER_CHANNEL)
        with pytest.raises(NoProviderError):
            await consumer.send(b"[]")
        await consumer.close()
    finally:
        assert await proc.terminate(), proc.output
    # ...and none came later: twistd never started one.
    assert "pulsyflux broker on channel" not in proc.output


@pytest_twisted.ensureDeferred
async def test_installed_console_script_and_http_api(wheel_bin, tmp_path):
    """The wheel's ``pulsyflux`` command against ``twistd pulsyflux --http``."""
    import json
    import socket

    from twisted.internet import threads

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        http_port = probe.getsockname()[1]
    proc = spawn_twistd(wheel_bin, tmp_path, "--port", "tcp:0:interface=127.0.0.1", "--http", str(http_port))
    try:
        address = await proc.listening

        def cli(*args: str) -> subprocess.CompletedProcess:
            argv = [str(wheel_bin / "pulsyflux"), *args, "--server", address]
            return subprocess.run(argv, capture_output=True, cwd=tmp_path, timeout=60)

        published = await threads.deferToThread(cli, "pub", "e2e", "from the console script")
        assert published.returncode == 0, published.stderr
        stats = await threads.deferToThread(cli, "stats", "--http", f"127.0.0.1:{http_port}", "--json")
        assert stats.returncode == 0, stats.stderr
        assert json.loads(stats.stdout)["broker"]["published"] == 1
    finally:
        assert await proc.terminate(), proc.output


@pytest.mark.parametrize("flag", ["--port", "--http"])
def test_twistd_exits_with_a_clear_error_when_its_port_is_taken(wheel_bin, tmp_path, flag):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = (
            ["--port", str(port)] if flag == "--port" else ["--port", "tcp:0:interface=127.0.0.1", "--http", str(port)]
        )
        result = subprocess.run(
            [str(wheel_bin / "twistd"), "-n", "--pidfile=", "pulsyflux", *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
        )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    what = "pulsyflux server" if flag == "--port" else "pulsyflux HTTP API"
    [line] = [line for line in output.splitlines() if "cannot listen" in line]  # said once
    assert line.endswith(f"{what} cannot listen on tcp:{port}:interface=127.0.0.1: Address already in use")
    assert "Traceback" not in output and "Unhandled" not in output


@pytest_twisted.ensureDeferred
async def test_readme_install_commands_work_in_either_order(readme_installs):
    """``pip install -e .`` and ``pip install .`` (the README's two commands): twistd knows
    pulsyflux after each, whichever came first, run from another directory.

    (The installs run beside the other tests: see ``readme_installs`` in conftest.)"""
    clone, site = readme_installs.clone, readme_installs.site
    editable, wheel, editable_again = readme_installs.places
    assert editable[0].startswith(clone) and editable[1].startswith(clone)  # the second command first
    assert wheel[0].startswith(site) and wheel[1].startswith(site)  # then the first
    assert editable_again[0].startswith(clone) and editable_again[1].startswith(clone)  # and the second again

    bindir, elsewhere = Path(readme_installs.bindir), Path(readme_installs.elsewhere)
    proc = spawn_twistd(bindir, elsewhere, "--port", "tcp:0:interface=127.0.0.1")
    try:
        assert (await proc.listening).startswith("127.0.0.1:")
    finally:
        assert await proc.terminate(), proc.output


# What an unpacked sdist must hold for its tests to run (besides the package itself).
_SOURCE_TREE = ("tests", "docs", "benchmarks")
_SOURCE_FILES = ("LICENSE", "README.md", "setup.cfg", "pyproject.toml", "tox.ini", "MANIFEST.in")
_NOT_SOURCE = ("__pycache__", ".hypothesis", "_trial_temp", ".pytest_cache")


def test_sdist_holds_the_tests_docs_and_license(dists):
    """Everything the suite needs is in the sdist, so ``pytest`` in an unpacked one runs it
    (collecting all of it here would cost seconds of CPU: this checks the cause instead)."""
    sdist, _ = dists
    with tarfile.open(sdist) as archive:
        shipped = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    expected = set(_SOURCE_FILES)
    for top in _SOURCE_TREE:
        for path in (REPO / top).rglob("*"):
            if path.is_file() and not any(part in _NOT_SOURCE or part.startswith("_trial_temp") for part in path.parts):
                if path.suffix not in (".pyc", ".pyo"):
                    expected.add(path.relative_to(REPO).as_posix())
    assert expected - shipped == set()
    assert "tests/conftest.py" in shipped and "tests/data/wire-vectors.txt" in shipped  # what the issue found missing


def test_metadata_names_the_license_its_file_and_the_pytest_plugin(wheel_bin):
    shown = subprocess.run(
        [
            str(wheel_bin / "python"),
            "-c",
            "from importlib.metadata import metadata as m; d = m('pulsyflux');"
            " print(d['License-Expression'] or d['License']); print(d.get_all('License-File')); print(d['Author']);"
            # Python 3.9 has no entry_points(group=...): the distribution's own list works everywhere.
            " from importlib.metadata import distribution as dist;"
            " print([p.value for p in dist('pulsyflux').entry_points if p.group == 'pytest11'])",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    license_name, files, author, plugins = shown.stdout.splitlines()
    assert license_name == "MIT" and "LICENSE" in files and author
    assert plugins == "['pulsyflux.pytest_plugin']"  # pytest finds the plugin in the installed wheel
    assert "MIT License" in (REPO / "LICENSE").read_text()
