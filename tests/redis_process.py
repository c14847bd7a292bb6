"""A throwaway redis-server for the cluster tests: loopback, a free port, no persistence.

The tests start their own Redis rather than use one that may be running:
they kill, pause and restart it. Outside CI a machine without redis-server
skips them with the reason; in CI (``CI`` set) a missing server is a failure,
because .ci/run installs it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from typing import Optional

import pytest

READY = b"Ready to accept connections"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> str:
    path = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing: .ci/run should have installed Debian's redis-server")
        pytest.skip("redis-server is not installed (apt-get install redis-server); the cluster tests need it")
    return path


class RedisServer:
    """One redis-server process; ``url`` says where it listens."""

    def __init__(self) -> None:
        self.binary = redis_binary()
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="pulsyflux-redis-")
        self.process: Optional[subprocess.Popen[bytes]] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it and return once it accepts connections (it says so on stdout)."""
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--daemonize",
                "no",
                "--loglevel",
                "notice",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self.process.stdout is not None
        seen = b""
        for line in self.process.stdout:
            seen += line
            if READY in line:
                return
        raise RuntimeError(f"redis-server did not start: {seen[-2000:].decode(errors='replace')}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGCONT)
            self.kill()
            assert self.process.stdout is not None
            self.process.stdout.close()
        shutil.rmtree(self.dir, ignore_errors=True)
