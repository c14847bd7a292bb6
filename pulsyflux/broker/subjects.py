"""Who subscribes to what: topic patterns and queue groups (sans-I/O).

The broker asks :class:`Sublist` which subscriptions want a published topic,
and :class:`Group` which one member of a queue group takes a message. No
Twisted here; values are whatever the caller stores (the broker's outlets).

Topics and patterns follow the NATS subject syntax, checked by the one topic
rule (:func:`pulsyflux.wire.messages.topic_problem`): ``.``-separated tokens; in
a pattern ``*`` matches exactly one token and a last ``>`` one or more.

    >>> index = Sublist()
    >>> index.add("orders.*", "A"); index.add("orders.>", "B"); index.add("orders.eu", "C")
    >>> sorted(index.match("orders.eu")), sorted(index.match("orders.eu.paris"))
    (['A', 'B', 'C'], ['B'])

Like nats-server's sublist: plain topics are one dict lookup, patterns live
in a token trie, so a publish costs the same with 10 or 10,000
subscriptions. A walk visits each trie node at most once (a node is one
sequence of tokens and wildcards), and the trie is at most
``MAX_PATTERN_TOKENS`` deep, so even a trie built to make matching costly
costs at most its own size. There is no result cache: with many topics or
busy subscribing a cache thrashes (nats-server #710, #941, #4341), and the
walk of a usual topic is a few dict lookups.
"""

from __future__ import annotations

import re
from typing import Callable, Generic, Iterator, Optional, TypeVar

from ..wire.messages import MAX_PATTERN_TOKENS, check_topic, is_pattern

__all__ = ["Sublist", "Group", "Interest", "matcher", "matches"]

T = TypeVar("T")

_SEPARATOR = "."


class _Node(Generic[T]):
    """One trie level: literal next tokens, ``*``, and the values of patterns ending here or in ``>``."""

    __slots__ = ("literal", "star", "value", "rest")

    def __init__(self) -> None:
        self.literal: Optional[dict[str, _Node[T]]] = None  # made on first use: most nodes are leaves
        self.star: Optional[_Node[T]] = None
        self.value: Optional[T] = None  # the pattern that ends at this node
        self.rest: Optional[T] = None  # the pattern that is this node's tokens and then ">"

    def empty(self) -> bool:
        return self.value is None and self.rest is None and self.star is None and not self.literal


