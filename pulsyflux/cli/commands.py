"""The subcommands: request, reply, pub, sub, ping, info, stats and bench, each a coroutine over the public API."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional, TypeVar, Union, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProcessTransport, IReactorThreads
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from ..wire.printable import UNSAFE_BEYOND_C0, printable, printable_block
from .arguments import headers_from, payload_text, read_data
from .progress import ProgressBar
from .runner import EXIT_ERROR, EXIT_USAGE, TOKEN_ENV, CLIError, Output, describe, print_err
from .stats import format_info, format_stats, plural

if TYPE_CHECKING:
    from .._types import IReactor
    from ..broker.client import BrokerClient
    from ..broker.subscription import Subscription
    from ..wire.messages import Message

_T = TypeVar("_T")

__all__ = [
    "cmd_request",
    "cmd_reply",
    "cmd_pub",
    "message_json",
    "message_text",
    "cmd_sub",
    "cmd_ping",
    "cmd_info",
    "cmd_stats",
    "cmd_token",
    "cmd_bench",
]


async def cmd_request(reactor: IReactor, args: argparse.Namespace) -> int:
    from ..client import Consumer

    payload = read_data(args.data, "request data")
    consumer = await Consumer.connect(args.server, args.channel, reactor=reactor, token=args.token)
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
        print_err(f"{plural(len(reply), 'byte')} in {elapsed * 1000:.2f} ms")
    return 0


class _CommandProtocol(ProcessProtocol):
    """Feeds one request to a child process; collects its output."""

    transport: IProcessTransport  # set before connectionMade, as for any ProcessProtocol

    def __init__(self, stdin: bytes, done: "Deferred[tuple[bytes, bytes, BaseException]]") -> None:
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


def _command_runner(reactor: IReactor, command: str, timeout: float) -> Callable[[bytes], Awaitable[bytes]]:
    """A Provider handler that answers with ``sh -c command``'s stdout."""

    async def handle(data: bytes) -> bytes:
        done: Deferred[tuple[bytes, bytes, BaseException]] = Deferred()
        proto = _CommandProtocol(data, done)
        process = reactor.spawnProcess(proto, "/bin/sh", ["/bin/sh", "-c", command], env=os.environ)

        def kill() -> None:
            try:
                process.signalProcess("KILL")
            except Exception:  # noqa: BLE001 - it may have exited meanwhile
                pass

        timed_out = False

        def too_late() -> None:
            nonlocal timed_out
            timed_out = True
            kill()

        timer = reactor.callLater(timeout, too_late)
        try:
            out, err, ended = await done
        finally:
            if timer.active():
                timer.cancel()
        code = getattr(ended, "exitCode", None)
        if code == 0:
            return out
        if code is None:
            if timed_out:
                raise RuntimeError(f"command killed after {timeout:g} s (--command-timeout)")
            raise RuntimeError(f"command killed by {_signal_name(getattr(ended, 'signal', None))}")
        lines = err.decode("utf-8", "replace").strip().splitlines()
        detail = f": {printable(lines[-1])}" if lines else ""
        raise RuntimeError(f"command exited with status {code}{detail}")

    return handle


def _signal_name(number: Optional[int]) -> str:
    try:
        return signal.Signals(number).name if number is not None else "a signal"
    except ValueError:
        return f"signal {number}"


async def _patiently(reactor: IReactor, args: argparse.Namespace, connect: Callable[[], Awaitable[_T]]) -> _T:
    """``connect()``; with --reconnect, wait (saying so once) while the server or its broker is not up yet."""
    from twisted.internet import error as net_error
    from twisted.internet.task import deferLater

    from ..client.connection import NOT_PULSYFLUX
    from ..wire.errors import ConnectionLostError, NoProviderError

    delay = 0.1
    waiting = False
    while True:
        try:
            result = await connect()
        except (net_error.ConnectError, NoProviderError, ConnectionLostError, CLIError) as error:
            permanent = isinstance(error, net_error.DNSLookupError) or str(error).startswith(NOT_PULSYFLUX)
            if not getattr(args, "reconnect", False) or permanent:
                raise
            if not waiting:
                why = error.message if isinstance(error, CLIError) else describe(error, args)
                print_err(f"pulsyflux {args.command}: {why}; waiting for it (--reconnect; Ctrl-C to stop)")
                waiting = True
            await deferLater(reactor, delay, lambda: None)
            delay = min(delay * 2, 2.0)
            continue
        if waiting:
            print_err(f"pulsyflux {args.command}: connected to {args.server}")
        return result


