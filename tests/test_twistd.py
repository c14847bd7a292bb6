"""``twistd pulsyflux`` as an operator meets it: bad options, listeners, logs.

Bad options go through a real ``twistd`` process (the one-line, exit 1
promise is about what the process prints); the rest runs in-process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.logger import LogLevel, capturedLogs, formatEvent

TWISTD = Path(sys.executable).parent / "twistd"


def twistd(cwd: Path, *args: str, prelude: str = "") -> subprocess.CompletedProcess:
    """``twistd -n pulsyflux ARGS`` to its end; ``prelude`` runs first in the same interpreter."""
    argv = ["twistd", "-n", "--pidfile=", "pulsyflux", *args]
    if prelude:
        script = f"import sys; {prelude}; sys.argv = {argv!r}; from twisted.scripts.twistd import run; run()"
        command = [sys.executable, "-c", script]
    else:
        command = [str(TWISTD), *argv[1:]]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=60)


def one_line(done: subprocess.CompletedProcess) -> str:
    """The only line a refused start printed (it must print exactly one, and start nothing)."""
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 1, lines
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0] and "starting up" not in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--port", "abc"], "twistd pulsyflux: --port: 'abc' is not a port or a server endpoint description"),
        (["--http", "abc"], "twistd pulsyflux: --http: 'abc' is not a port or a server endpoint description"),
        (["--port", "99999"], "twistd pulsyflux: --port: 'tcp:99999:interface=127.0.0.1': the port must be 0-65535"),
        (["--grace", "-1"], "twistd pulsyflux: --grace must be a number of seconds, 0 or more, not '-1'"),
        (["--max-connections", "0"], "twistd pulsyflux: --max-connections must be a whole number greater than 0"),
        (["--no-such-option"], "twistd pulsyflux: option --no-such-option not recognized"),
    ],
)
def test_a_bad_option_is_one_line_and_exit_status_1(tmp_path, args, says):
    assert one_line(twistd(tmp_path, *args)).startswith(says)


@pytest.mark.parametrize("kind", ["ssl", "mtls"])
def test_tls_without_pyopenssl_says_what_to_install(tmp_path, kind):
    done = twistd(tmp_path, "--port", f"{kind}:9443:privateKey=server.pem", prelude="sys.modules['OpenSSL'] = None")
    assert one_line(done) == f"twistd pulsyflux: --port: {kind}: needs pyOpenSSL: pip install 'pulsyflux[tls]'"


def test_a_tls_file_that_is_missing_is_named(tmp_path):
    line = one_line(twistd(tmp_path, "--port", "ssl:9443:privateKey=missing.pem"))
    assert line.endswith(f"No such file or directory: {tmp_path / 'missing.pem'}")


def test_grace_zero_is_allowed():
    from pulsyflux.service import Options

    options = Options()
    options.parseOptions(["--grace", "0"])
    assert options["grace"] == 0.0


# -- listeners not on loopback -----------------------------------------------------


def _warnings(events: list) -> list[str]:
    return [formatEvent(event) for event in events if event.get("log_level") == LogLevel.warn]


@pytest_twisted.ensureDeferred
async def test_a_listener_not_on_loopback_is_a_warning_naming_what_it_exposes():
    from pulsyflux.http import http_service
    from pulsyflux.service import BrokerService

    top = BrokerService("tcp:0:interface=0.0.0.0", broker_channel=None)
    web = http_service("tcp:0:interface=0.0.0.0", top)
    web.setServiceParent(top)
    with capturedLogs() as events:
        top.startService()
        try:
            server_port = (await top.server.whenListening()).getHost().port
            http_port = (await web.whenListening()).getHost().port
        finally:
            await top.stopService()
    warned = _warnings(events)
    assert any(f"pulsyflux server listens on 0.0.0.0:{server_port} (all interfaces), not loopback" in w for w in warned)
    assert any(f"pulsyflux HTTP API listens on 0.0.0.0:{http_port}" in w and "POST /publish" in w for w in warned)
    assert len(warned) == 2, warned


@pytest_twisted.ensureDeferred
async def test_loopback_and_unix_listeners_are_not_warned_about(tmp_path):
    from pulsyflux.service import BrokerService

    with capturedLogs() as events:
        for listen in ("tcp:0:interface=127.0.0.1", "tcp6:0:interface=\\:\\:1", f"unix:{tmp_path / 'pf.sock'}"):
            top = BrokerService(listen, broker_channel=None)
            top.startService()
            try:
                await top.server.whenListening()
            finally:
                await top.stopService()
    assert _warnings(events) == []
