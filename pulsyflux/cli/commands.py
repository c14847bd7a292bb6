"""The ``pulsyflux`` command: talk to a running server from a shell.

Every subcommand is a coroutine over the public API (Consumer, Provider,
BrokerClient), run by :func:`_run`, which turns known failures into one line
on stderr and Ctrl-C into a clean stop (connections closed, exit status 130).

    $ pulsyflux request 6f1c...-... 'hello' --timeout 2
    $ pulsyflux sub orders --count 1 --json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
import uuid
from typing import Any, Awaitable, Callable, Coroutine, Optional, Sequence, Union

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from .. import __version__
from .._twisted_compat import exit_signal
from ..endpoints import DEFAULT_ADDRESS, DEFAULT_HTTP_PORT, http_address
from ..wire.printable import UNSAFE_BEYOND_C0, printable, printable_block, printable_bytes

__all__ = ["main", "run_command", "build_parser", "CLIError"]

SERVER_ENV = "PULSYFLUX_SERVER"
BROKER_CHANNEL_ENV = "PULSYFLUX_BROKER_CHANNEL"
HTTP_ENV = "PULSYFLUX_HTTP"
DEBUG_ENV = "PULSYFLUX_DEBUG"
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE

Command = Callable[[Any, argparse.Namespace], Coroutine[Any, Any, Optional[int]]]


class CLIError(Exception):
    """A failure the user should read as one line, with an exit status."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# -- running a command on the reactor ----------------------------------------------------


class _Run:
    def __init__(self) -> None:
        self.deferred: Optional[Deferred[Any]] = None
        self.result: Any = None
        self.done: Deferred[None] = Deferred()
        self.interrupted = False


def _run(command: Command, args: argparse.Namespace, reactor: Any = None) -> int:
    """Run ``command(reactor, args)`` to completion and return the exit status.

    Ctrl-C (or SIGTERM) stops the reactor; before it stops, the command is
    cancelled and given a few seconds to close its connections, so the
    server sees a clean disconnect and nothing prints a traceback.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    state = _Run()

    def finished(result: Any) -> None:
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

        def done(_: Any) -> None:
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
        return _report(result, args)
    return int(result or 0)


def _report(failure: Failure, args: argparse.Namespace) -> int:
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
        message, code = _describe(error, args), EXIT_ERROR
    # The message may carry network text (a provider's error, a close reason).
    _print_err(f"{prog}: error: {printable(message)}")
    return code


def _describe(error: BaseException, args: argparse.Namespace) -> str:
    from twisted.internet import error as net_error

    from ..wire.errors import (
        ConnectionLostError,
        NoProviderError,
        RemoteError,
        RequestTimeout,
        ServerOverloaded,
    )

    server = getattr(args, "server", DEFAULT_ADDRESS)
    if isinstance(error, net_error.ConnectionRefusedError):
        return f"cannot connect to {server}: connection refused (is the server running?)"
    if isinstance(error, (net_error.ConnectError, net_error.DNSLookupError)):
        os_error = getattr(error, "osError", None)  # a ConnectError's; a DNSLookupError has none
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
    if isinstance(error, ConnectionLostError):
        return str(error)
    if isinstance(error, (OSError, ValueError, TypeError)):
        return str(error)
    text = str(error) or type(error).__name__
    return f"{text} ({type(error).__name__}; set {DEBUG_ENV}=1 for a traceback)"


def _print_err(text: str) -> None:
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):
        pass


class _Output:
    """Writes bytes to stdout, flushing each line so pipes see it at once."""

    def __init__(self, stream: Any = None) -> None:
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


# -- argument types ------------------------------------------------------------------------


def _channel(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a channel id: channels are UUIDs, e.g. {uuid.UUID(int=0x1)}"
        ) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def _topic(text: str, subscribing: bool = False) -> str:
    """A topic to publish to, checked by the broker's own rule, so the CLI never disagrees with it."""
    from ..wire.messages import topic_problem

    problem = topic_problem(text, subscribing)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def _subscribed_topic(text: str) -> str:
    """A topic to subscribe to (the rule is stricter: bounded, no control characters)."""
    return _topic(text, subscribing=True)


