"""How pub/sub is shaped on Redis: which channel a topic travels on, and the envelope.

Twisted-free, so it can be read and tested alone.

A message travels on the sharded channel of its topic's *first token*
(``orders.eu.paris`` on ``<prefix>m:orders``): one ``SPUBLISH`` per message
(per batch, in fact) however many servers subscribe, and a server
subscribes only to the first tokens its subscribers' topics and patterns
name, then matches exactly itself. A pattern whose first token is a
wildcard (``*.eu``, ``>``) cannot name a channel: the servers holding one
subscribe to the *firehose* channel, and publishers send there too while
any server wants it (a flag in Redis with a lease). So a publish costs one
Redis publish, or two while someone holds a leading-wildcard pattern.
(FIELD-NOTES: per-subject pattern subscriptions in Redis make every publish
cost O(patterns); everyone-gets-everything wastes most traffic.)

The envelope: ``pf1 <node> <flags>\\n`` then the messages' JSON texts as a
JSON array (a broker batch body). ``node`` lets a server skip its own
messages (delivered locally already); flag ``f`` says the message also went
to the firehose, so a server on both channels takes one copy.
"""

from __future__ import annotations

from typing import Iterable, Optional

__all__ = [
    "DEFAULT_PREFIX",
    "Envelope",
    "EnvelopeError",
    "Interest",
    "batches",
    "channel_of",
    "decode_envelope",
    "encode_envelope",
    "firehose",
]

DEFAULT_PREFIX = "pulsyflux:"
MAGIC = b"pf1"
MAX_NODE_NAME = 200  # characters in a node name (it is in every envelope)
_WILD = ("*", ">")


class EnvelopeError(ValueError):
    """What came from Redis is not a pulsyflux envelope."""


def first_token(topic: str) -> str:
    dot = topic.find(".")
    return topic if dot < 0 else topic[:dot]


def channel_of(prefix: str, topic: str) -> Optional[bytes]:
    """The channel a topic (or pattern) travels on; None for a leading wildcard (the firehose)."""
    token = first_token(topic)
    if token in _WILD:
        return None
    return (prefix + "m:" + token).encode("utf-8")


def firehose(prefix: str) -> bytes:
    return (prefix + "all").encode("utf-8")


def firehose_flag(prefix: str) -> str:
    """The key whose presence tells publishers to copy to the firehose."""
    return prefix + "firehose"


def batches(prefix: str, items: Iterable[tuple[str, str]]) -> dict[bytes, list[str]]:
    """``(topic, text)`` pairs grouped by channel, each group in publish order."""
    out: dict[bytes, list[str]] = {}
    for topic, text in items:
        channel = channel_of(prefix, topic)
        if channel is None:  # a publish topic never starts with a wildcard; a defence
            continue
        group = out.get(channel)
        if group is None:
            out[channel] = [text]
        else:
            group.append(text)
    return out


def encode_envelope(node: str, texts: list[str], also_firehose: bool = False) -> bytes:
    head = b"pf1 " + node.encode("utf-8") + (b" f\n" if also_firehose else b" -\n")
    return head + ("[" + ",".join(texts) + "]").encode("utf-8")


class Envelope:
    __slots__ = ("node", "also_firehose", "body")

    def __init__(self, node: str, also_firehose: bool, body: bytes) -> None:
        self.node = node
        self.also_firehose = also_firehose
        self.body = body


def decode_envelope(data: bytes) -> Envelope:
    newline = data.find(b"\n", 0, MAX_NODE_NAME * 4 + 16)
    if newline < 0:
        raise EnvelopeError("no envelope header")
    fields = data[:newline].split(b" ")
    if len(fields) != 3 or fields[0] != MAGIC or fields[2] not in (b"f", b"-"):
        raise EnvelopeError("not a pulsyflux envelope")
    try:
        node = fields[1].decode("utf-8")
    except UnicodeDecodeError:
        raise EnvelopeError("node name is not UTF-8") from None
    if not node.isprintable():  # it is logged
        raise EnvelopeError("node name is not printable")
    return Envelope(node, fields[2] == b"f", data[newline + 1 :])


def check_node_name(name: str) -> None:
    """A node name goes in every envelope and key: short, printable, no spaces."""
    if not name or len(name) > MAX_NODE_NAME or not name.isprintable() or " " in name:
        raise ValueError(f"a node name is 1-{MAX_NODE_NAME} printable characters without spaces")


class Interest:
    """Which channels this server needs, counted by the patterns that need them.

    ``add`` and ``remove`` return the channel to (un)subscribe when the count
    crosses zero, else None; the firehose is a channel like the others.
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self.counts: dict[bytes, int] = {}

    def _channel(self, pattern: str) -> bytes:
        channel = channel_of(self.prefix, pattern)
        return firehose(self.prefix) if channel is None else channel

    def add(self, pattern: str) -> Optional[bytes]:
        channel = self._channel(pattern)
        count = self.counts.get(channel, 0)
        self.counts[channel] = count + 1
        return channel if count == 0 else None

    def remove(self, pattern: str) -> Optional[bytes]:
        channel = self._channel(pattern)
        count = self.counts.get(channel, 0)
        if count <= 1:
            if count:
                del self.counts[channel]
                return channel
            return None
        self.counts[channel] = count - 1
        return None

    @property
    def wants_firehose(self) -> bool:
        return firehose(self.prefix) in self.counts

    def channels(self) -> list[bytes]:
        return list(self.counts)
