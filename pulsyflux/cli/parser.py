"""The argument parser: every command and option, with help text, and the environment defaults."""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from types import ModuleType
from typing import Any, Optional, Sequence, Union

from .. import __version__
from ..endpoints import DEFAULT_ADDRESS, DEFAULT_HTTP_PORT, http_address
from ..wire.printable import printable
from .arguments import (
    count_int,
    parse_channel,
    parse_group,
    parse_header,
    parse_position,
    parse_subscribed_topic,
    parse_topic,
    parse_ttl,
    positive_float,
    positive_int,
)
from .commands import cmd_bench, cmd_info, cmd_ping, cmd_pub, cmd_reply, cmd_request, cmd_stats, cmd_sub, cmd_token
from .runner import EXIT_USAGE, TOKEN_ENV, CLIError, Command

__all__ = ["SERVER_ENV", "BROKER_CHANNEL_ENV", "HTTP_ENV", "build_parser", "finish_args", "parse_args"]


SERVER_ENV = "PULSYFLUX_SERVER"
BROKER_CHANNEL_ENV = "PULSYFLUX_BROKER_CHANNEL"
HTTP_ENV = "PULSYFLUX_HTTP"
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
    "cluster": (
        "pub/sub and requests across two servers sharing a Redis",
        "Start a redis-server and two servers with --cluster in child processes (--server is not used), then "
        "measure publish -> receive latency and a 1->1 flood from one server to the other, requests in flight "
        "from one to a provider on the other, and the CPU each process spends per message and per request.",
    ),
    "capacity": (
        "what the server sustains, loaded from several processes",
        "Start a server and its broker in a child process (--server-python picks its interpreter; --server "
        "is not used), load it from publisher and subscriber processes with 1 to 10,000 subscribers and "
        "several message sizes, and report messages and deliveries per second, the server's CPU per "
        "message and per delivery, and its idle memory per connection and per subscription.",
    ),
}


