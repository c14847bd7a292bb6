"""Topic patterns and queue groups, without the network (pulsyflux.broker.subjects)."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pulsyflux.broker.subjects import Group, Interest, Sublist, matcher, matches
from pulsyflux.wire.messages import MAX_PATTERN_TOKENS, MAX_TOPIC_CHARS, check_topic, topic_problem

# -- the topic rule -----------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    [
        "orders",
        "orders.eu",
        "a b",  # spaces were always fine, and stay so
        "my topic.with spaces",
        "é.中.😀",
        "v1/orders",
        "a-b_c:d",
        ".".join(["t"] * 300),  # a deep plain topic: looked up whole, not bounded in tokens
    ],
)
def test_old_topics_stay_valid_for_publish_and_subscribe(topic: str) -> None:
    assert topic_problem(topic) is None
    assert topic_problem(topic, subscribing=True) is None


@pytest.mark.parametrize(
    ("topic", "problem"),
    [
        ("", "topic must not be empty"),
        ("orders.*", "token 2 is the wildcard '*': wildcards are for subscribing"),
        ("orders.>", "token 2 is the wildcard '>'"),
        ("*", "token 1 is the wildcard '*'"),
        ("orders..eu", "token 2 is empty"),
        (".orders", "token 1 is empty"),
        ("orders.", "token 2 is empty"),
        (".", "token 1 is empty"),
        ("orders.*x", "token 2 ('*x') mixes '*' or '>' with other text"),
        ("a>b", "token 1 ('a>b') mixes"),
        ("$pulsyflux/subscribe", "topics starting with '$pulsyflux/' are reserved"),
    ],
)
def test_publish_topics_refused(topic: str, problem: str) -> None:
    found = topic_problem(topic)
    assert found is not None and found.startswith(problem), found
    with pytest.raises(ValueError, match="^" + re.escape(problem)):
        check_topic(topic)


@pytest.mark.parametrize("pattern", ["orders.*", "orders.>", "*", ">", "*.*.eu", "orders.*.>", "a b.*"])
def test_patterns_accepted_for_subscribing(pattern: str) -> None:
    assert topic_problem(pattern, subscribing=True) is None
    assert topic_problem(pattern) is not None  # and never published to


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("orders.*x", "token 2 ('*x') mixes '*' or '>' with other text: a wildcard is a whole token"),
        ("orders.>x", "token 2 ('>x') mixes"),
        ("orders.>.eu", "token 2 is '>', which matches the rest of a topic: it can only be the last token"),
        (">.>", "token 1 is '>'"),
        ("orders..*", "token 2 is empty"),
        ("orders.*.", "token 3 is empty"),
        (".".join(["*"] * (MAX_PATTERN_TOKENS + 1)), f"a pattern is at most {MAX_PATTERN_TOKENS} tokens, not 33"),
        ("x" * (MAX_TOPIC_CHARS - 1) + ".*", "a topic is at most 1024 characters"),
    ],
)
def test_malformed_patterns_refused(pattern: str, problem: str) -> None:
    found = topic_problem(pattern, subscribing=True)
    assert found is not None and found.startswith(problem), found


def test_error_quotes_a_long_token_only_in_part() -> None:
    found = topic_problem("a." + "*" + "x" * 10_000)
    assert found is not None and len(found) < 200


def test_deepest_pattern_is_accepted() -> None:
    assert topic_problem(".".join(["*"] * MAX_PATTERN_TOKENS), subscribing=True) is None


# -- the matcher --------------------------------------------------------------


def _reference(pattern: str, topic: str) -> bool:
    """Brute force, token by token, written apart from the code under test."""

    def walk(p: list[str], t: list[str]) -> bool:
        if not p:
            return not t
        if p[0] == ">":
            return len(t) >= 1
        if not t:
            return False
        return (p[0] == "*" or p[0] == t[0]) and walk(p[1:], t[1:])

    return walk(pattern.split("."), topic.split("."))


_token = st.sampled_from(["a", "b", "c", "ab"])
_topic = st.lists(_token, min_size=1, max_size=6).map(".".join)
_pattern = st.lists(st.sampled_from(["a", "b", "c", "ab", "*", "*"]), min_size=1, max_size=5).flatmap(
    lambda tokens: (
        st.sampled_from([".".join(tokens), ".".join([*tokens, ">"])]) if len(tokens) < 5 else st.just(".".join(tokens))
    )
)
_pattern = st.one_of(_pattern, st.just(">"))


@settings(max_examples=300, deadline=None)
@given(st.sets(_pattern, max_size=25), st.lists(_topic, min_size=1, max_size=10))
def test_sublist_matches_like_brute_force(patterns: set[str], topics: list[str]) -> None:
    index: Sublist[str] = Sublist()
    for pattern in patterns:
        index.add(pattern, pattern)
    assert len(index) == len(patterns)
    assert set(index) == patterns
    for topic in topics:
        found = index.match(topic)
        assert len(found) == len(set(found))  # each pattern at most once
        assert set(found) == {p for p in patterns if _reference(p, topic)}
        for pattern in patterns:
            assert matches(pattern, topic) == _reference(pattern, topic)
            assert matcher(pattern)(topic) == _reference(pattern, topic)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), _pattern), max_size=40), st.lists(_topic, min_size=1, max_size=5))
def test_sublist_add_and_remove_like_brute_force(steps: list[tuple[bool, str]], topics: list[str]) -> None:
    index: Sublist[str] = Sublist()
    held: set[str] = set()
    for adding, pattern in steps:
        if adding and pattern not in held:
            index.add(pattern, pattern)
            held.add(pattern)
        elif not adding:
            assert index.remove(pattern) == (pattern if pattern in held else None)
            held.discard(pattern)
        assert (pattern in index) == (pattern in held)
    for topic in topics:
        assert set(index.match(topic)) == {p for p in held if _reference(p, topic)}
    for pattern in list(held):
        index.remove(pattern)
    assert len(index) == 0 and _nodes(index) == 1  # every emptied node went: no leak under churn


def _nodes(index: Sublist[str]) -> int:
    count = 0
    stack = [index._root]
    while stack:
        node = stack.pop()
        count += 1
        if node.star is not None:
            stack.append(node.star)
        stack.extend((node.literal or {}).values())
    return count


def test_adding_an_invalid_or_held_pattern_is_refused() -> None:
    index: Sublist[str] = Sublist()
    index.add("orders.*", "x")
    with pytest.raises(ValueError, match="already held"):
        index.add("orders.*", "y")
    with pytest.raises(ValueError, match="token 2"):
        index.add("orders.*x", "y")
    assert index.remove("orders.>") is None and index.remove("other.*") is None and index.remove("nope") is None


# -- worst inputs ---------------------------------------------------------------


def test_ten_thousand_patterns_match_only_what_they_should() -> None:
    index: Sublist[int] = Sublist()
    for n in range(10_000):
        index.add(f"orders.{n}.*", n)
    index.add("orders.>", -1)
    assert sorted(index.match("orders.4242.paris")) == [-1, 4242]
    assert index.match("orders.4242") == [-1]
    assert index.match("other.1.x") == []
    assert _nodes(index) == 1 + 1 + 10_000 * 2  # root, "orders", then one node per token


def test_a_very_deep_topic_is_not_split_whole() -> None:
    index: Sublist[str] = Sublist()
    index.add("a.>", "tail")
    index.add(".".join(["a"] * MAX_PATTERN_TOKENS), "deepest")
    index.add(".".join(["*"] * MAX_PATTERN_TOKENS), "stars")
    deep = ".".join(["a"] * 1_000_000)
    assert index.match(deep) == ["tail"]
    exact = ".".join(["a"] * MAX_PATTERN_TOKENS)
    assert sorted(index.match(exact)) == ["deepest", "stars", "tail"]
    assert sorted(index.match(exact + ".a")) == ["tail"]


def test_a_trie_built_to_branch_costs_at_most_its_own_size() -> None:
    # Every mix of "a" and "*" over 12 tokens: a topic "a.a.....a" matches them all,
    # each once; the trie holds one node per distinct prefix, and bounds the walk.
    index: Sublist[str] = Sublist()
    for tokens in itertools.product("a*", repeat=12):
        index.add(".".join(tokens), ".".join(tokens))
    assert len(index.match(".".join(["a"] * 12))) == 2**12
    assert _nodes(index) == 2**13 - 2  # "a.a.....a" has no wildcard: a dict entry, not a trie path


# -- queue groups -----------------------------------------------------------------


def test_group_round_robin_skips_full_members() -> None:
    group: Group[str] = Group("workers")
    for name in "abc":
        group.add(name)
    full = {"b"}
    picks = [group.pick(lambda m: m not in full) for _ in range(4)]
    assert picks == ["a", "c", "a", "c"]
    full = {"a", "b", "c"}
    assert [group.pick(lambda m: m not in full) for _ in range(3)] == ["a", "b", "c"]  # nobody has room: turns


def test_group_keeps_its_turn_across_removal() -> None:
    group: Group[str] = Group("workers")
    for name in "abcd":
        group.add(name)
    assert group.pick(lambda m: True) == "a"
    assert group.pick(lambda m: True) == "b"
    group.remove("a")  # before the cursor: "c" is still next
    assert group.pick(lambda m: True) == "c"
    group.remove("d")  # the one whose turn it was: wrap around
    assert group.pick(lambda m: True) == "b"


def test_interest_gives_one_per_group_and_a_copy_per_plain_member() -> None:
    interest: Interest[str] = Interest()
    interest.add("p1")
    interest.add("p2")
    for name in ("w1", "w2", "w3"):
        interest.add(name, "workers")
    for name in ("l1", "l2"):
        interest.add(name, "loggers")
    got: dict[str, int] = {}
    for _ in range(600):
        out: list[str] = []
        interest.recipients(lambda m: True, out)
        assert out[:2] == ["p1", "p2"]
        assert sum(m.startswith("w") for m in out) == 1 and sum(m.startswith("l") for m in out) == 1
        for m in out:
            got[m] = got.get(m, 0) + 1
    assert got == {"p1": 600, "p2": 600, "w1": 200, "w2": 200, "w3": 200, "l1": 300, "l2": 300}
    interest.remove("l1", "loggers")
    interest.remove("l2", "loggers")
    assert "loggers" not in interest.groups and len(interest) == 5


def test_a_group_with_many_members() -> None:
    group: Group[int] = Group("many")
    for n in range(10_000):
        group.add(n)
    # Only the last member has room: found in one pass, and the cursor moves past it.
    assert group.pick(lambda m: m == 9_999) == 9_999
    assert group.pick(lambda m: True) == 0
