"""The ``pulsyflux`` command run inside the test's reactor (``cli.run_command``), not as a process.

A child process costs a Python start and a Twisted import (~0.3 s here) per
command; where the process boundary is not what a test is about, the
``cli`` fixture (tests/conftest.py) runs the very same command in this
reactor, with stdin, stdout and stderr standing in for the process's:

    result = await cli("request", "--server", server.address, str(channel), "x")
    assert (result.returncode, result.stdout) == (0, b"...")

    sub = cli.start("sub", "--server", server.address, "news")
    await sub.stderr.line("subscribed to")   # fired by the write itself: no polling
    ...
    code, out, err = await sub.finished()

One command at a time (they share ``sys.stdout``); what needs the process
(signals, a real pipe that fills up, ``python -m``) stays in a subprocess.
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional

from twisted.internet.defer import Deferred

from pulsyflux.cli import run_command


class Stream:
    """Stands in for stdout or stderr: keeps every byte, and tells who waits for a line."""

    def __init__(self, tty: bool = False) -> None:
        self.data = bytearray()
        self.tty = tty
        self.buffer = _Bytes(self)
        self._waiting: list[tuple[str, Deferred[str]]] = []

    def write(self, text: str) -> int:
        self.got(text.encode("utf-8", "backslashreplace"))  # what sys.stderr does with what UTF-8 cannot hold
        return len(text)

    def got(self, data: bytes) -> None:
        self.data += data
        waiting, self._waiting = self._waiting, []
        for needle, d in waiting:
            self._offer(needle, d)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self.tty

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno")

    def line(self, needle: str) -> "Deferred[str]":
        """Fires with the first whole line containing ``needle``, already written or yet to come.

        Fails (rather than hangs) if the command ends without writing it.
        """
        d: Deferred[str] = Deferred()
        self._offer(needle, d)
        return d

    def ended(self) -> None:
        waiting, self._waiting = self._waiting, []
        for needle, d in waiting:
            tail = bytes(self.data[-500:])
            d.errback(AssertionError(f"the command ended without a line containing {needle!r}; it wrote ...{tail!r}"))

    def _offer(self, needle: str, d: "Deferred[str]") -> None:
        for line in bytes(self.data).decode("utf-8", "replace").splitlines(keepends=True):
            if line.endswith("\n") and needle in line:
                d.callback(line)
                return
        self._waiting.append((needle, d))


class _Bytes:
    """``stream.buffer``: the binary side, where the CLI writes payloads byte for byte."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream

    def write(self, data: bytes) -> int:
        self._stream.got(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass


class _Stdin:
    def __init__(self, data: bytes, tty: bool) -> None:
        self.buffer = io.BytesIO(data)
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@dataclass
class Result:
    """What a finished command left: named as ``subprocess.CompletedProcess`` names it."""

    returncode: int
    stdout: bytes
    stderr: bytes

    def __iter__(self) -> Any:
        return iter((self.returncode, self.stdout, self.stderr))


class Running:
    """One command running in this reactor."""

    def __init__(self, argv: tuple[str, ...], stdin: bytes, env: Optional[dict], tty: bool) -> None:
        self.stdout = Stream(tty=tty)
        self.stderr = Stream()
        saved = sys.stdin, sys.stdout, sys.stderr
        sys.stdin, sys.stdout, sys.stderr = _Stdin(stdin, tty=False), self.stdout, self.stderr  # type: ignore[assignment]
        self._saved: Optional[tuple[Any, Any, Any]] = saved
        ours = {k: v for k, v in os.environ.items() if k.startswith("PULSYFLUX_")}
        for name in ours:
            del os.environ[name]
        os.environ.update(env or {})
        try:
            # Parsing (and its reading of the environment) happens before the first await.
            self.done: Deferred[int] = Deferred.fromCoroutine(run_command(_reactor(), list(argv)))
        finally:
            for name in env or {}:
                os.environ.pop(name, None)
            os.environ.update(ours)
        self.done.addBoth(self._ended)

    def _ended(self, result: Any) -> Any:
        self._restore()
        self.stdout.ended()
        self.stderr.ended()
        return result

    def _restore(self) -> None:
        if self._saved is not None:
            sys.stdin, sys.stdout, sys.stderr = self._saved
            self._saved = None

    async def finished(self) -> Result:
        """The exit status and everything written, once the command has returned."""
        code = await self.done
        return Result(code, bytes(self.stdout.data), bytes(self.stderr.data))

    def stop(self) -> None:
        """Cancel it (a test ending early); the streams are put back either way."""
        if not self.done.called:
            self.done.cancel()
        self._restore()


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class InProcessCLI:
    """The ``cli`` fixture: ``await cli(*argv)`` runs a command to its end, ``cli.start`` lets it run."""

    def __init__(self) -> None:
        self._current: Optional[Running] = None

    def start(self, *argv: str, stdin: bytes = b"", env: Optional[dict] = None, tty: bool = False) -> Running:
        """Start ``pulsyflux ARGV``; ``env`` replaces every ``PULSYFLUX_*`` variable, ``tty`` makes stdout a terminal."""
        if self._current is not None and not self._current.done.called:
            raise AssertionError("one in-process command at a time: they share sys.stdout")
        self._current = Running(argv, stdin, env, tty)
        return self._current

    def __call__(
        self, *argv: str, stdin: bytes = b"", env: Optional[dict] = None, tty: bool = False
    ) -> "Deferred[Result]":
        return Deferred.fromCoroutine(self.start(*argv, stdin=stdin, env=env, tty=tty).finished())

    def close(self) -> None:
        if self._current is not None:
            self._current.stop()
            self._current = None