async def cmd_reply(reactor: IReactor, args: argparse.Namespace) -> int:
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

    provider = await _patiently(
        reactor,
        args,
        lambda: Provider.connect(
            args.server, args.channel, handler=handler, reactor=reactor, reconnect=args.reconnect, token=args.token
        ),
    )
    if args.reconnect:
        lost_at = [0.0]

        def lost(why: str) -> None:
            lost_at[0] = reactor.seconds()
            print_err(
                f"pulsyflux reply: lost the connection to {args.server} ({printable(why, 200)}); reconnecting. "
                "Requests sent meanwhile get 'peer disappeared' (or another provider)"
            )

        provider.on_disconnect(lost)
        provider.on_reconnect(
            lambda _: print_err(
                f"pulsyflux reply: reconnected to {args.server} after {reactor.seconds() - lost_at[0]:.1f} s; "
                "answering again"
            )
        )
    mode = "echo" if inner is None else f"sh -c {args.command_line!r}"
    print_err(f"replying on channel {args.channel} at {args.server} ({mode}); Ctrl-C to stop")
    closed = provider.when_lost()
    try:
        if await _first(closed, all_answered) == 0:
            raise CLIError(f"lost the connection to {args.server}")
    finally:
        await provider.close()
    return 0


async def _first(*deferreds: "Deferred[_T]") -> int:
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


async def _broker_client(reactor: IReactor, args: argparse.Namespace, reconnect: bool = False) -> BrokerClient:
    from ..broker.client import BrokerClient
    from ..broker.link import DEFAULT_BROKER_CHANNEL
    from ..wire.errors import NoProviderError

    channel = args.broker_channel or DEFAULT_BROKER_CHANNEL

    async def connect() -> BrokerClient:
        try:
            return await BrokerClient.connect(
                args.server, channel, reactor=reactor, reconnect=reconnect, token=args.token
            )
        except NoProviderError:
            raise CLIError(
                f"no broker answers on channel {channel} at {args.server} "
                "(started with --no-broker, or on another --broker-channel?)"
            ) from None

    return await _patiently(reactor, args, connect)


async def cmd_pub(reactor: IReactor, args: argparse.Namespace) -> int:
    headers = headers_from(args.headers)
    if args.lines and args.message not in (None, "-"):
        raise CLIError("--lines publishes the lines of stdin: give no MESSAGE with it", EXIT_USAGE)
    payload = b"" if args.lines else read_data(args.message, "message")
    if args.lines and (sys.stdin is None or sys.stdin.isatty()):
        print_err("pulsyflux pub: publishing each line typed (Ctrl-D to end)")
    client = await _broker_client(reactor, args)
    sent = size = 0
    position = None  # of the last message, from a broker with history
    try:
        if args.lines:
            from twisted.internet.threads import deferToThreadPool

            read = sys.stdin.buffer.readline
            threaded = cast(IReactorThreads, reactor)  # every reactor Twisted installs has threads
            pool = threaded.getThreadPool()
            while True:
                line = await deferToThreadPool(threaded, pool, read)  # the reactor keeps running meanwhile
                if not line:
                    break
                line = line[:-1] if line.endswith(b"\n") else line
                for _ in range(args.count):
                    position = await client.publish(args.topic, line, headers, timeout=args.timeout)
                    sent += 1
                    size += len(line)
        else:
            for _ in range(args.count):
                position = await client.publish(args.topic, payload, headers, timeout=args.timeout)
                sent += 1
                size += len(payload)
    finally:
        await client.close()
    if not args.quiet:
        at = f" at {position}" if position is not None else ""  # a broker with history gives positions
        if sent == 1:
            print_err(f"published {plural(size, 'byte')} to {args.topic!r}{at}")
        else:
            last = f", the last{at}" if at else ""
            print_err(f"published {plural(sent, 'message')} ({plural(size, 'byte')}) to {args.topic!r}{last}")
    return 0


