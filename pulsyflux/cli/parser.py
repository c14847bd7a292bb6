"""The argument parser: every command and option, with help text, and the environment defaults."""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from typing import Any, Optional, Sequence, Union

from .. import __version__
from ..endpoints import DEFAULT_ADDRESS, DEFAULT_HTTP_PORT, http_address
from .arguments import (
    parse_channel,
    parse_group,
    parse_header,
    parse_subscribed_topic,
    parse_topic,
    positive_float,
    positive_int,
)
from .commands import cmd_bench, cmd_pub, cmd_reply, cmd_request, cmd_stats, cmd_sub
from .runner import EXIT_USAGE, CLIError, Command

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
}


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
        type=parse_channel,
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
        help="a message header; repeat for more",
    )
    p.add_argument("--timeout", type=positive_float, default=5.0, metavar="S", help="give up after S seconds (5)")
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
    p.add_argument(
        "topic", metavar="TOPIC", type=parse_subscribed_topic, help="a topic, or a pattern such as 'orders.*'"
    )
    p.add_argument(
        "--group",
        "-g",
        type=parse_group,
        metavar="NAME",
        help="join queue group NAME: each message goes to one member of the group (round-robin), "
        "not to every subscriber",
    )
    p.add_argument("--count", "-n", type=positive_int, metavar="N", help="exit after N messages")
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
    if args.command == "stats":
        http = args.http or os.environ.get(HTTP_ENV) or http_address(args.server)
        args.http = http
        args.http_url = http.rstrip("/") if "://" in http else f"http://{http}"


def _bench_module(kind: str) -> Any:
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