class _CommandParser(argparse.ArgumentParser):
    """A command's parser: options go anywhere, also between positionals.

    ``pulsyflux pub orders -H k=v 'new order'`` and ``request CH -t 1 hello``
    parse as users mean them (argparse's intermixed parsing); what is left
    over is this command's error, shown with this command's usage.
    """

    _inner = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._inner or any(isinstance(action, argparse._SubParsersAction) for action in self._actions):
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            namespace, extras = self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


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
        "--token",
        metavar="JWT",
        default=os.environ.get(TOKEN_ENV) or None,
        help=f"the token to present to a server started with --auth (default: ${TOKEN_ENV}); see 'pulsyflux token'",
    )
    brokered = argparse.ArgumentParser(add_help=False)
    group = brokered.add_argument_group("broker")
    group.add_argument(
        "--broker-channel",
        metavar="UUID",
        type=parse_channel,
        default=None,
        help=f"the broker's channel id, if the server runs it on a non-default one (default: ${BROKER_CHANNEL_ENV} "
        "or the broker's default)",
    )

    parser = argparse.ArgumentParser(
        prog="pulsyflux",
        description="Talk to a pulsyflux server: publish, subscribe, send requests, answer them, "
        "ping it, read its info and stats, run benchmarks.",
        epilog="Run 'pulsyflux COMMAND --help' for a command's options. Exit status: 0 ok, 1 failed, "
        "2 bad usage, 130 interrupted (Ctrl-C).",
    )
    parser.add_argument("--version", action="version", version=f"pulsyflux {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)

    def add(
        name: str, func: Command, summary: str, description: str, parents: Sequence[argparse.ArgumentParser] = ()
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=list(parents), help=summary, description=description)  # type: ignore[arg-type]
        sub.set_defaults(func=func)
        return sub

    p = add(
        "pub",
        cmd_pub,
        "publish a message to a topic",
        "Publish MESSAGE to TOPIC through the broker (stdin when MESSAGE is missing or '-'; with --lines, each "
        "line of stdin as its own message). Returns once the broker accepted every message.",
        [common, brokered],
    )
    p.add_argument("topic", metavar="TOPIC", type=parse_topic)
    p.add_argument("message", metavar="MESSAGE", nargs="?", help="the payload (default: read stdin)")
    p.add_argument(
        "-H",
        "--header",
        dest="headers",
        metavar="KEY=VALUE",
        type=parse_header,
        action="append",
        default=[],
        help="a message header; repeat for more (each key once: a header has one value)",
    )
    p.add_argument("--count", "-n", type=positive_int, default=1, metavar="N", help="publish the message N times (1)")
    p.add_argument("--lines", action="store_true", help="publish each line of stdin as one message, as it is read")
    p.add_argument("--timeout", type=positive_float, default=5.0, metavar="S", help="give up after S seconds (5)")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")

    p = add(
        "sub",
        cmd_sub,
        "print the messages published to one or more topics",
        "Subscribe to each TOPIC and print every message as it arrives, one line each: 'topic [k=v ...]: "
        "payload' (line breaks and invalid UTF-8 escaped), only the payload with --raw, or with --json a JSON "
        "object with topic, payload and headers. A TOPIC may be a pattern of '.'-separated tokens: '*' matches "
        "one token, a last '>' one or more ('orders.*' gets orders.eu, 'orders.>' also orders.eu.paris; quote "
        "it for the shell); each line shows which topic a message was published to.",
        [common, brokered],
    )
    p.add_argument(
        "topics",
        metavar="TOPIC",
        nargs="+",
        type=parse_subscribed_topic,
        help="a topic, or a pattern such as 'orders.*'; give several to subscribe to each",
    )
    p.add_argument(
        "--group",
        "-g",
        type=parse_group,
        metavar="NAME",
        help="join queue group NAME: each message goes to one member of the group (round-robin), "
        "not to every subscriber",
    )
    p.add_argument("--count", "-n", type=positive_int, metavar="N", help="exit after N messages (all topics)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument(
        "--json",
        action="store_true",
        help="print JSON lines: {topic, payload, headers}, and position (EPOCH:SEQ) when the broker keeps history",
    )
    shape.add_argument("--raw", action="store_true", help="print only each payload (as text)")
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--last",
        type=count_int,
        metavar="N",
        help="start with the last N messages the broker retained for TOPIC (twistd pulsyflux --history), then go on",
    )
    start.add_argument(
        "--since",
        type=parse_position,
        metavar="EPOCH:SEQ",
        help="start after this position (as --json prints it): the retained messages after it, then go on; "
        "says so on stderr when the broker no longer has them all",
    )
    p.add_argument(
        "--reconnect",
        action="store_true",
        help="wait for the server if it is down, survive its restarts (reconnect and subscribe again, "
        "from the last position received when the broker keeps history), "
        "and say on stderr when it is lost and back",
    )

    p = add(
        "request",
        cmd_request,
        "send one request on a channel and print the response",
        "Send DATA (or stdin, when DATA is missing or '-') as one request on CHANNEL and write the response "
        "body to stdout, byte for byte (plus a newline on a terminal).",
        [common],
    )
    p.add_argument("channel", metavar="CHANNEL", type=parse_channel, help="the channel id (a UUID)")
    p.add_argument("data", metavar="DATA", nargs="?", help="the request body (default: read stdin)")
    p.add_argument("--timeout", "-t", type=positive_float, default=5.0, metavar="S", help="seconds to wait (5)")
    p.add_argument("--verbose", "-v", action="store_true", help="print size and round-trip time on stderr")

    p = add(
        "reply",
        cmd_reply,
        "answer the requests sent on a channel",
        "Register a provider on CHANNEL and answer every request: --echo sends the body back; --command runs "
        "'sh -c CMD' with the body on stdin and answers with its stdout (a non-zero exit answers with an "
        "error carrying the last line of its stderr). Prints one line per request answered.",
        [common],
    )
    p.add_argument("channel", metavar="CHANNEL", type=parse_channel, help="the channel id (a UUID)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--echo", action="store_true", help="answer each request with its own body")
    how.add_argument("--command", "-c", dest="command_line", metavar="CMD", help="answer with the output of CMD")
    p.add_argument("--count", "-n", type=positive_int, metavar="N", help="exit after answering N requests")
    p.add_argument(
        "--command-timeout",
        type=positive_float,
        default=30.0,
        metavar="S",
        help="kill CMD after S seconds and answer with an error (30)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing per request")
    p.add_argument(
        "--reconnect",
        action="store_true",
        help="wait for the server if it is down, reconnect when the connection drops, and say so on stderr",
    )

    p = add(
        "ping",
        cmd_ping,
        "measure round trips to the server (its pulsyflux port; no HTTP needed)",
        "Connect to the server and time round trips to the server itself (no provider involved): each "
        "ping is a frame the server answers at once, after everything sent before it (docs/protocol.md).",
        [common],
    )
    p.add_argument("--count", "-c", type=positive_int, default=1, metavar="N", help="send N pings (1)")
    p.add_argument("--interval", "-i", type=positive_float, default=1.0, metavar="S", help="seconds between pings (1)")
    p.add_argument("--timeout", "-t", type=positive_float, default=5.0, metavar="S", help="seconds to wait (5)")

    for name, func, summary, description, json_help in (
        (
            "info",
            cmd_info,
            "show who a server is: version, uptime, limits, connections (needs its HTTP API)",
            "Read GET /stats from the server's HTTP API (twistd pulsyflux --http PORT) and print the server's "
            "version, pid, uptime, memory and open files, its configured limits and its busiest connections.",
            "print those fields as JSON",
        ),
        (
            "stats",
            cmd_stats,
            "show a server's counters (needs its HTTP API)",
            "Read GET /stats from the server's HTTP API (twistd pulsyflux --http PORT) and print a summary.",
            "print the raw JSON document",
        ),
    ):
        p = add(name, func, summary, description, [common])
        p.add_argument(
            "--http",
            metavar="HOST:PORT",
            default=None,
            help=f"the HTTP API address (default: ${HTTP_ENV}, or the --server host on port {DEFAULT_HTTP_PORT})",
        )
        p.add_argument("--json", action="store_true", help=json_help)

    p = add(
        "token",
        cmd_token,
        "mint a token for a server started with --auth",
        "Sign a token (a JWT) with the key in FILE granting the rights given, and print it. FILE is an "
        "Ed25519 private key (PEM, with --kid), one key entry as in an auth file, or the auth file itself "
        "(its HS256 key named by --kid, else the first). Channel rules are UUIDs or '*'; topic rules use the "
        "broker's patterns ('orders.>', 'orders.*.eu'); a rule starting with '!' denies. Each option can "
        "be repeated. See docs/security.md.",
    )
    p.add_argument("--key", "-k", required=True, metavar="FILE", help="the signing key (see above)")
    p.add_argument("--kid", metavar="ID", help="the key id the server knows the key by")
    p.add_argument("--provide", action="append", metavar="CHANNEL", help="may register as provider on CHANNEL")
    p.add_argument("--consume", action="append", metavar="CHANNEL", help="may send requests on CHANNEL")
    p.add_argument("--publish", action="append", metavar="PATTERN", help="may publish to topics PATTERN matches")
    p.add_argument(
        "--subscribe", action="append", metavar="PATTERN", help="may subscribe to PATTERN or anything inside it"
    )
    p.add_argument("--stats", action="store_true", help="may read /stats and /metrics when they need a token")
    p.add_argument("--ttl", type=parse_ttl, default=3600.0, metavar="DURATION", help="lifetime: 90s, 30m, 1h, 7d (1h)")
    p.add_argument("--subject", metavar="NAME", help="who the token names (logs, refusals, revocation)")
    p.add_argument("--id", metavar="JTI", help="the token's id, what a revocation names (default: random)")
    p.add_argument("--json", action="store_true", help="print {token, kid, expires, grants} as JSON")

    p = add(
        "bench",
        cmd_bench,
        "measure throughput and latency",
        "Run a benchmark: 'rpc' (request/response round trips through a router), 'pubsub' (broker "
        "fan-out), 'cluster' (two servers sharing a Redis) or 'capacity' (the server loaded from several "
        "processes). Shows a progress bar when stdout is a terminal; prints msgs/s and latency percentiles, "
        "or one JSON object with --json. Run 'pulsyflux bench KIND --help' for its options.",
    )
    kinds = p.add_subparsers(dest="kind", metavar="KIND")
    for kind, (summary, description) in _BENCHES.items():
        module = _bench_module(kind)
        if module is None:
            continue
        bench = kinds.add_parser(kind, help=summary, description=description)
        module.add_arguments(bench)
        bench.add_argument("--json", action="store_true", help="print the whole result as one JSON object")
        bench.set_defaults(bench_module=module)
    return parser


