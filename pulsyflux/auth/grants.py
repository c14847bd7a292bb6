"""Grants: which channels a bearer may provide or consume on, which topics it may publish or subscribe to.

Plain data and plain code (no Twisted, no PyJWT), shared by the server, the
broker and ``pulsyflux token``. A grant set is four rule lists::

    {"provide": ["6f1c...-uuid"], "consume": ["*"],
     "publish": ["orders.new"], "subscribe": ["!orders.audit.>", "orders.>"]}

Rules of one right are read as the operators of Centrifugo and Crossbar
expect (shared/FIELD-NOTES.md, "Tokens and permissions"): an *exact* rule
(no wildcard) that names the thing beats every wildcard rule; otherwise the
*first* wildcard rule that matches decides. ``!`` in front of a rule denies.
Topic rules use the broker's subject syntax (NATS: ``.`` separates tokens,
``*`` is one token, ``>`` the rest, one token or more); channel rules are
UUIDs or ``*`` (any channel).

A wildcard *subscription* is a request for every topic it matches, so it
needs a rule that covers the whole pattern (crossbario/crossbar#430, Redis
PR #7993): ``orders.>`` does not follow from a grant of ``orders.eu.>``, and
a deny rule that overlaps it, met first, refuses it.

Patterns are checked by the one topic rule (:func:`pulsyflux.wire.messages.topic_problem`,
as a subscription), so a grant can name exactly what a subscriber can; what
is added here is how two patterns relate (:func:`covers`, :func:`overlaps`).
"""

from __future__ import annotations

import uuid
from typing import Any, Iterable, Mapping, Optional

from ..wire.messages import is_pattern, topic_problem

__all__ = [
    "RIGHTS",
    "CHANNEL_RIGHTS",
    "TOPIC_RIGHTS",
    "MAX_RULES",
    "MAX_RULE_CHARS",
    "GrantError",
    "Grants",
    "covers",
    "overlaps",
]

CHANNEL_RIGHTS = ("provide", "consume")
TOPIC_RIGHTS = ("publish", "subscribe")
RIGHTS = CHANNEL_RIGHTS + TOPIC_RIGHTS
EXTRA_RIGHTS = ("stats",)  # a boolean: may read /stats and /metrics where the server asks for a token
MAX_RULES = 256  # rules in one right: a token is bounded anyway, a grant set is too
MAX_RULE_CHARS = 1024  # as a topic (messages.MAX_TOPIC_CHARS)
_CACHE = 1024  # decisions remembered per grant set and right (cleared when full)
DENY = "!"
ONE = "*"
REST = ">"


class GrantError(ValueError):
    """A grant set that cannot be read: wrong shape, bad pattern, bad channel."""


def _tokens(pattern: str) -> list[str]:
    return pattern.split(".")


def _check_pattern(pattern: str) -> None:
    """A topic rule is anything one may subscribe to (the broker's topic rule, one owner)."""
    problem = topic_problem(pattern, subscribing=True)
    if problem is not None:
        raise GrantError(f"topic rule {pattern!r}: {problem}")


def covers(rule: str, pattern: str) -> bool:
    """True if every topic ``pattern`` matches is matched by ``rule`` (a literal pattern: it matches)."""
    r = _tokens(rule)
    p = _tokens(pattern)
    for i, token in enumerate(r):
        if token == REST:
            return len(p) > i  # one token or more left, whatever they are
        if i >= len(p):
            return False
        other = p[i]
        if other == REST:
            return False  # the pattern goes deeper than the rule ever does here
        if token != ONE and token != other:
            return False  # a literal rule token covers only itself (not '*')
    return len(r) == len(p)


def overlaps(rule: str, pattern: str) -> bool:
    """True if some topic is matched by both ``rule`` and ``pattern``."""
    r = _tokens(rule)
    p = _tokens(pattern)
    for i in range(min(len(r), len(p))):
        a, b = r[i], p[i]
        if a == REST or b == REST:
            return True
        if a != b and a != ONE and b != ONE:
            return False
    return len(r) == len(p)