def _group(text: str) -> str:
    """A queue group name, checked by the broker's own rule."""
    from ..wire.messages import group_problem

    problem = group_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def _header(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"header {text!r} is not key=value")
    return key, value


def _data(value: Optional[str], what: str) -> bytes:
    """The argument as UTF-8, or stdin when it is missing or ``-``."""
    if value is not None and value != "-":
        return os.fsencode(value)
    if sys.stdin is None or sys.stdin.isatty():
        raise CLIError(f"no {what}: give it as an argument, or pipe it on stdin", EXIT_USAGE)
    return sys.stdin.buffer.read()


def _text(payload: bytes) -> str:
    """One bounded line of text for a payload from the network: invalid UTF-8
    and control characters escaped (no terminal escapes, no line breaks),
    at most ECHO_LIMIT bytes of it shown."""
    return printable_bytes(payload)


# -- commands ------------------------------------------------------------------------------


async def cmd_request(reactor: Any, args: argparse.Namespace) -> int:
    from ..client import Consumer

    payload = _data(args.data, "request data")
    consumer = await Consumer.connect(args.server, args.channel, reactor=reactor)
    try:
        started = time.perf_counter()
        reply = await consumer.send(payload, timeout=args.timeout)
        elapsed = time.perf_counter() - started
    finally:
        await consumer.close()
    out = _Output()
    if out.isatty():
        # A terminal acts on escapes the provider put in its answer: show them instead.
        shown = printable_block(reply).encode("utf-8", "backslashreplace")
        out.write(shown if shown.endswith(b"\n") else shown + b"\n")
    else:
        out.write(reply)  # byte for byte
    if args.verbose:
        _print_err(f"{len(reply)} bytes in {elapsed * 1000:.2f} ms")
    return 0


class _CommandProtocol(ProcessProtocol):
    """Feeds one request to a child process; collects its output."""

    transport: IProcessTransport  # set before connectionMade, as for any ProcessProtocol

    def __init__(self, stdin: bytes, done: "Deferred[tuple[bytes, bytes, Any]]") -> None:
        self.stdin = stdin
        self.done = done
        self.out: list[bytes] = []
        self.err: list[bytes] = []

    def connectionMade(self) -> None:
        self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:
        self.done.callback((b"".join(self.out), b"".join(self.err), reason.value))


def _command_runner(reactor: Any, command: str, timeout: float) -> Callable[[bytes], Awaitable[bytes]]:
    """A Provider handler that answers with ``sh -c command``'s stdout."""

    async def handle(data: bytes) -> bytes:
        done: Deferred[tuple[bytes, bytes, Any]] = Deferred()
        proto = _CommandProtocol(data, done)
        process = reactor.spawnProcess(proto, "/bin/sh", ["/bin/sh", "-c", command], env=os.environ)

        def kill() -> None:
            try:
                process.signalProcess("KILL")
            except Exception:  # noqa: BLE001 - it may have exited meanwhile
                pass

        timer = reactor.callLater(timeout, kill)
        try:
            out, err, ended = await done
        finally:
            if timer.active():
                timer.cancel()
        code = getattr(ended, "exitCode", None)
        if code == 0:
            return out
        if code is None:
            raise RuntimeError(f"command killed after {timeout:g} s" if not timer.active() else "command was killed")
        lines = err.decode("utf-8", "replace").strip().splitlines()
        detail = f": {printable(lines[-1])}" if lines else ""
        raise RuntimeError(f"command exited with status {code}{detail}")

    return handle