def message_json(message: Message) -> str:
    """One message as a JSON line: payload as text, or base64 when it is not UTF-8."""
    import base64

    line: dict[str, Any] = {"topic": message.topic}
    try:
        line["payload"] = message.payload.decode("utf-8")
    except UnicodeDecodeError:
        line["payload_base64"] = base64.b64encode(message.payload).decode("ascii")
    line["headers"] = dict(message.headers or {})
    position = message.position
    if position is not None:
        line["position"] = str(position)  # what --since takes back
    text = json.dumps(line, ensure_ascii=False)
    # JSON escapes C0 controls but lets DEL, C1 controls, line separators and
    # bidi overrides through raw: a terminal may act on them. Outside strings
    # the text is ASCII, so escaping them as \uXXXX keeps the very same JSON.
    if UNSAFE_BEYOND_C0.search(text) is not None:
        text = UNSAFE_BEYOND_C0.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text


def message_text(message: Message) -> str:
    """One message as a line of text: ``topic [k=v ...]: payload``, each part escaped and bounded."""
    headers = message.headers or {}
    shown = " ".join(f"{printable(str(k), 100)}={printable(str(v), 200)}" for k, v in sorted(headers.items()))
    label = printable(message.topic, 200) + (f" [{shown}]" if shown else "")
    return f"{label}: {payload_text(message.payload)}"