class _Rules:
    """One right's rules: exact names (allowed or denied), then wildcard rules in order."""

    __slots__ = ("exact", "wild", "cache", "topics")

    def __init__(self, right: str, rules: Iterable[str]) -> None:
        self.topics = right in TOPIC_RIGHTS
        self.exact: dict[str, bool] = {}
        self.wild: list[tuple[str, bool]] = []
        self.cache: dict[str, bool] = {}
        for rule in rules:
            if not isinstance(rule, str):
                raise GrantError(f"{right} rules are strings, not {type(rule).__name__}")
            if len(rule) > MAX_RULE_CHARS:
                raise GrantError(f"{right} rule longer than {MAX_RULE_CHARS} characters")
            allow = not rule.startswith(DENY)
            name = rule if allow else rule[1:]
            if self.topics:
                _check_pattern(name)
                if is_pattern(name):
                    self.wild.append((name, allow))
                else:
                    self.exact.setdefault(name, allow)
            elif name == ONE:
                self.wild.append((name, allow))
            else:
                try:
                    name = str(uuid.UUID(name))
                except ValueError:
                    raise GrantError(f"{right} rule {name!r} is neither a channel UUID nor '*'") from None
                self.exact.setdefault(name, allow)

    def allows(self, name: str) -> bool:
        """The decision for one topic or subscription pattern (channels: the UUID's text)."""
        decided = self.cache.get(name)
        if decided is None:
            decided = self._decide(name)
            if len(self.cache) >= _CACHE:
                self.cache.clear()  # a bounded memory whatever topics a peer names
            self.cache[name] = decided
        return decided

    def _decide(self, name: str) -> bool:
        exact = self.exact.get(name)
        if exact is not None:
            return exact  # an exact rule beats every wildcard
        if not self.topics:
            for _, allow in self.wild:  # '*' or '!*': the first decides
                return allow
            return False
        wildcard = is_pattern(name)
        if wildcard:
            # An exact rule that lies inside the pattern and denies makes the pattern too wide.
            if any(not allow and covers(name, rule) for rule, allow in self.exact.items()):
                return False
        for rule, allow in self.wild:
            if allow and covers(rule, name):
                return True
            if not allow and overlaps(rule, name):
                return False
        return False

    def as_list(self) -> list[str]:
        out = [name if allow else DENY + name for name, allow in self.exact.items()]
        out += [name if allow else DENY + name for name, allow in self.wild]
        return out


class Grants:
    """The rights of one token (or of anonymous clients): four rule lists and ``stats``.

    ``may("subscribe", "orders.>")`` and friends decide; every decision is
    cached per grant set (bounded), so the broker pays a dict lookup per
    published message once a topic has been seen.
    """

    __slots__ = ("_rules", "stats", "may_provide", "may_consume", "may_publish", "may_subscribe")

    def __init__(self, rules: Optional[Mapping[str, Any]] = None) -> None:
        rules = rules or {}
        if not isinstance(rules, Mapping):
            raise GrantError(f"grants are an object of rule lists, not {type(rules).__name__}")
        unknown = set(rules) - set(RIGHTS) - set(EXTRA_RIGHTS)
        if unknown:
            raise GrantError(f"unknown right(s): {', '.join(sorted(map(str, unknown)))}; known: {', '.join(RIGHTS)}")
        self._rules: dict[str, _Rules] = {}
        for right in RIGHTS:
            given = rules.get(right, [])
            if isinstance(given, str):
                given = [given]
            if not isinstance(given, list) or len(given) > MAX_RULES:
                raise GrantError(f"{right} takes a list of at most {MAX_RULES} rules")
            self._rules[right] = _Rules(right, given)
        self.stats = rules.get("stats", False) is True
        self.may_provide = self._rules["provide"].allows
        self.may_consume = self._rules["consume"].allows
        self.may_publish = self._rules["publish"].allows
        self.may_subscribe = self._rules["subscribe"].allows

    @classmethod
    def none(cls) -> "Grants":
        """No right at all (anonymous clients when the auth file says ``"none"``)."""
        return cls({})

    @classmethod
    def everything(cls) -> "Grants":
        """Every right: what every client has when the server runs without ``--auth``."""
        return cls({"provide": ["*"], "consume": ["*"], "publish": [">"], "subscribe": [">"], "stats": True})

    def may(self, right: str, name: str) -> bool:
        """``right`` is one of :data:`RIGHTS`; ``name`` a channel's UUID text or a topic/pattern."""
        return self._rules[right].allows(name)

    def may_channel(self, right: str, channel: bytes) -> bool:
        """:meth:`may` for a 16-byte channel id."""
        return self._rules[right].allows(str(uuid.UUID(bytes=channel)))

    @property
    def uses_broker(self) -> bool:
        """True if some rule allows publishing or subscribing: then the broker's channel may be consumed."""
        return any(allow for right in TOPIC_RIGHTS for allow in self._rules[right].exact.values()) or any(
            allow for right in TOPIC_RIGHTS for _, allow in self._rules[right].wild
        )

    def as_dict(self) -> dict[str, Any]:
        """The rules as a token carries them (only the rights that have rules)."""
        out: dict[str, Any] = {right: rules.as_list() for right, rules in self._rules.items() if rules.as_list()}
        if self.stats:
            out["stats"] = True
        return out

    def __repr__(self) -> str:
        return f"Grants({self.as_dict()!r})"