class Sublist(Generic[T]):
    """Patterns (and plain topics) mapped to one value each; :meth:`match` finds a topic's.

    Patterns must pass the topic rule for subscriptions (:meth:`add` checks),
    which bounds how deep the trie gets.
    """

    def __init__(self) -> None:
        self.literal: dict[str, T] = {}  # plain topics: the broker's fast path reads this directly
        self.patterns = 0  # wildcard patterns in the trie (0: every match is one dict lookup)
        self._root: _Node[T] = _Node()

    def __len__(self) -> int:
        return len(self.literal) + self.patterns

    def __contains__(self, pattern: str) -> bool:
        return self.get(pattern) is not None

    def __iter__(self) -> Iterator[str]:
        """Every pattern and plain topic held (plain topics first)."""
        for pattern, _ in self.items():
            yield pattern

    def items(self) -> Iterator[tuple[str, T]]:
        """``(pattern, value)`` for everything held (plain topics first)."""
        yield from self.literal.items()
        if self.patterns:
            yield from self._walk_patterns(self._root, [])

    def _walk_patterns(self, node: _Node[T], path: list[str]) -> Iterator[tuple[str, T]]:
        if node.value is not None:
            yield _SEPARATOR.join(path), node.value
        if node.rest is not None:
            yield _SEPARATOR.join([*path, ">"]), node.rest
        if node.star is not None:
            yield from self._walk_patterns(node.star, [*path, "*"])
        for token, child in (node.literal or {}).items():
            yield from self._walk_patterns(child, [*path, token])

    def get(self, pattern: str) -> Optional[T]:
        """The value stored for exactly ``pattern`` (not what matches it)."""
        if not is_pattern(pattern):
            return self.literal.get(pattern)
        node: Optional[_Node[T]] = self._root
        tokens = pattern.split(_SEPARATOR)
        last = tokens[-1]
        for token in tokens if last != ">" else tokens[:-1]:
            if node is None:
                return None
            node = node.star if token == "*" else (node.literal or {}).get(token)
        if node is None:
            return None
        return node.rest if last == ">" else node.value

    def add(self, pattern: str, value: T) -> None:
        """Store ``value`` for ``pattern``; ValueError for an invalid pattern or one already held."""
        check_topic(pattern, subscribing=True)
        if value is None:
            raise ValueError("value must not be None")
        if self.get(pattern) is not None:
            raise ValueError(f"{pattern!r} is already held")
        if not is_pattern(pattern):
            self.literal[pattern] = value
            return
        tokens = pattern.split(_SEPARATOR)
        node = self._root
        for token in tokens if tokens[-1] != ">" else tokens[:-1]:
            if token == "*":
                if node.star is None:
                    node.star = _Node()
                node = node.star
            else:
                if node.literal is None:
                    node.literal = {}
                child = node.literal.get(token)
                if child is None:
                    child = node.literal[token] = _Node()
                node = child
        if tokens[-1] == ">":
            node.rest = value
        else:
            node.value = value
        self.patterns += 1

    def remove(self, pattern: str) -> Optional[T]:
        """Forget ``pattern``; returns its value (None if it was not held). Empty trie nodes go too."""
        if not is_pattern(pattern):
            return self.literal.pop(pattern, None)
        tokens = pattern.split(_SEPARATOR)
        rest = tokens[-1] == ">"
        path: list[tuple[_Node[T], str]] = []  # (parent, token) down to the pattern's node
        node: Optional[_Node[T]] = self._root
        for token in tokens[:-1] if rest else tokens:
            assert node is not None
            path.append((node, token))
            node = node.star if token == "*" else (node.literal or {}).get(token)
            if node is None:
                return None
        assert node is not None
        value = node.rest if rest else node.value
        if value is None:
            return None
        if rest:
            node.rest = None
        else:
            node.value = None
        self.patterns -= 1
        while path and node is not None and node.empty():
            parent, token = path.pop()
            if token == "*":
                parent.star = None
            else:
                assert parent.literal is not None
                del parent.literal[token]
                if not parent.literal:
                    parent.literal = None
            node = parent
        return value

    def match(self, topic: str) -> list[T]:
        """The values of every pattern (and the plain topic) matching the concrete ``topic``.

        ``topic`` is a published one (no wildcards, checked by the caller);
        the work is bounded by the trie's depth, not by ``topic``'s length.
        """
        found: list[T] = []
        value = self.literal.get(topic)
        if value is not None:
            found.append(value)
        if self.patterns:
            self._match_patterns(topic, found)
        return found

    def _match_patterns(self, topic: str, found: list[T]) -> None:
        # Past MAX_PATTERN_TOKENS the trie has no node: the tail stays one
        # piece, so a topic of a million tokens is not split a million times.
        tokens = topic.split(_SEPARATOR, MAX_PATTERN_TOKENS)
        _walk(self._root, tokens, 0, len(tokens), found)


def _walk(node: _Node[T], tokens: list[str], depth: int, count: int, found: list[T]) -> None:
    """Collect the values under ``node`` matching ``tokens[depth:]``.

    A loop down one path, recursing only where ``*`` and a literal both
    match (so the recursion is at most the trie's depth); each node is
    reached by one path only, so it is visited at most once.
    """
    while True:
        if depth == count:
            if node.value is not None:
                found.append(node.value)
            return
        if node.rest is not None:
            found.append(node.rest)  # ">" takes the one or more tokens left
        literal = node.literal
        child = literal.get(tokens[depth]) if literal is not None else None
        star = node.star
        depth += 1
        if star is None:
            if child is None:
                return
            node = child
        else:
            if child is not None:
                _walk(child, tokens, depth, count, found)
            node = star


