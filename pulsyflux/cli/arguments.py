"""Argument types of the command line: each checks one value by the rule its owner uses."""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from typing import TYPE_CHECKING, Optional

from ..wire.printable import printable_bytes
from .runner import EXIT_USAGE, CLIError

if TYPE_CHECKING:
    from ..wire.messages import Position


_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> float:
    """A lifetime: seconds, or a number with s, m, h or d (``90s``, ``30m``, ``1h``, ``7d``)."""
    unit = _TTL_UNITS.get(text[-1:].lower()) if text else None
    number = text[:-1] if unit else text
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        seconds = 0.0
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"a lifetime is a positive number of seconds or 30m, 1h, 7d; not {text!r}")
    return seconds


__all__ = [
    "parse_channel",
    "headers_from",
    "positive_float",
    "positive_int",
    "parse_topic",
    "parse_subscribed_topic",
    "parse_group",
    "parse_header",
    "read_data",
    "payload_text",
]


def parse_channel(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a channel id: channels are UUIDs, e.g. {uuid.UUID(int=0x1)}"
        ) from None


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def _whole_number(text: str, least: int, words: str) -> int:
    """``text`` as a whole number >= ``least``, or the one-line error argparse shows (``words``: the bound)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be {words}, not {text}")
    return value


def positive_int(text: str) -> int:
    return _whole_number(text, 1, "at least 1")


def parse_topic(text: str, subscribing: bool = False) -> str:
    """A topic to publish to, checked by the broker's own rule, so the CLI never disagrees with it."""
    from ..wire.messages import topic_problem

    problem = topic_problem(text, subscribing)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def parse_subscribed_topic(text: str) -> str:
    """A topic to subscribe to (the rule is stricter: bounded, no control characters)."""
    return parse_topic(text, subscribing=True)


def parse_position(text: str) -> "Position":
    """EPOCH:SEQ, as ``--json`` prints it and ``pulsyflux pub`` reports it."""
    from ..wire.messages import Position

    try:
        return Position.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def count_int(text: str) -> int:
    """A whole number >= 0."""
    return _whole_number(text, 0, "0 or more")


def parse_group(text: str) -> str:
    """A queue group name, checked by the broker's own rule."""
    from ..wire.messages import group_problem

    problem = group_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def parse_header(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"header {text!r} is not key=value")
    return key, value


def headers_from(pairs: list[tuple[str, str]]) -> Optional[dict[str, str]]:
    """-H options as message headers; a key given twice is a usage error (a header holds one value)."""
    headers: dict[str, str] = {}
    for key, value in pairs:
        if key in headers:
            raise CLIError(
                f"header {key!r} given twice: a message header has one value (the broker's message format, "
                "like Go's map[string]string); join the values, e.g. -H 'k=1,2'",
                EXIT_USAGE,
            )
        headers[key] = value
    return headers or None


def read_data(value: Optional[str], what: str) -> bytes:
    """The argument as UTF-8, or stdin when it is missing or ``-``."""
    if value is not None and value != "-":
        return os.fsencode(value)
    if sys.stdin is None or sys.stdin.isatty():
        raise CLIError(f"no {what}: give it as an argument, or pipe it on stdin", EXIT_USAGE)
    return sys.stdin.buffer.read()


def payload_text(payload: bytes) -> str:
    """One bounded line of text for a payload from the network: invalid UTF-8
    and control characters escaped (no terminal escapes, no line breaks),
    at most ECHO_LIMIT bytes of it shown."""
    return printable_bytes(payload)
