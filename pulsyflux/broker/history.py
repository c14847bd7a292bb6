"""Retained history per topic: positions, bounded storage, replay (sans-I/O).

The broker keeps the last messages of each topic so that a subscriber can
start with them (``last=N``) or resume after a gap (``since=position``).
No Twisted here: the broker's fan-out calls it, tests drive it directly.

    >>> history = History(max_messages=2, epoch_prefix="e")
    >>> position, text = history.append("orders", '{"Topic":"orders"}')
    >>> str(position), text
    ('e1:1', '{"Topic":"orders","Position":"e1:1"}')

**Positions.** Every retained message gets ``(epoch, seq)``: ``seq`` counts
the topic's messages from 1, ``epoch`` names the run of that count. A topic
gets a fresh epoch whenever its state is created: when a broker starts
(whose epochs all begin with a random prefix), and when a topic that was
forgotten is published to again. A position is therefore never reused for
another message, and a subscriber resuming from a position of another epoch
learns that it cannot be complete (``recovered`` False) instead of getting
the wrong messages (centrifugal/centrifugo#768: a sequence reset under a
kept epoch).

**Bounds** (memory stays bounded whatever publishers do): per topic at most
``max_messages`` messages and ``max_bytes``; across topics ``total_bytes``.
Bytes are the characters of the messages' JSON plus a fixed estimate of the
bookkeeping per message and per topic, so a flood of tiny messages or of
distinct topics is bounded too. Past the total, the oldest messages of the
topic published to least recently go first, and a topic whose last message
goes is forgotten (unless a subscriber pins it: its epoch and seq stay, so a
subscriber's position stays meaningful).
"""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict, deque
from typing import NamedTuple, Optional

from ..wire.messages import Position, epoch_ok

__all__ = [
    "History",
    "Position",
    "Replay",
    "DEFAULT_HISTORY_BYTES",
    "DEFAULT_HISTORY_TOTAL_BYTES",
    "ENTRY_OVERHEAD",
    "TOPIC_OVERHEAD",
]

DEFAULT_HISTORY_BYTES = 1 << 20  # per topic
DEFAULT_HISTORY_TOTAL_BYTES = 64 << 20  # all topics together
# What a retained message and a topic cost beyond their text, as counted in
# the budget (measured with tracemalloc on CPython 3.11): a message, its str
# header and deque slot; a topic, its state, deque block, epoch, name and
# dict entries (tests/test_history.py checks the budget against real memory).
ENTRY_OVERHEAD = 64
TOPIC_OVERHEAD = 1024


class Replay(NamedTuple):
    """What a subscriber starting at a position gets.

    ``texts``: the retained messages to deliver first, oldest first;
    ``recovered``: whether they are everything after the asked position;
    ``start``: the position right before the first of them (the topic's
    position now when there are none): every message the subscription
    gets comes after it, so a subscriber that loses its line before the
    first one arrives resumes from there.
    """

    texts: list[str]
    recovered: bool
    start: Position


class _Topic:
    __slots__ = ("name", "epoch", "seq", "texts", "size", "pins")

    def __init__(self, name: str, epoch: str) -> None:
        self.name = name
        self.epoch = epoch
        self.seq = 0  # the last seq given; the retained ones are seq - len(texts) + 1 .. seq
        self.texts: deque[str] = deque()
        self.size = 0  # counted bytes of the retained messages
        self.pins = 0  # subscriptions keeping the state alive