def matches(pattern: str, topic: str) -> bool:
    """Whether the concrete ``topic`` matches ``pattern`` (a plain topic matches only itself).

    >>> matches("orders.*", "orders.eu"), matches("orders.*", "orders.eu.paris"), matches("orders.>", "orders.eu.paris")
    (True, False, True)
    """
    if not is_pattern(pattern):
        return pattern == topic
    want = pattern.split(_SEPARATOR)
    have = topic.split(_SEPARATOR)
    if want[-1] == ">":
        if len(have) < len(want):
            return False
        have = have[: len(want) - 1]
        want = want[:-1]
    elif len(have) != len(want):
        return False
    return all(w == "*" and h != "" or w == h for w, h in zip(want, have))


def matcher(pattern: str) -> Callable[[str], bool]:
    """:func:`matches` for one pattern, made once: ``==`` for a plain topic, a regex for a pattern.

    A subscriber checks every message it receives with this (the broker
    sends only what matches; anyone else who writes there is refused).

    >>> accepts = matcher("orders.*"); accepts("orders.eu"), accepts("orders")
    (True, False)
    """
    if not is_pattern(pattern):
        return pattern.__eq__  # type: ignore[return-value]  # str.__eq__(str) is a bool
    parts = []
    for token in pattern.split(_SEPARATOR):
        if token == "*":
            parts.append(r"[^.]+")
        elif token == ">":
            parts.append(r"[^.]+(?:\.[^.]+)*")  # "." never inside a token: no backtracking blow-up
        else:
            parts.append(re.escape(token))
    compiled = re.compile(r"\.".join(parts))
    fullmatch = compiled.fullmatch
    return lambda topic: fullmatch(topic) is not None


class Group(Generic[T]):
    """The members of one queue group: each message goes to exactly one of them.

    Round-robin, skipping members without room (a full backlog), so a slow
    member gets less; when none has room, the next in turn takes it anyway
    (its backlog then drops its oldest, counted, rather than this message
    vanishing unseen).

        >>> group = Group("workers"); group.add("a"); group.add("b")
        >>> [group.pick(lambda m: True) for _ in range(3)]
        ['a', 'b', 'a']
    """

    __slots__ = ("name", "members", "elsewhere", "_next")

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: list[T] = []
        # In a cluster, another server delivers this group's messages (pulsyflux.cluster): none here.
        self.elsewhere = False
        self._next = 0

    def __len__(self) -> int:
        return len(self.members)

    def add(self, member: T) -> None:
        self.members.append(member)

    def remove(self, member: T) -> None:
        index = self.members.index(member)
        del self.members[index]
        if index < self._next:
            self._next -= 1  # the one whose turn it was keeps it

    def pick(self, has_room: Callable[[T], bool]) -> T:
        """The member to take the next message (the group must not be empty)."""
        members = self.members
        count = len(members)
        start = self._next if self._next < count else 0
        index = start
        while True:
            member = members[index]
            if has_room(member):
                break
            index += 1
            if index == count:
                index = 0
            if index == start:
                member = members[start]  # everyone is full: the one whose turn it is
                break
        self._next = index + 1 if index + 1 < count else 0
        return member


class Interest(Generic[T]):
    """The subscriptions of one pattern: plain ones (each gets a copy) and queue groups (one per group)."""

    __slots__ = ("plain", "groups")

    def __init__(self) -> None:
        self.plain: list[T] = []
        self.groups: dict[str, Group[T]] = {}

    def __len__(self) -> int:
        return len(self.plain) + sum(len(group) for group in self.groups.values())

    def add(self, member: T, group: Optional[str] = None) -> None:
        if group is None:
            self.plain.append(member)
            return
        found = self.groups.get(group)
        if found is None:
            found = self.groups[group] = Group(group)
        found.add(member)

    def remove(self, member: T, group: Optional[str] = None) -> None:
        """Forget ``member`` (ValueError if it is not here); an emptied group goes too."""
        if group is None:
            self.plain.remove(member)
            return
        found = self.groups[group]
        found.remove(member)
        if not found.members:
            del self.groups[group]

    def recipients(self, has_room: Callable[[T], bool], out: list[T]) -> None:
        """Append to ``out`` who gets one message: every plain member, one member per group
        (of the groups this server delivers, in a cluster)."""
        out.extend(self.plain)
        for group in self.groups.values():
            if not group.elsewhere:
                out.append(group.pick(has_room))