def finish_args(args: argparse.Namespace) -> None:
    if getattr(args, "broker_channel", None) is None:
        env = os.environ.get(BROKER_CHANNEL_ENV)
        if env:
            try:
                args.broker_channel = uuid.UUID(env)
            except ValueError:
                raise CLIError(f"${BROKER_CHANNEL_ENV}={env!r} is not a UUID", EXIT_USAGE) from None
    if args.command == "bench" and not getattr(args, "bench_module", None):
        raise CLIError("say which benchmark: pulsyflux bench rpc (or pubsub); see pulsyflux bench --help", EXIT_USAGE)
    if args.command in ("stats", "info"):
        http = args.http or os.environ.get(HTTP_ENV) or http_address(args.server)  # only its host is used
        args.http = http
        args.http_url = http.rstrip("/") if "://" in http else f"http://{http}"
    elif hasattr(args, "server"):
        _check_server(args)


def _check_server(args: argparse.Namespace) -> None:
    """A --server that cannot work is a usage error, said in one line before anything connects."""
    from ..endpoints import address_problem

    problem = address_problem(args.server)
    if problem is not None:
        source = "--server" if os.environ.get(SERVER_ENV) != args.server else f"${SERVER_ENV}"
        raise CLIError(f"{source} {printable(args.server, 200)!r}: {problem}", EXIT_USAGE)


def _bench_module(kind: str) -> Optional[ModuleType]:
    import importlib

    try:
        return importlib.import_module(f"pulsyflux.bench.{kind}")
    except ImportError:
        return None


def parse_args(argv: Optional[Sequence[str]]) -> Union[argparse.Namespace, int]:
    """The command line as arguments, or the exit status when there is nothing to run.

    A usage error exits (SystemExit 2) with argparse's message, as ``main`` must.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        finish_args(args)
    except CLIError as error:
        parser.exit(error.code, f"pulsyflux {args.command}: error: {error.message}\n")
    return args