async def cmd_sub(reactor: IReactor, args: argparse.Namespace) -> int:
    from twisted.internet.defer import CancelledError, DeferredQueue
    from twisted.internet.error import ConnectError
    from twisted.internet.task import deferLater

    from ..broker.link import BROKER_CLOSED
    from ..broker.subscription import SubscriptionClosed
    from ..wire.errors import PulsyfluxError

    out = Output()
    reported: dict[str, int] = {}
    subs: list[Subscription] = []
    lost_at: dict[str, float] = {}
    gaps: dict[str, int] = {}  # times each topic's broker was lost
    topics = list(dict.fromkeys(args.topics))  # each once, in the order given

    def report_drops(sub: Subscription) -> None:
        # Never lose messages without a trace: say so as soon as we know.
        done = reported.get(sub.topic, 0)
        if sub.dropped > done:
            count = sub.dropped - done
            print_err(
                f"pulsyflux sub: the broker dropped {plural(count, 'message')} of {sub.topic!r} for us "
                "(reading too slowly)"
            )
            reported[sub.topic] = sub.dropped

    def lost(sub: Subscription, why: str) -> None:
        if sub.topic in lost_at:
            return  # told already (the broker's closing notice, then the line dropping)
        lost_at[sub.topic] = reactor.seconds()
        gaps[sub.topic] = gaps.get(sub.topic, 0) + 1
        print_err(
            f"pulsyflux sub: lost the broker for {sub.topic!r} ({printable(why, 200)}); reconnecting. "
            "Messages published until it is back may be missed"
        )

    def back(sub: Subscription) -> None:
        since = lost_at.pop(sub.topic, None)
        after = f" after {reactor.seconds() - since:.1f} s" if since is not None else ""
        if sub.kept:
            missed = "the broker kept what was published meanwhile"
        elif sub.position is not None and sub.recovered:
            missed = "the broker replayed what was published meanwhile from its history"
        else:
            missed = "it had restarted: messages published meanwhile were missed"
        print_err(f"pulsyflux sub: subscribed to {sub.topic!r} again{after}; {missed} (gap {gaps.get(sub.topic, 0)})")

    client = await _broker_client(reactor, args, reconnect=args.reconnect)
    try:
        if args.since is not None and len(topics) > 1:
            raise CLIError("--since takes one TOPIC (a position counts in its own topic)")
        for topic in topics:
            sub = await client.subscribe(topic, group=args.group, since=args.since, last=args.last)
            if (args.since is not None or args.last is not None) and not sub.recovered:
                print_err(
                    f"pulsyflux sub: the broker could not replay everything asked for of {topic!r} "
                    "(it keeps no history, restarted, or no longer has those messages)"
                )
            sub.on_lost(lost)
            sub.on_resume(back)
            subs.append(sub)
        shown = ", ".join(repr(topic) for topic in topics)
        in_group = f" in queue group {args.group!r}" if args.group is not None else ""
        print_err(f"subscribed to {shown}{in_group} at {args.server}; Ctrl-C to stop")
        queue: DeferredQueue[Union[BaseException, tuple[Subscription, Message]]] = DeferredQueue()

        async def pump(sub: Subscription) -> None:
            while True:
                try:
                    message = await sub.get()
                except SubscriptionClosed as error:
                    if args.reconnect and sub.closed_reason == BROKER_CLOSED:
                        # The broker shut down (twistd stopped, to be started again): an
                        # ordinary restart. Wait for a broker and subscribe afresh.
                        lost(sub, BROKER_CLOSED)
                        sub = await resubscribe(sub)
                        continue
                    queue.put(error)
                    return
                queue.put((sub, message))

        async def resubscribe(old: Subscription) -> Subscription:
            delay = 0.1
            while True:
                try:
                    # From where the old stream stood: a broker with history replays the gap.
                    sub = await client.subscribe(old.topic, group=args.group, since=old.position)
                except (PulsyfluxError, ConnectError):  # the server or its broker is not back yet
                    await deferLater(reactor, delay, lambda: None)
                    delay = min(delay * 2, 2.0)
                    continue
                sub.on_lost(lost)
                sub.on_resume(back)
                subs[subs.index(old)] = sub
                reported[sub.topic] = 0
                sub.kept = False  # a new subscription on a new broker: what was published meanwhile is gone
                back(sub)
                return sub

        def failed(failure: Failure) -> None:
            if not failure.check(CancelledError):
                queue.put(failure.value)  # the command ends with it, rather than wait forever

        pumps = [Deferred.fromCoroutine(pump(sub)).addErrback(failed) for sub in subs]
        received = 0
        try:
            while not args.count or received < args.count:
                item = await queue.get()
                if isinstance(item, SubscriptionClosed):
                    raise CLIError(str(item))
                if isinstance(item, BaseException):
                    raise item
                sub, message = item
                received += 1
                report_drops(sub)
                if args.json:
                    out.line(message_json(message))
                elif args.raw:
                    out.line(payload_text(message.payload))
                else:
                    out.line(message_text(message))
        finally:
            for sub in subs:
                report_drops(sub)
            for d in pumps:
                d.cancel()
    finally:
        await client.close()
    return 0


async def cmd_ping(reactor: IReactor, args: argparse.Namespace) -> int:
    """Round trips to the server itself over its pulsyflux port (no provider, no HTTP)."""
    from twisted.internet.task import deferLater

    from ..client import Consumer

    started = reactor.seconds()
    # A fresh random channel: registering there reveals and touches nothing.
    consumer = await Consumer.connect(args.server, uuid.uuid4(), reactor=reactor, token=args.token)
    out = Output()
    times: list[float] = []
    try:
        for n in range(args.count):
            if n:
                await deferLater(reactor, args.interval, lambda: None)
            seconds = await consumer.ping(timeout=args.timeout)
            times.append(seconds)
            extra = f" (connected in {(reactor.seconds() - started - seconds) * 1000:.2f} ms)" if n == 0 else ""
            out.line(f"PONG from {args.server}: seq={n + 1} time={seconds * 1000:.3f} ms{extra}")
    finally:
        await consumer.close()
    if len(times) > 1:
        ms = sorted(t * 1000 for t in times)
        out.line(
            f"{plural(len(ms), 'ping')}, round trip min/avg/max = {ms[0]:.3f}/{sum(ms) / len(ms):.3f}/{ms[-1]:.3f} ms"
        )
    return 0


