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
import struct
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
    "BINARY",
    "BINARY_MAGIC",
    "encode_record",
    "encode_records",
    "is_binary",
    "split_binary",
    "record_of",
    "convert",
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


# Setting a received message's slots straight through their descriptors (Message
# refuses __setattr__): a third cheaper than object.__setattr__ by name, per message.
_new_message = Message.__new__
_set_topic = Message.__dict__["topic"].__set__
_set_payload = Message.__dict__["payload"].__set__
_set_headers = Message.__dict__["headers"].__set__
_set_position = Message.__dict__["_position"].__set__


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
    msg = _new_message(Message)
    _set_topic(msg, topic)
    _set_payload(msg, _payload(payload))
    _set_headers(msg, _headers(headers))
    # A broker with history adds "Position" last (pulsyflux.history); read lazily.
    position = obj.get("Position") if len(obj) > 3 else None
    _set_position(msg, position if type(position) is str else None)
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
    """Every message in a request body: one object, a batch (array), or a binary batch (:func:`is_binary`)."""
    if body[:4] == BINARY_MAGIC:
        return _decode_binary(body)
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
    plain = _split_plain(body)
    return plain if plain is not None else _split_json(body)


def _split_json(body: Body) -> list[tuple[str, str, Any, Any]]:
    """:func:`split_body` by the JSON decoder: any JSON a Go publisher may send (whitespace, escapes, headers)."""
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


# A message in the shape Go's json.Marshal and our encode_text give it, in ASCII with no
# escape and no whitespace: such a text is valid JSON exactly when it matches, and the general
# parser below reads the same topic, payload and headers from it. One regular expression per
# message instead of a JSON decode and a base64 check (CPU per 100-byte message in a batch of
# 100: CPython 2.0 -> 1.2 us, PyPy 2.4 -> 0.8, whose raw_decode is pure Python); anything else
# takes the general path.
_PLAIN = re.compile(
    r'\{"Topic":"([^"\\\x00-\x1f]*)","Payload":(?:"([A-Za-z0-9+/]*={0,2})"|null),"Headers":(null|\{\})\}'
)


def _split_plain(body: Body) -> Optional[list[tuple[str, str, Any, Any]]]:
    """:func:`split_body` of a body whose every message is in the plain shape; None for any other body."""
    if type(body) is not bytes or not body.isascii():
        return None
    text = body.decode("ascii")
    match = _PLAIN.match
    end = len(text)
    if text[:1] != "[":
        found = match(text)
        if found is None or found.end() != end:
            return None
        topic, payload, headers = found.group(1, 2, 3)
        if payload is not None and len(payload) % 4:
            return None
        return [(topic, text, payload, None if headers == "null" else {})]
    items: list[tuple[str, str, Any, Any]] = []
    append = items.append
    pos = 1
    while True:
        found = match(text, pos)
        if found is None:
            return None  # also the empty batch
        topic, payload, headers = found.group(1, 2, 3)
        if payload is not None and len(payload) % 4:
            return None
        stop = found.end()
        append((topic, text[pos:stop], payload, None if headers == "null" else {}))
        separator = text[stop : stop + 1]
        pos = stop + 1
        if separator == ",":
            continue
        if separator == "]" and pos == end:
            return items
        return None


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


# -- the binary encoding (a pulsyflux extension: docs/protocol.md) ------------------
#
# Between our own clients and broker, a request body may be a *binary batch*
# instead of JSON: BINARY_MAGIC, then one record per message:
#
#     flags:u8  topic_len:u32  payload_len:u32  header_count:u32     (big-endian)
#     topic (UTF-8)  payload  header_count x (key_len:u32 key  value_len:u32 value)
#     [position_len:u8 position (ASCII "EPOCH:SEQ"), if flags & 4]
#
# flags: 1 the payload is null (Go's nil), 2 the headers are null, 4 a position
# follows. No JSON body can start with BINARY_MAGIC's first byte (0xFF is never
# UTF-8), so every reader tells the two apart by the body's first bytes, and a Go
# reader refuses a binary body at once; nobody sends one to a peer that did not
# say it reads it: "ok pfb1" is the broker's answer to the empty batch our
# publishers send first, and a subscriber's answer to the broker's probe.

BINARY = "pfb1"  # the encoding's name, in offers and answers
BINARY_MAGIC = b"\xffPB1"
_RECORD = struct.Struct(">BIII")
_LENGTH = struct.Struct(">I")
_NULL_PAYLOAD = 1
_NULL_HEADERS = 2
_HAS_POSITION = 4
_FLAGS = _NULL_PAYLOAD | _NULL_HEADERS | _HAS_POSITION
_RECORD_SIZE = _RECORD.size
_TEXT = "surrogatepass"  # a lone surrogate travels as in JSON (which escapes it), not as an error
_TOPIC_UTF8: dict[str, bytes] = {}  # as _TOPIC_JSON: topics repeat (short ones, at most 1,024 kept)