async def cmd_reply(reactor: Any, args: argparse.Namespace) -> int:
    from ..client import Provider

    out = _Output()
    answered = 0
    all_answered: Deferred[None] = Deferred()
    inner = _command_runner(reactor, args.command_line, args.command_timeout) if args.command_line else None

    async def handler(data: bytes) -> bytes:
        nonlocal answered
        try:
            return data if inner is None else await inner(data)
        finally:
            answered += 1  # an error is an answer too
            if not args.quiet:
                out.line(f"#{answered} {_text(data)}")
            if args.count and answered >= args.count and not all_answered.called:
                reactor.callLater(0, all_answered.callback, None)  # after this answer is written

    provider = await Provider.connect(
        args.server, args.channel, handler=handler, reactor=reactor, reconnect=args.reconnect
    )
    if args.reconnect:
        provider.on_reconnect(lambda _: _print_err(f"pulsyflux reply: reconnected to {args.server}"))
    mode = "echo" if inner is None else f"sh -c {args.command_line!r}"
    _print_err(f"replying on channel {args.channel} at {args.server} ({mode}); Ctrl-C to stop")
    closed = provider.when_lost()
    try:
        if await _first(closed, all_answered) == 0:
            raise CLIError(f"lost the connection to {args.server}")
    finally:
        await provider.close()
    return 0


async def _first(*deferreds: "Deferred[Any]") -> int:
    """Wait for the first of ``deferreds``; return its index."""

    def cancel(_: object) -> None:
        for d in deferreds:
            if not d.called:
                d.cancel()

    winner: Deferred[int] = Deferred(cancel)

    def first(result: object, index: int) -> None:
        if not winner.called:
            winner.callback(index)

    for index, d in enumerate(deferreds):
        d.addBoth(first, index)
    return await winner


async def _broker_client(reactor: Any, args: argparse.Namespace, reconnect: bool = False) -> Any:
    from ..broker.client import BrokerClient
    from ..broker.link import DEFAULT_BROKER_CHANNEL
    from ..wire.errors import NoProviderError

    channel = args.broker_channel or DEFAULT_BROKER_CHANNEL
    try:
        return await BrokerClient.connect(args.server, channel, reactor=reactor, reconnect=reconnect)
    except NoProviderError:
        raise CLIError(
            f"no broker answers on channel {channel} at {args.server} "
            "(started with --no-broker, or on another --broker-channel?)"
        ) from None


async def cmd_pub(reactor: Any, args: argparse.Namespace) -> int:
    payload = _data(args.message, "message")
    headers = dict(args.headers) or None
    client = await _broker_client(reactor, args)
    try:
        await client.publish(args.topic, payload, headers, timeout=args.timeout)
    finally:
        await client.close()
    if not args.quiet:
        _print_err(f"published {len(payload)} bytes to {args.topic!r}")
    return 0


def message_json(message: Any) -> str:
    """One message as a JSON line: payload as text, or base64 when it is not UTF-8."""
    import base64

    line: dict[str, Any] = {"topic": message.topic}
    try:
        line["payload"] = message.payload.decode("utf-8")
    except UnicodeDecodeError:
        line["payload_base64"] = base64.b64encode(message.payload).decode("ascii")
    line["headers"] = dict(message.headers or {})
    text = json.dumps(line, ensure_ascii=False)
    # JSON escapes C0 controls but lets DEL, C1 controls, line separators and
    # bidi overrides through raw: a terminal may act on them. Outside strings
    # the text is ASCII, so escaping them as \uXXXX keeps the very same JSON.
    if UNSAFE_BEYOND_C0.search(text) is not None:
        text = UNSAFE_BEYOND_C0.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text


async def cmd_sub(reactor: Any, args: argparse.Namespace) -> int:
    from ..broker.subscription import SubscriptionClosed

    out = _Output()
    reported = 0

    def report_drops() -> None:
        # Never lose messages without a trace: say so as soon as we know.
        nonlocal reported
        if sub.dropped > reported:
            count = sub.dropped - reported
            _print_err(f"pulsyflux sub: the broker dropped {_count(count, 'message')} for us (reading too slowly)")
            reported = sub.dropped

    client = await _broker_client(reactor, args, reconnect=args.reconnect)
    try:
        sub = await client.subscribe(args.topic, group=args.group)
        sub.on_resume(
            lambda _: _print_err(
                "pulsyflux sub: subscribed again after a gap (lost connection or broker restart); "
                "messages published meanwhile may be missing"
            )
        )
        in_group = f" in queue group {args.group!r}" if args.group is not None else ""
        _print_err(f"subscribed to {args.topic!r}{in_group} at {args.server}; Ctrl-C to stop")
        received = 0
        try:
            while not args.count or received < args.count:
                try:
                    message = await sub.get()
                except SubscriptionClosed as error:
                    raise CLIError(str(error)) from None
                received += 1
                report_drops()
                out.line(message_json(message) if args.json else _text(message.payload))
        finally:
            report_drops()
    finally:
        await client.close()
    return 0