async def cmd_info(reactor: IReactor, args: argparse.Namespace) -> int:
    document = await _get_json(reactor, args.http_url + "/stats", args.http, args.token)
    out = Output()
    if args.json:
        server = document.get("server", {})
        keys = ("version", "pid", "started", "uptime_seconds", "rss_bytes", "open_fds", "cpu_seconds", "limits")
        summary = {key: server.get(key) for key in keys}
        summary["connections"] = {k: v for k, v in server.get("connections", {}).items() if k != "list"}
        if "cluster" in document:
            summary["cluster"] = document["cluster"]
        out.line(json.dumps(summary, indent=2))
    else:
        for line in format_info(document):
            out.line(line)
    return 0


async def cmd_token(reactor: IReactor, args: argparse.Namespace) -> int:
    """Mint a token (no server involved): the operator's side of --auth."""
    from ..auth.config import AuthConfigError, load_signing_key
    from ..auth.grants import GrantError, Grants
    from ..auth.tokens import mint

    rules: dict[str, Any] = {}
    for right in ("provide", "consume", "publish", "subscribe"):
        given = getattr(args, right)
        if given:
            rules[right] = given
    if args.stats:
        rules["stats"] = True
    try:
        key = load_signing_key(args.key, args.kid)
        grants = Grants(rules)
        token = mint(key, grants, args.ttl, subject=args.subject, jti=args.id)
    except (AuthConfigError, GrantError, ValueError) as error:
        raise CLIError(str(error), EXIT_USAGE) from None
    out = Output()
    if args.json:
        expires = int(time.time() + args.ttl)
        out.line(json.dumps({"token": token, "kid": key.kid, "expires": expires, "grants": grants.as_dict()}))
    else:
        out.line(token)
    return 0


async def cmd_stats(reactor: IReactor, args: argparse.Namespace) -> int:
    document = await _get_json(reactor, args.http_url + "/stats", args.http, args.token)
    out = Output()
    if args.json:
        out.line(json.dumps(document, indent=2))
    else:
        for line in format_stats(document):
            out.line(line)
    return 0


async def _get_json(reactor: IReactor, url: str, shown: str, token: Optional[str] = None) -> dict[str, Any]:
    from twisted.web.client import Agent, readBody
    from twisted.web.http_headers import Headers

    agent = Agent(reactor, connectTimeout=5)
    headers = Headers({b"authorization": [b"Bearer " + token.encode("ascii", "replace")]}) if token else None
    try:
        response = await agent.request(b"GET", url.encode(), headers)
        body = await readBody(response)
    except Exception as error:
        from twisted.internet import error as net_error

        if isinstance(error, net_error.ConnectionRefusedError):
            raise CLIError(f"cannot reach the HTTP API at {shown}: connection refused (started with --http?)") from None
        raise CLIError(f"cannot reach the HTTP API at {shown}: {error}") from None
    if response.code in (401, 403):
        try:
            said = str(json.loads(body).get("error", ""))
        except (ValueError, AttributeError):
            said = ""
        hint = "" if token else f" (give a token: --token or ${TOKEN_ENV})"
        raise CLIError(f"{url} answered HTTP {response.code}: {printable(said, 300) or 'permission denied'}{hint}")
    if response.code != 200:
        raise CLIError(f"{url} answered HTTP {response.code}")
    try:
        document = json.loads(body)
    except ValueError:
        raise CLIError(f"{url} did not answer JSON") from None
    if not isinstance(document, dict):
        raise CLIError(f"{url} did not answer a JSON object")
    return document


async def cmd_bench(reactor: IReactor, args: argparse.Namespace) -> int:
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
