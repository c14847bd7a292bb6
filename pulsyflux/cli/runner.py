"""Running one command on the reactor: known failures become one line on stderr, Ctrl-C a clean stop.

Every subcommand is a coroutine over the public API (Consumer, Provider,
BrokerClient), run by :func:`run`, which turns known failures into one line
on stderr and Ctrl-C into a clean stop (connections closed, exit status 130).
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Optional, TextIO, Union

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from .._reactor import default_reactor
from .._twisted_compat import exit_signal
from ..endpoints import DEFAULT_ADDRESS
from ..wire.printable import printable

if TYPE_CHECKING:
    from .._types import IReactor

__all__ = [
    "DEBUG_ENV",
    "describe",
    "TOKEN_ENV",
    "EXIT_ERROR",
    "EXIT_USAGE",
    "EXIT_INTERRUPTED",
    "EXIT_BROKEN_PIPE",
    "Command",
    "CLIError",
    "run",
    "report",
    "print_err",
    "Output",
]


DEBUG_ENV = "PULSYFLUX_DEBUG"
TOKEN_ENV = "PULSYFLUX_TOKEN"  # --token's default: the token for a server started with --auth
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
Command = Callable[["IReactor", argparse.Namespace], Coroutine[Any, Any, Optional[int]]]


class CLIError(Exception):
    """A failure the user should read as one line, with an exit status."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class _Run:
    def __init__(self) -> None:
        self.deferred: Optional[Deferred[Optional[int]]] = None
        self.result: Union[None, int, Failure] = None  # the command's exit status, or how it failed
        self.done: Deferred[None] = Deferred()
        self.interrupted = False


def run(command: Command, args: argparse.Namespace, reactor: Optional[IReactor] = None) -> int:
    """Run ``command(reactor, args)`` to completion and return the exit status.

    Ctrl-C (or SIGTERM) stops the reactor; before it stops, the command is
    cancelled and given a few seconds to close its connections, so the
    server sees a clean disconnect and nothing prints a traceback.
    """
    reactor = default_reactor(reactor)
    state = _Run()

    def finished(result: Union[None, int, Failure]) -> None:
        state.result = result
        if not state.done.called:
            state.done.callback(None)
        if not state.interrupted and reactor.running:
            reactor.stop()

    def start() -> None:
        state.deferred = Deferred.fromCoroutine(command(reactor, args))
        state.deferred.addBoth(finished)

    def before_shutdown() -> Optional[Deferred[None]]:
        if state.done.called:
            return None
        state.interrupted = True
        if state.deferred is None:
            return None
        state.deferred.cancel()
        if state.done.called:
            return None
        wait: Deferred[None] = Deferred()

        def give_up() -> None:
            if not wait.called:
                wait.callback(None)

        timer = reactor.callLater(3.0, give_up)

        def done(_: object) -> None:
            if timer.active():
                timer.cancel()
            if not wait.called:
                wait.callback(None)

        state.done.addBoth(done)
        return wait

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", before_shutdown)
    reactor.run()

    if state.interrupted:
        signum = exit_signal(reactor) or signal.SIGINT
        return 128 + int(signum)
    result = state.result
    if isinstance(result, Failure):
        return report(result, args)
    return int(result or 0)


def report(failure: Failure, args: argparse.Namespace) -> int:
    """Print a failure as one line; return its exit status."""
    error = failure.value
    prog = f"pulsyflux {getattr(args, 'command', '')}".rstrip()
    if os.environ.get(DEBUG_ENV):
        failure.printTraceback(file=sys.stderr)
    if isinstance(error, BrokenPipeError):
        # The reader went away (``| head``): stop quietly, as SIGPIPE would,
        # and keep Python from complaining when it flushes stdout at exit.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_BROKEN_PIPE
    if isinstance(error, CLIError):
        message, code = error.message, error.code
    else:
        message, code = describe(error, args), EXIT_ERROR
    # The message may carry network text (a provider's error, a close reason).
    print_err(f"{prog}: error: {printable(message)}")
    return code


def describe(error: BaseException, args: argparse.Namespace) -> str:
    """A known failure in one line a user reads (where to connect, what was refused, ...)."""
    from twisted.internet import error as net_error

    from ..wire.errors import (
        ConnectionLostError,
        NoProviderError,
        PermissionDenied,
        RemoteError,
        RequestTimeout,
        ServerOverloaded,
    )

    server = getattr(args, "server", DEFAULT_ADDRESS)
    if isinstance(error, net_error.ConnectionRefusedError):
        return f"cannot connect to {server}: connection refused (is the server running?)"
    if isinstance(error, (net_error.ConnectError, net_error.DNSLookupError)):
        os_error = getattr(error, "osError", None)  # a ConnectError's; a DNSLookupError has none
        if isinstance(os_error, int):  # a Unix socket's connect() gives the bare errno
            if os_error == errno.ENOENT:
                return f"cannot connect to {server}: no such socket file (is the server running, listening there?)"
            os_error = os.strerror(os_error)
        text = os_error if os_error else (error.args[0] if error.args else "")
        detail = str(text or type(error).__name__).strip().rstrip(".")
        return f"cannot connect to {server}: {detail}"
    if isinstance(error, NoProviderError):
        return f"no provider answered ({error})"
    if isinstance(error, RequestTimeout):
        timeout = getattr(args, "timeout", None)
        return f"request timed out after {timeout:g} s" if timeout else "request timed out"
    if isinstance(error, RemoteError):
        return f"the provider answered with an error: {error.message}"
    if isinstance(error, ServerOverloaded):
        return f"the server refused the request: {error}"
    if isinstance(error, (ConnectionLostError, PermissionDenied)):
        return str(error)
    if isinstance(error, (OSError, ValueError, TypeError)):
        return str(error)
    text = str(error) or type(error).__name__
    return f"{text} ({type(error).__name__}; set {DEBUG_ENV}=1 for a traceback)"


def print_err(text: str) -> None:
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):
        pass


class Output:
    """Writes bytes to stdout, flushing each line so pipes see it at once."""

    def __init__(self, stream: Optional[TextIO] = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.buffer = getattr(self.stream, "buffer", None)

    def write(self, data: bytes) -> None:
        if self.buffer is not None:
            self.stream.flush()
            self.buffer.write(data)
            self.buffer.flush()
        else:
            self.stream.write(data.decode("utf-8", "replace"))
            self.stream.flush()

    def line(self, text: str) -> None:
        self.write(text.encode("utf-8", "backslashreplace") + b"\n")

    def isatty(self) -> bool:
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError):
            return False
