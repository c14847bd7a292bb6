"""The subcommands: request, reply, pub, sub, stats and bench, each a coroutine over the public API."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Awaitable, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from ..wire.printable import UNSAFE_BEYOND_C0, printable, printable_block
from .arguments import payload_text, read_data
from .progress import ProgressBar
from .runner import EXIT_ERROR, CLIError, Output, print_err
from .stats import format_stats, plural

__all__ = ["cmd_request", "cmd_reply", "cmd_pub", "message_json", "cmd_sub", "cmd_stats", "cmd_bench"]


async def cmd_request(reactor: Any, args: argparse.Namespace) -> int:
    from ..client import Consumer

    payload = read_data(args.data, "request data")
    consumer = await Consumer.connect(args.server, args.channel, reactor=reactor)
    try:
        started = time.perf_counter()
        reply = await consumer.send(payload, timeout=args.timeout)
        elapsed = time.perf_counter() - started
    finally:
        await consumer.close()
    out = Output()
    if out.isatty():
        # A terminal acts on escapes the provider put in its answer: show them instead.
        shown = printable_block(reply).encode("utf-8", "backslashreplace")
        out.write(shown if shown.endswith(b"\n") else shown + b"\n")
    else:
        out.write(reply)  # byte for byte
    if args.verbose:
        print_err(f"{len(reply)} bytes in {elapsed * 1000:.2f} ms")
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

    out = Output()
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
                out.line(f"#{answered} {payload_text(data)}")
            if args.count and answered >= args.count and not all_answered.called:
                reactor.callLater(0, all_answered.callback, None)  # after this answer is written

    provider = await Provider.connect(
        args.server, args.channel, handler=handler, reactor=reactor, reconnect=args.reconnect
    )
    if args.reconnect:
        provider.on_reconnect(lambda _: print_err(f"pulsyflux reply: reconnected to {args.server}"))
    mode = "echo" if inner is None else f"sh -c {args.command_line!r}"
    print_err(f"replying on channel {args.channel} at {args.server} ({mode}); Ctrl-C to stop")
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
    payload = read_data(args.message, "message")
    headers = dict(args.headers) or None
    client = await _broker_client(reactor, args)
    try:
        await client.publish(args.topic, payload, headers, timeout=args.timeout)
    finally:
        await client.close()
    if not args.quiet:
        print_err(f"published {len(payload)} bytes to {args.topic!r}")
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

    out = Output()
    reported = 0

    def report_drops() -> None:
        # Never lose messages without a trace: say so as soon as we know.
        nonlocal reported
        if sub.dropped > reported:
            count = sub.dropped - reported
            print_err(f"pulsyflux sub: the broker dropped {plural(count, 'message')} for us (reading too slowly)")
            reported = sub.dropped

    client = await _broker_client(reactor, args, reconnect=args.reconnect)
    try:
        sub = await client.subscribe(args.topic, group=args.group)
        sub.on_resume(
            lambda _: print_err(
                "pulsyflux sub: subscribed again after a gap (lost connection or broker restart); "
                "messages published meanwhile may be missing"
            )
        )
        in_group = f" in queue group {args.group!r}" if args.group is not None else ""
        print_err(f"subscribed to {args.topic!r}{in_group} at {args.server}; Ctrl-C to stop")
        received = 0
        try:
            while not args.count or received < args.count:
                try:
                    message = await sub.get()
                except SubscriptionClosed as error:
                    raise CLIError(str(error)) from None
                received += 1
                report_drops()
                out.line(message_json(message) if args.json else payload_text(message.payload))
        finally:
            report_drops()
    finally:
        await client.close()
    return 0


async def cmd_stats(reactor: Any, args: argparse.Namespace) -> int:
    document = await _get_json(reactor, args.http_url + "/stats", args.http)
    out = Output()
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


async def cmd_bench(reactor: Any, args: argparse.Namespace) -> int:
    from ..bench.common import failures

    module = args.bench_module
    options = module.options_from_args(args)
    out = Output()
    bar = ProgressBar(sys.stderr, reactor) if out.isatty() and not args.json else None
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