async def cmd_stats(reactor: Any, args: argparse.Namespace) -> int:
    document = await _get_json(reactor, args.http_url + "/stats", args.http)
    out = _Output()
    if args.json:
        out.line(json.dumps(document, indent=2))
    else:
        for line in format_stats(document):
            out.line(line)
    return 0


async def _get_json(reactor: Any, url: str, shown: str) -> Any:
    from twisted.web.client import Agent, readBody

    agent = Agent(reactor, connectTimeout=5)
    try:
        response = await agent.request(b"GET", url.encode())
        body = await readBody(response)
    except Exception as error:
        from twisted.internet import error as net_error

        if isinstance(error, net_error.ConnectionRefusedError):
            raise CLIError(f"cannot reach the HTTP API at {shown}: connection refused (started with --http?)") from None
        raise CLIError(f"cannot reach the HTTP API at {shown}: {error}") from None
    if response.code != 200:
        raise CLIError(f"{url} answered HTTP {response.code}")
    try:
        return json.loads(body)
    except ValueError:
        raise CLIError(f"{url} did not answer JSON") from None


def format_stats(document: dict[str, Any]) -> list[str]:
    """The /stats document as a short human-readable report."""
    s = document["server"]
    roles = s["connections"]["by_role"]
    lines = [
        f"uptime          {_duration(s['uptime_seconds'])}",
        f"connections     {s['connections']['open']} open ({_count(roles.get('consumer', 0), 'consumer')}, "
        f"{_count(roles.get('provider', 0), 'provider')}, {roles.get('unregistered', 0)} unregistered), "
        f"{s['connections']['total']} since start",
        f"channels        {s['channels']['count']}{_channel_detail(s['channels'])}",
        f"requests        {s['requests']['routed']} routed, {s['requests']['responses_routed']} answered, "
        f"{s['requests']['in_flight']} in flight",
        f"bytes           {_size(s['bytes']['in'])} in, {_size(s['bytes']['out'])} out",
        f"dropped frames  {s['frames_dropped']}",
    ]
    errors = s.get("errors") or {}
    if errors:
        lines.append("errors")
        for message, count in sorted(errors.items(), key=lambda item: -_number(item[1])):
            lines.append(f"  {str(count):>8}  {printable(str(message), _STATS_TEXT_LIMIT)}")
    else:
        lines.append("errors          none")
    b = document.get("broker")
    if b is None:
        lines.append("broker          not running in this server")
        return lines
    lines.append(f"broker          {b['published']} published, {b['delivered']} delivered, {b['dropped']} dropped")
    topics = b.get("topics") or {}
    other = b.get("other_topics") or {}
    if topics:
        lines.append("topics")
        for topic, count in sorted(topics.items()):
            lines.append(f"  {printable(str(topic), _STATS_TEXT_LIMIT)}  {_count(count, 'subscriber')}")
        if other.get("topics"):
            lines.append(
                f"  ({_count(other['topics'], 'more topic')}, {_count(other.get('subscribers', 0), 'subscriber')})"
            )
    groups = b.get("groups") or []
    if groups:
        lines.append("queue groups")
        for g in groups:
            lines.append(
                f"  {printable(str(g.get('topic', '')), _STATS_TEXT_LIMIT)}  "
                f"{printable(str(g.get('group', '')), _STATS_TEXT_LIMIT)}  {_count(int(_number(g.get('members'))), 'member')}"
            )
        if b.get("groups_count", len(groups)) > len(groups):
            lines.append(f"  ({_count(b['groups_count'] - len(groups), 'more group')})")
    subs = b.get("subscriptions") or []
    if subs:
        lines.append("subscriptions (slowest first)")
        for sub in sorted(subs, key=lambda sub: -_number(sub.get("backlog")) - _number(sub.get("in_flight"))):
            # Never a channel id: it is the subscriber's secret (older servers sent it).
            label = f"{printable(str(sub['id']), 32)}  " if "id" in sub else ""
            lines.append(
                f"  {label}{printable(str(sub.get('topic', '')), _STATS_TEXT_LIMIT)}{_in_group(sub)}  "
                f"backlog {sub.get('backlog', 0)}  "
                f"in flight {sub.get('in_flight', 0)}  delivered {sub.get('delivered', 0)}  "
                f"dropped {sub.get('dropped', 0)}"
            )
        listed = b.get("subscriptions_count", len(subs))
        if listed > len(subs):
            lines.append(f"  ({_count(listed - len(subs), 'more subscription')})")
    return lines


