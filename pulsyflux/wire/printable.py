"""Text from the network made safe to echo: one line, no terminal escapes, bounded.

Topics, headers, payloads and error texts come from whoever can connect.
Printed as they are, they can clear a terminal, fake coloured output, break
"one message per line" (``\\v``, ``\\r``, U+2028) or turn one log line into
megabytes. :func:`printable` escapes every control character and caps the
length, so what is echoed is always one bounded line.

    printable("\\x1b[2Jhi")           # '\\\\x1b[2Jhi'
    printable_bytes(b"\\xff" * 10_000)  # '\\\\xff\\\\xff... (5904 bytes more)'

Pure functions, no Twisted: the CLI, the HTTP API, the broker and the
router share them. Three shorter forms quote someone else's text inside a
message of ours: :func:`excerpt` (client input in an error answer),
:func:`error_excerpt` (another peer's error text repeated) and
:func:`short_error_text` (an error kept in the stats, ids masked).
"""

from __future__ import annotations

import re

__all__ = [
    "ECHO_LIMIT",
    "EXCERPT_CHARS",
    "ERROR_EXCERPT_CHARS",
    "UNSAFE",
    "UNSAFE_BEYOND_C0",
    "error_excerpt",
    "excerpt",
    "printable",
    "printable_block",
    "printable_bytes",
    "short_error_text",
]

# What one echoed value may show (characters of text, bytes of a payload);
# the rest is summarised as "... (N more)".
ECHO_LIMIT = 4096

# C0 controls (line breaks and tabs included), DEL, C1 controls (0x9b is an
# 8-bit CSI to some terminals), the Arabic letter mark, left-to-right and
# right-to-left marks, the line and paragraph separators, the bidi embeddings,
# overrides and isolates (Trojan Source), and lone surrogates (no encoding can
# write them).
_BEYOND_C0 = "\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff"
UNSAFE = re.compile(f"[\x00-\x1f{_BEYOND_C0}]")
# The same, less the C0 controls: for JSON text, which escapes those itself.
UNSAFE_BEYOND_C0 = re.compile(f"[{_BEYOND_C0}]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: "re.Match[str]") -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b``, ``\\u202e``),
    cut after ``limit`` characters with ``... (N chars more)``."""
    more = len(text) - limit
    if more > 0:
        text = text[:limit]
    if UNSAFE.search(text) is not None:
        text = UNSAFE.sub(_escape, text)
    return text + f"... ({more} chars more)" if more > 0 else text


def printable_bytes(data: bytes, limit: int = ECHO_LIMIT) -> str:
    """A payload as one line of text: UTF-8 shown as text, invalid bytes as
    ``\\xNN``, control characters escaped; at most ``limit`` bytes of it,
    then ``... (N bytes more)``."""
    head = bytes(data[:limit])
    more = len(data) - len(head)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        if more > 0 and error.reason == "unexpected end of data" and error.start >= len(head) - 3:
            # The cut split a character: end before it rather than show its bytes.
            more += len(head) - error.start
            head = head[: error.start]
        text = head.decode("utf-8", "backslashreplace")
    if UNSAFE.search(text) is not None:
        text = UNSAFE.sub(_escape, text)
    return text + f"... ({more} bytes more)" if more > 0 else text


# As UNSAFE, less the line feed and the tab: for text shown as a block.
_UNSAFE_IN_BLOCK = re.compile(f"[\x00-\x08\x0b-\x1f{_BEYOND_C0}]")


def printable_block(data: bytes) -> str:
    """A body shown whole on a terminal: its lines and tabs kept, invalid
    UTF-8 as ``\\xNN``, every other control character escaped. Not capped:
    for output the user asked for (``pulsyflux request`` on a terminal)."""
    text = data.decode("utf-8", "backslashreplace")
    if _UNSAFE_IN_BLOCK.search(text) is not None:
        text = _UNSAFE_IN_BLOCK.sub(_escape, text)
    return text


# Error texts quote client input at most this long: an answer that repeated a
# sender's megabyte would itself be too large a frame (and fill logs).
EXCERPT_CHARS = 64


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` quoted for an error message: repr-escaped, at most ``limit`` chars of it.

    >>> excerpt("x" * 100, 4)
    "'xxxx'... (100 chars)"
    """
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} chars)"


# The longest text of someone else's error (a subscriber's Provider, ...) repeated whole.
ERROR_EXCERPT_CHARS = 256


def error_excerpt(text: str, limit: int = ERROR_EXCERPT_CHARS) -> str:
    """Someone else's error text, safe to repeat: as it is when short and printable, else an :func:`excerpt`."""
    if len(text) <= limit and text.isprintable():
        return text
    return excerpt(text, limit)


# A UUID in text, dashed or not: never shown in stats (a channel id is a bearer secret).
_UUID_TEXT = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")


def _escape_unprintable(char: str) -> str:
    if char.isprintable():
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def short_error_text(text: "str | bytes", limit: int) -> str:
    """At most ``limit`` printable characters of an error text, ids masked, for operators to read.

    Control and other unprintable characters are escaped (no terminal
    tricks, no lone surrogates in JSON); UUIDs become ``<id>``.
    """
    if isinstance(text, bytes):
        # limit chars of output come from at most 4 * limit bytes; the margin lets a UUID there be seen whole.
        text = text[: 4 * limit + 40].decode("utf-8", "replace")
    else:
        text = text[: 4 * limit + 40]
    text = _UUID_TEXT.sub("<id>", text)
    if not text.isprintable():
        text = "".join(map(_escape_unprintable, text))
    return text if len(text) <= limit else text[: limit - 3] + "..."
