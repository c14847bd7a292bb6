"""Broker messages as bytes: the Go broker's JSON, batches, control messages.

Sans-I/O: no Twisted here. A message on the wire is exactly what Go's
``encoding/json`` writes for ``struct{Topic string; Payload []byte;
Headers map[string]string}`` (docs/protocol.md, Broker messages), so Go publishers and
Python subscribers understand each other byte for byte.

    >>> encode("t", b"hi", {"k": "v"})
    b'{"Topic":"t","Payload":"aGk=","Headers":{"k":"v"}}'
    >>> decode(b'{"topic":"t","payload":null}')
    Message(topic='t', payload=b'', headers={})

pulsyflux adds two things, both invisible to a Go publisher:

* a **batch** is a JSON array of such objects (``[{..},{..}]``); our
  publishers and the broker's forwards use it to move many messages in one
  request. A body that is a single object is one message, as in Go.
* **control messages** are ordinary messages whose topic starts with
  :data:`CONTROL_PREFIX` (``$pulsyflux/``); that prefix is reserved, so a Go
  publisher's plain publish is never mistaken for one (docs/broker.md).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import sys
from typing import Any, Mapping, NamedTuple, Optional, Union

from .errors import PulsyfluxError
from .printable import UNSAFE, excerpt

__all__ = [
    "Message",
    "MessageError",
    "Position",
    "encode",
    "encode_text",
    "encode_batch",
    "decode",
    "decode_body",
    "split_body",
    "CONTROL_PREFIX",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "PROBE",
    "DROPPED",
    "CLOSED",
    "START",
    "control",
    "is_control",
    "topic_problem",
    "check_topic",
    "MAX_TOPIC_CHARS",
    "MAX_PATTERN_TOKENS",
    "WILDCARDS",
    "is_pattern",
    "group_problem",
    "MAX_GROUP_CHARS",
]

# Topics starting with this are the broker's own; publish refuses them.
CONTROL_PREFIX = "$pulsyflux/"
# Client -> broker, on the broker channel (headers: topic, channel).
SUBSCRIBE = CONTROL_PREFIX + "subscribe"
UNSUBSCRIBE = CONTROL_PREFIX + "unsubscribe"
# Broker -> subscriber, on the subscription's channel, in the message stream.
PROBE = CONTROL_PREFIX + "probe"  # "are you there?", answered, never queued
DROPPED = CONTROL_PREFIX + "dropped"  # headers: dropped = total dropped so far
CLOSED = CONTROL_PREFIX + "closed"  # headers: reason; the stream ends
START = CONTROL_PREFIX + "start"  # headers: position, where the stream starts (a broker with history)

Body = Union[bytes, bytearray, memoryview]

# A subscription's wildcard tokens (NATS subject syntax): "*" is any one
# token, a last ">" one or more.
WILDCARDS = ("*", ">")

# The most tokens a pattern may have: each is a node of the broker's pattern
# trie, which a subscriber must not make arbitrarily deep. Plain topics are
# not bounded in tokens (they are looked up whole).
MAX_PATTERN_TOKENS = 32

# The longest queue group name (the broker keeps each, and shows it in stats).
MAX_GROUP_CHARS = 256

# The longest topic one can subscribe to: the broker keeps each subscribed
# topic (and shows it in stats), so its size is bounded. A publish is bounded
# only by the body size; a longer topic reaches only patterns ending in ">".
MAX_TOPIC_CHARS = 1024


class MessageError(PulsyfluxError, ValueError):
    """Bytes that are not a broker message (bad JSON, wrong field types)."""


class Position(NamedTuple):
    """Where a message stands in its topic, given by a broker that keeps history.

    ``epoch`` names a run of the topic's count (a new one whenever the
    broker starts without the history, or forgets the topic), ``seq``
    counts its messages from 1 (seq 0: before the first). ``str(position)``
    is ``"EPOCH:SEQ"``, the form on the wire (the ``"Position"`` field), in
    the CLI (``--since``) and in JSON; :meth:`parse` reads it back.

        >>> Position.parse("5f2c0a9e1b1:42")
        Position(epoch='5f2c0a9e1b1', seq=42)
    """

    epoch: str
    seq: int

    def __str__(self) -> str:
        return f"{self.epoch}:{self.seq}"

    @classmethod
    def parse(cls, text: str) -> "Position":
        """``"EPOCH:SEQ"`` as a Position; ValueError for anything else."""
        epoch, sep, seq = text.rpartition(":")
        if not sep or not epoch or not seq.isdigit() or len(seq) > 19 or not epoch_ok(epoch):
            raise ValueError(f"a position is EPOCH:SEQ (e.g. 5f2c0a9e1b1:42), not {excerpt(text)}")
        return cls(epoch, int(seq))


def epoch_ok(epoch: str) -> bool:
    """An epoch is at most 64 printable ASCII characters, none of them a quote or backslash."""
    return len(epoch) <= 64 and epoch.isascii() and epoch.isprintable() and '"' not in epoch and "\\" not in epoch


class Message:
    """One published message: ``topic``, ``payload`` (bytes), ``headers``.

    Immutable; ``headers`` is a fresh dict per received message.
    ``position`` is its :class:`Position` when the broker keeps history
    (None otherwise); it is no part of equality, and :meth:`encode` leaves it
    out (a Go ``Message`` has no such field).

        msg = Message("orders", b"new order", {"priority": "high"})
        msg.topic, msg.payload, msg.headers
    """

    __slots__ = ("topic", "payload", "headers", "_position")

    topic: str
    payload: bytes
    headers: dict[str, str]
    _position: Union[None, str, Position]  # the wire text until first read

    def __init__(
        self,
        topic: str,
        payload: bytes = b"",
        headers: Optional[Mapping[str, str]] = None,
        position: Optional[Position] = None,
    ) -> None:
        _set = object.__setattr__
        _set(self, "topic", topic)
        _set(self, "payload", payload)
        _set(self, "headers", {} if headers is None else dict(headers))
        _set(self, "_position", position)

    @property
    def position(self) -> Optional[Position]:
        """Parsed when first read (most readers never ask); None if absent or malformed."""
        position = self._position
        if type(position) is str:
            try:
                position = Position.parse(position)
            except ValueError:
                position = None
            object.__setattr__(self, "_position", position)
        return position  # type: ignore[return-value]  # a str was just replaced

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Message is immutable")

    __delattr__ = __setattr__  # type: ignore[assignment]  # both refuse: the signatures differ, the answer not

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return self.topic == other.topic and self.payload == other.payload and self.headers == other.headers

    __hash__ = None  # type: ignore[assignment]  # headers is a dict

    def __repr__(self) -> str:
        payload = self.payload if len(self.payload) <= 32 else self.payload[:32] + b"..."
        position = self.position
        at = "" if position is None else f", position={position}"
        return f"Message(topic={self.topic!r}, payload={payload!r}, headers={self.headers!r}{at})"

    def __reduce__(self) -> Any:
        return (Message, (self.topic, self.payload, self.headers, self.position))

    def encode(self) -> bytes:
        """This message as Go JSON (empty headers are written as ``null``)."""
        return encode(self.topic, self.payload, self.headers or None)


# -- encoding ---------------------------------------------------------------

# Go escapes these inside strings (HTML safety, JS line separators).
_GO_ESCAPES = re.compile("[<>&\u2028\u2029]")
_GO_ESCAPE_TABLE = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_json_string = json.encoder.encode_basestring  # type: ignore[attr-defined]  # C version, no ASCII escaping


def _go_string(text: str) -> str:
    out = _json_string(text)
    if _GO_ESCAPES.search(out) is not None:
        out = _GO_ESCAPES.sub(lambda m: _GO_ESCAPE_TABLE[m.group()], out)
    return out


# Topics repeat: their JSON is kept, for short topics and up to this many (then forgotten at once).
_TOPIC_JSON: dict[str, str] = {}
_TOPIC_JSON_MAX = 1024
_TOPIC_JSON_CHARS = 256


def _topic_json(topic: str) -> str:
    text = _TOPIC_JSON.get(topic)
    if text is None:
        text = _go_string(topic)
        if len(topic) <= _TOPIC_JSON_CHARS:
            if len(_TOPIC_JSON) >= _TOPIC_JSON_MAX:
                _TOPIC_JSON.clear()
            _TOPIC_JSON[topic] = text
    return text


# Room a request of broker messages needs beyond the base64 of its payload:
# the topic, the headers, the JSON around them, and the rest of a batch (the
# broker's forwards stop growing at 256 KiB of JSON).
MESSAGE_OVERHEAD = 1 << 20


def wire_limit(max_payload: int) -> int:
    """Bytes a request of broker messages may take on the wire when each payload
    may be ``max_payload`` bytes: a payload travels in base64 (4 bytes per 3), so
    a server's limits are stated in payload bytes and applied with this.

    >>> wire_limit(64 << 20)
    90527064
    """
    return 4 * -(-max_payload // 3) + MESSAGE_OVERHEAD


def encode_text(topic: str, payload: Optional[Body], headers: Optional[Mapping[str, str]]) -> str:
    """:func:`encode` as a str (what batches are joined from).

    Only the type of ``topic`` is checked (:func:`check_topic`'s first
    step): control messages are encoded here too, with reserved topics.
    """
    if type(topic) is not str:
        _topic_type_error(topic)
    if payload is None:
        payload_json = "null"
    else:
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
        payload_json = f'"{binascii.b2a_base64(payload, newline=False).decode("ascii")}"'
    if headers is None:
        headers_json = "null"
    elif not headers:
        headers_json = "{}"
    else:
        parts = []
        for key in sorted(headers):  # Go writes map keys sorted
            value = headers[key]
            if type(key) is not str or type(value) is not str:
                raise TypeError(f"headers must map str to str, got {key!r}: {value!r}")
            parts.append(f"{_go_string(key)}:{_go_string(value)}")
        headers_json = f"{{{','.join(parts)}}}"
    # One f-string: the message is built in one pass (a chain of + copies it once per piece).
    return f'{{"Topic":{_topic_json(topic)},"Payload":{payload_json},"Headers":{headers_json}}}'


def encode(topic: str, payload: Optional[Body] = b"", headers: Optional[Mapping[str, str]] = None) -> bytes:
    """Go's JSON for one message; ``None`` payload/headers are Go's ``nil`` (``null``).

    Raises TypeError for a non-str topic, non-bytes payload or non-str headers.
    """
    return encode_text(topic, payload, headers).encode("utf-8")


def encode_batch(texts: list[str]) -> bytes:
    """Join encoded messages (from :func:`encode_text`) into one request body.

    One message stays a plain object, so a lone publish is exactly Go's.
    """
    if len(texts) == 1:
        return texts[0].encode("utf-8")
    return f"[{','.join(texts)}]".encode()  # one copy fewer than "[" + ... + "]"


# -- decoding ---------------------------------------------------------------

_FIELDS = {"topic": "Topic", "payload": "Payload", "headers": "Headers"}
_decoder = json.JSONDecoder()
_raw_decode = _decoder.raw_decode
_WHITESPACE = " \t\n\r"


def _fields(obj: Any) -> tuple[str, Any, Any]:
    """(topic, payload JSON value, headers JSON value) of a decoded object.

    Keys match case-insensitively, the last match winning, as Go reads them.
    """
    if type(obj) is not dict:
        raise MessageError(f"a message is a JSON object, not {type(obj).__name__}")
    if (
        3 <= len(obj) <= 4
        and "Topic" in obj
        and "Payload" in obj
        and "Headers" in obj
        and (
            len(obj) == 3 or "Position" in obj  # what a broker with history forwards
        )
    ):
        topic, payload, headers = obj["Topic"], obj["Payload"], obj["Headers"]
    else:
        found: dict[str, Any] = {}
        for key, value in obj.items():
            name = _FIELDS.get(key.lower())
            if name is not None:
                found[name] = value
        topic, payload, headers = found.get("Topic"), found.get("Payload"), found.get("Headers")
    if topic is None:
        topic = ""  # Go leaves a missing or null string empty
    elif type(topic) is not str:
        raise MessageError(f"Topic must be a string, not {type(topic).__name__}")
    return topic, payload, headers


def _payload(value: Any) -> bytes:
    if value is None:
        return b""
    if type(value) is not str:
        raise MessageError(f"Payload must be a base64 string or null, not {type(value).__name__}")
    if "\n" in value or "\r" in value:
        value = value.replace("\n", "").replace("\r", "")  # Go's decoder skips line breaks
    try:
        return _strict_b64(value)
    except (binascii.Error, ValueError) as error:
        raise MessageError(f"Payload is not valid base64: {error}") from None


if sys.version_info >= (3, 11):

    def _strict_b64(value: str) -> bytes:
        return binascii.a2b_base64(value, strict_mode=True)  # type: ignore[call-arg]  # Python < 3.11 lacks strict_mode

else:  # binascii has no strict_mode before 3.11

    def _strict_b64(value: str) -> bytes:
        return base64.b64decode(value, validate=True)


def _headers(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if type(value) is not dict:
        raise MessageError(f"Headers must be an object of strings or null, not {type(value).__name__}")
    for key, item in value.items():
        if type(item) is not str:
            raise MessageError(f"header {excerpt(key)} must be a string, not {type(item).__name__}")
    return value


def _message(obj: Any) -> Message:
    topic, payload, headers = _fields(obj)
    msg = Message.__new__(Message)
    _set = object.__setattr__
    _set(msg, "topic", topic)
    _set(msg, "payload", _payload(payload))
    _set(msg, "headers", _headers(headers))
    # A broker with history adds "Position" last (pulsyflux.history); read lazily.
    position = obj.get("Position") if len(obj) > 3 else None
    _set(msg, "_position", position if type(position) is str else None)
    return msg


def _loads(body: Body) -> Any:
    """``json.loads`` for UTF-8 bodies, without its per-call overhead."""
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else bytes(body).decode("utf-8")
    except UnicodeDecodeError as error:
        raise MessageError(f"not a JSON message: {error}") from None
    return _loads_text(text)


def _loads_text(text: str) -> Any:
    """:func:`_loads` for a body already decoded."""
    try:
        start = 0
        if text[:1] in _WHITESPACE:
            start = len(text) - len(text.lstrip(_WHITESPACE))
        obj, stop = _raw_decode(text, start)
    except ValueError as error:
        raise MessageError(f"not a JSON message: {error}") from None
    if stop != len(text) and text[stop:].strip(_WHITESPACE):
        raise MessageError(f"not a JSON message: extra data at {stop}")
    return obj


def decode(body: Body) -> Message:
    """One message from Go JSON (either escaping, keys in any case).

    Raises :class:`MessageError` for anything else.
    """
    return _message(_loads(body))


def decode_body(body: Body) -> list[Message]:
    """Every message in a request body: one object, or a batch (array)."""
    obj = _loads(body)
    if type(obj) is list:
        return [_message(item) for item in obj]
    return [_message(obj)]


def split_body(body: Body) -> list[tuple[str, str, Any, Any]]:
    """``(topic, text, payload, headers)`` per message of a request body, checked.

    ``text`` is the message's own JSON text, so the broker forwards it
    unchanged; ``payload`` and ``headers`` are the raw JSON values (the
    broker only needs to know they are valid). Raises
    :class:`MessageError`, and returns nothing, if any message is bad.
    """
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else bytes(body).decode("utf-8")
    except UnicodeDecodeError as error:
        raise MessageError(f"not a JSON message: {error}") from None
    items: list[tuple[str, str, Any, Any]] = []
    start = 0
    end = len(text)
    while start < end and text[start] in _WHITESPACE:
        start += 1
    if start < end and text[start] == "[":
        pos = start + 1
        while True:
            while pos < end and text[pos] in _WHITESPACE:
                pos += 1
            if pos < end and text[pos] == "]" and not items:
                pos += 1
                break
            try:
                obj, stop = _raw_decode(text, pos)
            except ValueError as error:
                raise MessageError(f"not a JSON batch: {error}") from None
            items.append(_checked(obj, text[pos:stop]))
            pos = stop
            while pos < end and text[pos] in _WHITESPACE:
                pos += 1
            if pos < end and text[pos] == ",":
                pos += 1
                continue
            if pos < end and text[pos] == "]":
                pos += 1
                break
            raise MessageError(f"not a JSON batch: expected ',' or ']' at {pos}")
        if text[pos:].strip(_WHITESPACE):
            raise MessageError(f"not a JSON batch: extra data at {pos}")
    else:
        items.append(_checked(_loads_text(text), text.strip(_WHITESPACE)))
    return items


def _checked(obj: Any, text: str) -> tuple[str, str, Any, Any]:
    topic, payload, headers = _fields(obj)
    if payload is not None:
        if type(payload) is not str:
            raise MessageError(f"Payload must be a base64 string or null, not {type(payload).__name__}")
        if len(payload) % 4 or not _B64.fullmatch(payload):
            _payload(payload)  # the precise error, or fine after all (line breaks)
    _headers(headers)
    return topic, text, payload, headers


_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


# -- control messages --------------------------------------------------------


def is_control(topic: str) -> bool:
    """Whether ``topic`` is the broker's own (a control message), never a publisher's."""
    return topic.startswith(CONTROL_PREFIX)


# -- the topic rule ------------------------------------------------------------

# Characters a subscribed topic (or a group name) may not hold: printable's
# unsafe class, the one list of what must not be echoed as it is (C0 and C1
# controls, DEL, the line separators, the bidi marks, embeddings, overrides
# and isolates, lone surrogates). Go's JSON decoder turns a lone surrogate
# into U+FFFD, so a Go peer and we would not agree on such a topic; the others
# would reach logs, stats and terminals. Checked at subscribe only: publish is
# the hot path, and a publish to such a topic reaches no one.
_UNSUBSCRIBABLE = UNSAFE


def _topic_type_error(topic: object) -> None:
    raise TypeError(f"topic must be str, not {type(topic).__name__}")


def topic_problem(topic: str, subscribing: bool = False) -> Optional[str]:
    """Why ``topic`` may not be published to (or subscribed to), or None if it may.

    The one rule for topics: the CLI, the HTTP publish API, the clients and
    the broker all ask here, so they never disagree. A topic is non-empty
    text not starting with :data:`CONTROL_PREFIX`, made of ``.``-separated
    tokens, none of them empty and none holding ``*`` or ``>`` (spaces and
    any other character are fine, as they always were). A subscription may
    also be a pattern (NATS subject syntax, docs/broker.md): a token that is
    ``*`` matches any one token, a last token ``>`` one or more. One
    subscribed to is at most :data:`MAX_TOPIC_CHARS` characters (a pattern
    at most :data:`MAX_PATTERN_TOKENS` tokens) with no control character or
    lone surrogate. ``topic`` must be a str.

        >>> topic_problem("orders.eu") is None and topic_problem("orders.*", subscribing=True) is None
        True
        >>> topic_problem("orders.*")
        "token 2 is the wildcard '*': wildcards are for subscribing; publish to a concrete topic"
    """
    if not topic:
        return "topic must not be empty"
    if is_control(topic):
        return f"topics starting with {CONTROL_PREFIX!r} are reserved for the broker"
    if subscribing:
        if len(topic) > MAX_TOPIC_CHARS:
            return f"a topic is at most {MAX_TOPIC_CHARS} characters, not {len(topic)}"
        bad = _UNSUBSCRIBABLE.search(topic)
        if bad is not None:
            return (
                f"a topic holds no control character or lone surrogate, found U+{ord(bad.group()):04X} at {bad.start()}"
            )
    # Four scans in C: the common topic (and every publish) costs no more.
    if "*" in topic or ">" in topic or ".." in topic or topic[0] == "." or topic[-1] == ".":
        return _token_problem(topic, subscribing)
    return None


def _token_problem(topic: str, subscribing: bool) -> Optional[str]:
    """:func:`topic_problem` for a topic with an empty token or a wildcard character."""
    tokens = topic.split(".")
    last = len(tokens)
    for number, token in enumerate(tokens, 1):
        if not token:
            return f"token {number} is empty: a topic is '.'-separated tokens, none empty"
        if token in WILDCARDS:
            if not subscribing:
                return (
                    f"token {number} is the wildcard {token!r}: wildcards are for subscribing;"
                    " publish to a concrete topic"
                )
            if token == "*" or number == last:
                continue
            return f"token {number} is '>', which matches the rest of a topic: it can only be the last token"
        if "*" in token or ">" in token:
            return f"token {number} ({excerpt(token)}) mixes '*' or '>' with other text: a wildcard is a whole token"
    if last > MAX_PATTERN_TOKENS:  # only patterns: a plain topic of any depth stays what it was
        return f"a pattern is at most {MAX_PATTERN_TOKENS} tokens, not {last}"
    return None


def is_pattern(topic: str) -> bool:
    """Whether a (valid) subscribed ``topic`` holds a wildcard token, so it may match other topics.

    >>> is_pattern("orders.*"), is_pattern("orders.eu")
    (True, False)
    """
    return "*" in topic or ">" in topic


def group_problem(group: str) -> Optional[str]:
    """Why ``group`` may not name a queue group, or None if it may.

    Like a subscribed topic's text (the broker keeps it and shows it in
    stats): non-empty, at most :data:`MAX_GROUP_CHARS` characters, no
    control character or lone surrogate.

        >>> group_problem("workers") is None, group_problem("")
        (True, 'a queue group name must not be empty')
    """
    if type(group) is not str:
        return f"a queue group name is a str, not {type(group).__name__}"
    if not group:
        return "a queue group name must not be empty"
    if len(group) > MAX_GROUP_CHARS:
        return f"a queue group name is at most {MAX_GROUP_CHARS} characters, not {len(group)}"
    bad = _UNSUBSCRIBABLE.search(group)
    if bad is not None:
        return f"a queue group name holds no control character or lone surrogate, found U+{ord(bad.group()):04X}"
    return None


def check_topic(topic: str, subscribing: bool = False) -> None:
    """:func:`topic_problem` as exceptions: TypeError for a non-str, ValueError for a refused topic."""
    if type(topic) is not str:
        _topic_type_error(topic)
    problem = topic_problem(topic, subscribing)
    if problem is not None:
        raise ValueError(problem)


def control(kind: str, **headers: str) -> str:
    """A control message's JSON text, e.g. ``control(SUBSCRIBE, topic="t", channel=str(uuid))``."""
    return encode_text(kind, None, headers)