def _in_group(sub: dict[str, Any]) -> str:
    group = sub.get("group")
    return f" (group {printable(str(group), _STATS_TEXT_LIMIT)})" if group is not None else ""


def _channel_detail(channels: dict[str, Any]) -> str:
    if "with_providers" not in channels:
        return ""
    return f" ({channels['with_providers']} with a provider, {channels.get('without_provider', 0)} without)"


# Topics and error texts in `pulsyflux stats`: at most this many characters each.
_STATS_TEXT_LIMIT = 200


def _number(value: Any) -> float:
    return value if isinstance(value, (int, float)) else 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


# -- the parser ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument(
        "--server",
        "-s",
        metavar="ADDRESS",
        default=os.environ.get(SERVER_ENV) or DEFAULT_ADDRESS,
        help=f"the server as host:port or a Twisted client endpoint (default: ${SERVER_ENV} or {DEFAULT_ADDRESS})",
    )
    group.add_argument(
        "--broker-channel",
        metavar="UUID",
        type=_channel,
        default=None,
        help=f"the broker's channel id, if the server runs it on a non-default one (default: ${BROKER_CHANNEL_ENV} "
        "or the broker's default)",
    )

    parser = argparse.ArgumentParser(
        prog="pulsyflux",
        description="Talk to a pulsyflux server: publish, subscribe, send requests, answer them, "
        "read its stats, run benchmarks.",
        epilog="Run 'pulsyflux COMMAND --help' for a command's options. Exit status: 0 ok, 1 failed, "
        "2 bad usage, 130 interrupted (Ctrl-C).",
    )
    parser.add_argument("--version", action="version", version=f"pulsyflux {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, func: Command, summary: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=summary, description=description)
        sub.set_defaults(func=func)
        return sub

    p = add(
        "pub",
        cmd_pub,
        "publish a message to a topic",
        "Publish one message to TOPIC through the broker. The message is MESSAGE, or stdin when MESSAGE "
        "is missing or '-'. Returns once the broker accepted it.",
    )
    p.add_argument("topic", metavar="TOPIC", type=_topic)
    p.add_argument("message", metavar="MESSAGE", nargs="?", help="the payload (default: read stdin)")
    p.add_argument(
        "-H",
        "--header",
        dest="headers",
        metavar="KEY=VALUE",
        type=_header,
        action="append",
        default=[],
        help="a message header; repeat for more",
    )
    p.add_argument("--timeout", type=_positive_float, default=5.0, metavar="S", help="give up after S seconds (5)")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")

    p = add(
        "sub",
        cmd_sub,
        "print the messages published to a topic",
        "Subscribe to TOPIC and print each message as it arrives, one line each: the payload as text "
        "(line breaks and invalid UTF-8 escaped), or with --json a JSON object with topic, payload and headers. "
        "TOPIC may be a pattern of '.'-separated tokens: '*' matches one token, a last '>' one or more "
        "('orders.*' gets orders.eu, 'orders.>' also orders.eu.paris; quote it for the shell); --json shows "
        "which topic each message was published to.",
    )
    p.add_argument("topic", metavar="TOPIC", type=_subscribed_topic, help="a topic, or a pattern such as 'orders.*'")
    p.add_argument(
        "--group",
        "-g",
        type=_group,
        metavar="NAME",
        help="join queue group NAME: each message goes to one member of the group (round-robin), "
        "not to every subscriber",
    )
    p.add_argument("--count", "-n", type=_positive_int, metavar="N", help="exit after N messages")
    p.add_argument("--json", action="store_true", help="print JSON lines: {topic, payload, headers}")
    p.add_argument(
        "--reconnect",
        action="store_true",
        help="when the connection to the server is lost, reconnect with backoff and subscribe again",
    )

    p = add(
        "request",
        cmd_request,
        "send one request on a channel and print the response",
        "Send DATA (or stdin, when DATA is missing or '-') as one request on CHANNEL and write the response "
        "body to stdout, byte for byte (plus a newline on a terminal).",
    )
    p.add_argument("channel", metavar="CHANNEL", type=_channel, help="the channel id (a UUID)")
    p.add_argument("data", metavar="DATA", nargs="?", help="the request body (default: read stdin)")
    p.add_argument("--timeout", "-t", type=_positive_float, default=5.0, metavar="S", help="seconds to wait (5)")
    p.add_argument("--verbose", "-v", action="store_true", help="print size and round-trip time on stderr")

    p = add(
        "reply",
        cmd_reply,
        "answer the requests sent on a channel",
        "Register a provider on CHANNEL and answer every request: --echo sends the body back; --command runs "
        "'sh -c CMD' with the body on stdin and answers with its stdout (a non-zero exit answers with an "
        "error carrying the last line of its stderr). Prints one line per request answered.",
    )
    p.add_argument("channel", metavar="CHANNEL", type=_channel, help="the channel id (a UUID)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--echo", action="store_true", help="answer each request with its own body")
    how.add_argument("--command", "-c", dest="command_line", metavar="CMD", help="answer with the output of CMD")
    p.add_argument("--count", "-n", type=_positive_int, metavar="N", help="exit after answering N requests")
    p.add_argument(
        "--command-timeout",
        type=_positive_float,
        default=30.0,
        metavar="S",
        help="kill CMD after S seconds and answer with an error (30)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing per request")
    p.add_argument(
        "--reconnect", action="store_true", help="when the connection to the server is lost, reconnect with backoff"
    )

    p = add(
        "stats",
        cmd_stats,
        "show a server's counters (needs its HTTP API)",
        "Read GET /stats from the server's HTTP API (twistd pulsyflux --http PORT) and print a summary.",
    )
    p.add_argument(
        "--http",
        metavar="HOST:PORT",
        default=None,
        help=f"the HTTP API address (default: ${HTTP_ENV}, or the --server host on port {DEFAULT_HTTP_PORT})",
    )
    p.add_argument("--json", action="store_true", help="print the raw JSON document")

    p = add(
        "bench",
        cmd_bench,
        "measure throughput and latency",
        "Run a benchmark: 'rpc' (request/response round trips through a router) or 'pubsub' (broker "
        "fan-out). Shows a progress bar when stdout is a terminal; prints msgs/s and latency percentiles, "
        "or one JSON object with --json. Run 'pulsyflux bench KIND --help' for its options.",
    )
    kinds = p.add_subparsers(dest="kind", metavar="KIND")
    for kind, (summary, description) in _BENCHES.items():
        module = _bench_module(kind)
        if module is None:
            continue
        bench = kinds.add_parser(kind, parents=[common], help=summary, description=description)
        module.add_arguments(bench)
        bench.add_argument("--json", action="store_true", help="print the whole result as one JSON object")
        bench.set_defaults(bench_module=module)
    return parser


def _finish_args(args: argparse.Namespace) -> None:
    if getattr(args, "broker_channel", None) is None:
        env = os.environ.get(BROKER_CHANNEL_ENV)
        if env:
            try:
                args.broker_channel = uuid.UUID(env)
            except ValueError:
                raise CLIError(f"${BROKER_CHANNEL_ENV}={env!r} is not a UUID", EXIT_USAGE) from None
    if args.command == "bench" and not getattr(args, "bench_module", None):
        raise CLIError("say which benchmark: pulsyflux bench rpc (or pubsub); see pulsyflux bench --help", EXIT_USAGE)
    if args.command == "stats":
        http = args.http or os.environ.get(HTTP_ENV) or http_address(args.server)
        args.http = http
        args.http_url = http.rstrip("/") if "://" in http else f"http://{http}"


_BENCHES = {
    "rpc": (
        "request/response speed through a router",
        "Start a router and an echo provider in child processes (so the numbers do not depend on what "
        "else a server is doing; --server is not used), then measure sequential round trips, requests "
        "in flight and 1 MiB echoes, next to a bare Twisted relay as the baseline.",
    ),
    "pubsub": (
        "publish/subscribe speed through the broker",
        "Start a server and its broker in a child process (--server is not used), then measure "
        "publish -> receive latency one message at a time, and deliveries per second with one publisher "
        "flooding 1 and 10 subscribers.",
    ),
}


def _bench_module(kind: str) -> Any:
    import importlib

    try:
        return importlib.import_module(f"pulsyflux.bench.{kind}")
    except ImportError:
        return None


async def cmd_bench(reactor: Any, args: argparse.Namespace) -> int:
    from ..bench.common import failures

    module = args.bench_module
    options = module.options_from_args(args)
    out = _Output()
    bar = _ProgressBar(sys.stderr, reactor) if out.isatty() and not args.json else None
    try:
        results = await module.measure(reactor, options, bar)
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        out.line(json.dumps(results, indent=2))
    else:
        out.line(module.format_report(results))
    return EXIT_ERROR if failures(results) else 0


class _ProgressBar:
    """One redrawn line on a terminal: a bar, the step, the elapsed time.

    The benchmarks report progress as messages; "run N/M" moves the bar.
    """

    _RUN = re.compile(r"\brun (\d+)/(\d+)\b")

    def __init__(self, stream: Any, reactor: Any) -> None:
        from twisted.internet.task import LoopingCall

        self.stream = stream
        self.clock = reactor
        self.started = reactor.seconds()
        self.fraction = 0.0
        self.run = self.runs = 0
        self.message = "starting"
        self.ticker = LoopingCall(self.draw)
        self.ticker.clock = reactor
        self.ticker.start(0.25)

    def __call__(self, message: str) -> None:
        match = self._RUN.search(message)
        if match:
            self.run, self.runs = int(match.group(1)), int(match.group(2))
            self.fraction = (self.run - 1) / self.runs if self.runs else 0.0
        elif self.runs:
            self.fraction = self.run / self.runs  # a run's result line: that run is done
        self.message = message
        self.draw()

    def draw(self) -> None:
        import shutil

        width = shutil.get_terminal_size((80, 24)).columns
        cells = 24
        filled = int(self.fraction * cells)
        elapsed = self.clock.seconds() - self.started
        head = f"[{'#' * filled}{'.' * (cells - filled)}] {elapsed:5.1f}s "
        line = (head + self.message)[: max(width - 1, 10)]
        try:
            self.stream.write("\r\x1b[K" + line)
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        if self.ticker.running:
            self.ticker.stop()
        try:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        except (OSError, ValueError):
            pass


def _parse(argv: Optional[Sequence[str]]) -> Union[argparse.Namespace, int]:
    """The command line as arguments, or the exit status when there is nothing to run.

    A usage error exits (SystemExit 2) with argparse's message, as ``main`` must.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        _finish_args(args)
    except CLIError as error:
        parser.exit(error.code, f"pulsyflux {args.command}: error: {error.message}\n")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``pulsyflux`` console script and ``python -m pulsyflux``."""
    args = _parse(argv)
    if isinstance(args, int):
        return args
    return _run(args.func, args)


async def run_command(reactor: Any, argv: Sequence[str]) -> int:
    """Run one command on a reactor that is already running; return its exit status.

    ``main`` without the process around it: the same parsing, output on
    ``sys.stdout``/``sys.stderr`` and one-line errors, but no ``reactor.run``
    and no signal handling (Ctrl-C is the process's). For tests and for
    programs that embed the commands; a usage error returns 2 instead of exiting.
    """
    try:
        args = _parse(argv)
    except SystemExit as exited:
        return exited.code if isinstance(exited.code, int) else EXIT_ERROR if exited.code else 0
    if isinstance(args, int):
        return args
    try:
        result = await args.func(reactor, args)
    except Exception:
        return _report(Failure(), args)
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
