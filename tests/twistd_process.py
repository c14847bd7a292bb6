"""Run ``twistd -n pulsyflux`` as a child process and watch its log.

Used by the end-to-end tests that check what a user gets after a real
``pip install`` of the wheel.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import venv
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

REPO = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"pulsyflux server listening on (\S+)")


def build_wheel_venv(root: Path) -> Path:
    """Build the project's wheel and install it into a new, empty virtualenv.

    Returns the virtualenv's bin directory.
    """
    dist = root / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO)],
        check=True,
    )
    [wheel] = dist.glob("pulsyflux-*.whl")
    env_dir = root / "venv"
    # No pip inside (ensurepip costs seconds): our pip installs into it (``--python``), deps and all.
    venv.create(env_dir, with_pip=False)
    bindir = env_dir / "bin"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(bindir / "python"), "install", "-q", str(wheel)], check=True
    )
    return bindir


class TwistdProcess(ProcessProtocol):
    """Collects output; ``listening`` fires with "host:port" once the server logs it."""

    def __init__(self) -> None:
        self.output = ""
        self.listening: Deferred[str] = Deferred()
        self.ended: Deferred[bool] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data.decode("utf-8", "replace")
        match = LISTENING.search(self.output)
        if match and not self.listening.called:
            self.listening.callback(match.group(1))

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        if not self.listening.called:
            self.listening.errback(RuntimeError(f"twistd exited ({code}) before listening:\n{self.output}"))
        # twistd re-raises the SIGTERM it handled once shut down, so a clean
        # stop is exit code 0 or death by SIGTERM after the shutdown log line.
        clean = (code == 0 or sig == signal.SIGTERM) and "Server Shut Down." in self.output
        self.ended.callback(clean and "Traceback" not in self.output)

    def terminate(self) -> Deferred:
        if not self.ended.called:
            self.transport.signalProcess(signal.SIGTERM)
        return self.ended


def spawn_twistd(bindir: Path, cwd: Path, *args: str) -> TwistdProcess:
    proto = TwistdProcess()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    argv = [str(bindir / "twistd"), "-n", "--pidfile=", "pulsyflux", *args]
    reactor.spawnProcess(proto, argv[0], argv, env=env, path=str(cwd))
    return proto