class History:
    """Retained messages of every topic, with their positions.

    ``max_messages`` (N >= 1) and ``max_bytes`` bound each topic,
    ``total_bytes`` all of them. ``epoch_prefix`` (default: random) starts
    every epoch of this history.
    """

    def __init__(
        self,
        max_messages: int,
        max_bytes: int = DEFAULT_HISTORY_BYTES,
        total_bytes: int = DEFAULT_HISTORY_TOTAL_BYTES,
        epoch_prefix: Optional[str] = None,
    ) -> None:
        if max_messages < 1 or max_bytes < 1 or total_bytes < 1:
            raise ValueError("history bounds must be >= 1")
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.total_bytes = total_bytes
        self.prefix = os.urandom(5).hex() if epoch_prefix is None else epoch_prefix
        if not epoch_ok(self.prefix + "0") or ":" in self.prefix:
            raise ValueError("epoch_prefix must be short printable ASCII without ':', '\"' or '\\'")
        self._generation = itertools.count(1)
        self._topics: dict[str, _Topic] = {}
        # Topics holding messages, least recently published first: who gives way past total_bytes.
        self._lru: OrderedDict[str, _Topic] = OrderedDict()
        self.size = 0  # counted bytes of everything: messages and topic states
        self.messages = 0  # messages retained now
        self.evicted = 0  # messages that left before their topic's own bounds asked (total budget)
        self.forgotten = 0  # topic states dropped because nothing was retained any more

    @property
    def topics(self) -> int:
        """Topics with a state now (no ``__len__``: an empty History must still be true)."""
        return len(self._topics)

    def _state(self, topic: str) -> _Topic:
        state = self._topics.get(topic)
        if state is None:
            state = _Topic(topic, f"{self.prefix}{next(self._generation):x}")
            self._topics[topic] = state
            self.size += TOPIC_OVERHEAD + len(topic)
        return state

    def append(self, topic: str, text: str) -> tuple[Position, str]:
        """Retain a published message (its JSON ``text``, an object); its position and its text with it.

        The returned text is ``text`` with ``"Position":"EPOCH:SEQ"`` added
        last (so it wins over a publisher's own key of that name): what the
        broker forwards and replays.
        """
        state = self._topics.get(topic)
        if state is None:
            state = self._state(topic)
        seq = state.seq + 1
        state.seq = seq
        position = Position(state.epoch, seq)
        text = f'{text[:-1]},"Position":"{state.epoch}:{seq}"}}'
        cost = len(text) + ENTRY_OVERHEAD
        texts = state.texts
        texts.append(text)
        state.size += cost
        self.size += cost
        self.messages += 1
        lru = self._lru
        if topic in lru:
            lru.move_to_end(topic)
        else:
            lru[topic] = state
        if len(texts) > self.max_messages or state.size > self.max_bytes:
            self._trim(state)
        if self.size > self.total_bytes:
            self._shrink()
        return position, text

    def _drop_oldest(self, state: _Topic) -> None:
        cost = len(state.texts.popleft()) + ENTRY_OVERHEAD
        state.size -= cost
        self.size -= cost
        self.messages -= 1

    def _trim(self, state: _Topic) -> None:
        """The topic's own bounds; a message larger than ``max_bytes`` alone is not kept at all."""
        texts = state.texts
        while texts and (len(texts) > self.max_messages or state.size > self.max_bytes):
            self._drop_oldest(state)
        if not texts:
            self._emptied(state)

    def _shrink(self) -> None:
        """Past ``total_bytes``: the oldest messages of the least recently published topics go."""
        lru = self._lru
        while self.size > self.total_bytes and lru:
            state = next(iter(lru.values()))
            self._drop_oldest(state)
            self.evicted += 1
            if not state.texts:
                self._emptied(state)

    def _emptied(self, state: _Topic) -> None:
        self._lru.pop(state.name, None)
        if not state.pins:
            self._forget(state)

    def _forget(self, state: _Topic) -> None:
        del self._topics[state.name]
        self.size -= TOPIC_OVERHEAD + len(state.name)
        self.forgotten += 1

    # -- subscribers ------------------------------------------------------------

    def subscribe(self, topic: str, since: Optional[Position] = None, last: Optional[int] = None) -> Replay:
        """A subscription to ``topic`` starts now: what it gets first; the topic is pinned until :meth:`unsubscribe`.

        Pinned, the topic keeps its epoch and seq even when nothing is
        retained, so the subscriber's position stays meaningful.
        ``since``: the retained messages after that position; ``recovered``
        is False when ``since`` is of another epoch (the broker restarted, or
        the topic was forgotten meanwhile), or older than the oldest retained
        (then every retained message comes), or ahead of the topic. ``last``:
        the last ``last`` retained (``recovered`` True). Neither: nothing.
        """
        state = self._state(topic)
        state.pins += 1
        texts = state.texts
        if since is not None:
            first = state.seq - len(texts) + 1  # seq of the oldest retained
            if since.epoch != state.epoch or since.seq > state.seq or since.seq < first - 1:
                replayed, recovered = list(texts), False
            else:
                replayed, recovered = list(itertools.islice(texts, since.seq - first + 1, None)), True
        elif last:
            replayed, recovered = list(itertools.islice(texts, max(len(texts) - last, 0), None)), True
        else:
            replayed, recovered = [], True
        return Replay(replayed, recovered, Position(state.epoch, state.seq - len(replayed)))

    def unsubscribe(self, topic: str) -> None:
        """A subscription made by :meth:`subscribe` ended."""
        state = self._topics.get(topic)
        if state is None or not state.pins:
            return
        state.pins -= 1
        if not state.pins and not state.texts:
            self._forget(state)

    def top(self, topic: str) -> Optional[Position]:
        """The topic's position now (seq 0 before its first message), or None if it has no state."""
        state = self._topics.get(topic)
        return None if state is None else Position(state.epoch, state.seq)

    def latest(self, topic: str, last: int) -> list[str]:
        """The last ``last`` retained texts of ``topic`` (oldest first), without creating anything."""
        state = self._topics.get(topic)
        if state is None or last <= 0:
            return []
        texts = state.texts
        return list(itertools.islice(texts, max(len(texts) - last, 0), None))

    def stats(self) -> dict[str, int]:
        return {
            "topics": len(self._topics),
            "messages": self.messages,
            "bytes": self.size,
            "evicted": self.evicted,
            "forgotten": self.forgotten,
        }