def is_binary(body: Body) -> bool:
    """Whether a request body is a binary batch rather than JSON (its first bytes tell)."""
    return body[:4] == BINARY_MAGIC


def encode_record(
    topic: str,
    payload: Optional[Body],
    headers: Optional[Mapping[str, str]],
    position: Optional[str] = None,
) -> bytes:
    """One message as a binary record (what :func:`encode_records` joins); ``None`` is Go's nil, as in JSON.

    Raises TypeError as :func:`encode_text` does.
    """
    if type(topic) is not str:
        _topic_type_error(topic)
    flags = 0 if position is None else _HAS_POSITION
    if payload is None:
        flags |= _NULL_PAYLOAD
        payload = b""
    elif not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
    topic_bytes = _TOPIC_UTF8.get(topic)
    if topic_bytes is None:
        topic_bytes = topic.encode("utf-8", _TEXT)
        if len(topic) <= _TOPIC_JSON_CHARS:
            if len(_TOPIC_UTF8) >= _TOPIC_JSON_MAX:
                _TOPIC_UTF8.clear()
            _TOPIC_UTF8[topic] = topic_bytes
    if not headers:
        if headers is None:
            flags |= _NULL_HEADERS
        if position is None:
            return _RECORD.pack(flags, len(topic_bytes), len(payload), 0) + topic_bytes + payload
        parts = [_RECORD.pack(flags, len(topic_bytes), len(payload), 0), topic_bytes, payload]
    else:
        parts = [_RECORD.pack(flags, len(topic_bytes), len(payload), len(headers)), topic_bytes, payload]
        pack = _LENGTH.pack
        for key in sorted(headers):  # as in JSON: the same message, the same bytes
            value = headers[key]
            if type(key) is not str or type(value) is not str:
                raise TypeError(f"headers must map str to str, got {key!r}: {value!r}")
            key_bytes = key.encode("utf-8", _TEXT)
            value_bytes = value.encode("utf-8", _TEXT)
            parts += (pack(len(key_bytes)), key_bytes, pack(len(value_bytes)), value_bytes)
    if position is not None:
        text = position.encode("ascii")
        if len(text) > 255:
            raise ValueError("a position is at most 255 characters")
        parts += (bytes((len(text),)), text)
    return b"".join(parts)


def encode_records(records: list[bytes]) -> bytes:
    """A binary batch of records (from :func:`encode_record`): one request body.

    One join with the magic in front, not the magic added to the joined
    records: that second copy of the whole batch costs PyPy half as much
    again as the join (200 records of 100 bytes: 5.4 against 3.5 us).
    """
    return b"".join([BINARY_MAGIC, *records])


def record_of(topic: str, payload: Any, headers: Optional[Mapping[str, str]]) -> bytes:
    """The binary record of a checked message: ``payload`` as :func:`split_body` gives it (its
    base64 text) or as :func:`split_binary` does (bytes), None for Go's nil."""
    if type(payload) is str:
        payload = _payload(payload)
    return encode_record(topic, payload, headers)


def convert(entry: Union[str, bytes], binary: bool) -> Union[str, bytes]:
    """One message's JSON text or binary record (without BINARY_MAGIC), in the encoding asked for.

    For the rare moves between subscribers of different encodings (a queue
    group's hand-over); the fan-out encodes each message once per encoding.
    """
    if (type(entry) is bytes) is binary:
        return entry
    if binary:
        obj = _loads_text(entry)  # type: ignore[arg-type]  # a str here
        topic, payload, headers = _fields(obj)
        return encode_record(
            topic,
            None if payload is None else _payload(payload),
            None if headers is None else _headers(headers),
            _position_text(obj.get("Position")),
        )
    topic, payload, headers, position, _, _ = _parse_binary(BINARY_MAGIC + entry)[0]  # type: ignore[operator]
    text = encode_text(topic, payload, headers)
    position = _position_text(position)
    return text if position is None else f'{text[:-1]},"Position":"{position}"}}'


def _position_text(position: Any) -> Optional[str]:
    """A position as it may be written again, or None: a record's or a Go publisher's may be anything
    (a broker without history forwards it as it came), and a quote in it would forge JSON fields."""
    if type(position) is not str:
        return None
    try:
        Position.parse(position)
    except ValueError:
        return None
    return position if position.isascii() else None


def _binary_error(why: str, at: int) -> MessageError:
    return MessageError(f"not a binary batch: {why} at byte {at}")


def _parse_binary(
    body: bytes, first: int = 0
) -> list[tuple[str, Optional[bytes], Optional[dict[str, str]], Optional[str], int, int]]:
    """``(topic, payload, headers, position, start, stop)`` per record; MessageError for anything else.

    Every length is checked against what is left before it is used, so a
    truncated body or a length past the end is an error, never a read
    past it nor an allocation of what the length claims. ``first``: read
    only the one record there (the body's magic was checked).
    """
    end = len(body)
    if first:
        pos = first
    elif body[:4] != BINARY_MAGIC:
        raise _binary_error("no BINARY_MAGIC", 0)
    else:
        pos = 4
    unpack = _RECORD.unpack_from
    out: list[tuple[str, Optional[bytes], Optional[dict[str, str]], Optional[str], int, int]] = []
    append = out.append
    try:
        while pos < end:
            start = pos
            if end - pos < _RECORD_SIZE:
                raise _binary_error("truncated record header", pos)
            flags, topic_len, payload_len, count = unpack(body, pos)
            pos += _RECORD_SIZE
            if flags & ~_FLAGS:
                raise _binary_error(f"unknown flags {flags:#04x}", start)
            if topic_len + payload_len > end - pos:
                raise _binary_error("topic or payload longer than the body", start)
            topic = body[pos : pos + topic_len].decode("utf-8", _TEXT)
            pos += topic_len
            if flags & _NULL_PAYLOAD:
                if payload_len:
                    raise _binary_error("a null payload with a length", start)
                payload: Optional[bytes] = None
            else:
                payload = body[pos : pos + payload_len]
                pos += payload_len
            headers: Optional[dict[str, str]] = None
            if count:
                if flags & _NULL_HEADERS:
                    raise _binary_error("null headers with a count", start)
                if count > (end - pos) // 8:
                    raise _binary_error("more headers than the body holds", start)
                headers = {}
                for _ in range(count):
                    key, pos = _text(body, pos, end)
                    headers[key], pos = _text(body, pos, end)
            elif not flags & _NULL_HEADERS:
                headers = {}
            position = None
            if flags & _HAS_POSITION:
                if pos >= end or body[pos] > end - pos - 1:
                    raise _binary_error("truncated position", pos)
                size = body[pos]
                position = body[pos + 1 : pos + 1 + size].decode("ascii")
                pos += 1 + size
            append((topic, payload, headers, position, start, pos))
            if first:
                break
    except UnicodeDecodeError as error:
        raise _binary_error(f"text that is not UTF-8 ({error.reason})", pos) from None
    return out


def _text(body: bytes, pos: int, end: int) -> tuple[str, int]:
    if end - pos < 4:
        raise _binary_error("truncated header length", pos)
    size = _LENGTH.unpack_from(body, pos)[0]
    pos += 4
    if size > end - pos:
        raise _binary_error("header longer than the body", pos - 4)
    return body[pos : pos + size].decode("utf-8", _TEXT), pos + size


def _decode_binary(body: Body) -> list[Message]:
    """:func:`decode_body` for a binary batch: the subscriber's read path, so records
    without headers or position (the common ones) are read inline."""
    body = body if type(body) is bytes else bytes(body)  # slices of it are the payloads: immutable
    if body[:4] != BINARY_MAGIC:
        raise _binary_error("no BINARY_MAGIC", 0)
    end = len(body)
    pos = 4
    unpack = _RECORD.unpack_from
    new = _new_message
    set_topic, set_payload, set_headers, set_position = _set_topic, _set_payload, _set_headers, _set_position
    topics: dict[bytes, str] = {}  # a batch mostly repeats one topic
    out: list[Message] = []
    append = out.append
    try:
        while pos < end:
            if end - pos < _RECORD_SIZE:
                raise _binary_error("truncated record header", pos)
            flags, topic_len, payload_len, count = unpack(body, pos)
            if count or flags & ~_NULL_PAYLOAD & ~_NULL_HEADERS or (flags & _NULL_PAYLOAD and payload_len):
                topic, payload, headers, position, _, pos = _parse_binary(body, pos)[0]
                msg = new(Message)
                set_topic(msg, topic)
                set_payload(msg, b"" if payload is None else payload)
                set_headers(msg, {} if headers is None else headers)
                set_position(msg, position)
                append(msg)
                continue
            start = pos + _RECORD_SIZE
            middle = start + topic_len
            pos = middle + payload_len
            if pos > end:
                raise _binary_error("topic or payload longer than the body", start - _RECORD_SIZE)
            raw = body[start:middle]
            known = topics.get(raw)
            if known is None:
                known = topics[raw] = raw.decode("utf-8", _TEXT)
            msg = new(Message)
            set_topic(msg, known)
            set_payload(msg, body[middle:pos])
            set_headers(msg, {})
            set_position(msg, None)
            append(msg)
    except UnicodeDecodeError as error:
        raise _binary_error(f"text that is not UTF-8 ({error.reason})", pos) from None
    return out


def split_binary(body: Body) -> list[tuple[str, bytes, Optional[bytes], Optional[dict[str, str]]]]:
    """``(topic, record, payload, headers)`` per message of a binary batch, checked (the broker's view).

    ``record`` is the message's own bytes, forwarded unchanged to subscribers
    that read the binary encoding; ``payload`` and ``headers`` are None where
    the publisher sent Go's nil. Raises :class:`MessageError` if any is bad.
    """
    data = bytes(body)
    return [
        (topic, data[start:stop], payload, headers)  # type: ignore[misc]  # bytes slices
        for topic, payload, headers, _, start, stop in _parse_binary(data)
    ]
