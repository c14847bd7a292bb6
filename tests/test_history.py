"""The retained history's core (pulsyflux.history): positions, bounds, replay."""

from __future__ import annotations

import doctest
import json

import pytest

from pulsyflux.broker import history as history_module
from pulsyflux.broker.history import ENTRY_OVERHEAD, TOPIC_OVERHEAD, History
from pulsyflux.wire import messages
from pulsyflux.wire.messages import Position


def _text(topic: str, payload: bytes = b"x") -> str:
    return messages.encode_text(topic, payload, None)


def _seqs(texts: list[str]) -> list[int]:
    return [Position.parse(json.loads(t)["Position"]).seq for t in texts]


def test_doctests() -> None:
    assert doctest.testmod(history_module).failed == 0
    assert doctest.testmod(messages).failed == 0


def test_positions_count_per_topic_and_ride_in_the_text() -> None:
    h = History(10, epoch_prefix="p")
    a1, text = h.append("a", _text("a", b"one"))
    a2, _ = h.append("a", _text("a"))
    b1, _ = h.append("b", _text("b"))
    assert (a1.seq, a2.seq, b1.seq) == (1, 2, 1)
    assert a1.epoch == a2.epoch != b1.epoch
    decoded = messages.decode(text.encode())
    assert decoded.payload == b"one" and json.loads(text)["Position"] == str(a1)


def test_a_publishers_own_position_key_is_overridden() -> None:
    h = History(10, epoch_prefix="p")
    forged = '{"Topic":"a","Payload":null,"Headers":null,"Position":"evil:99"}'
    position, text = h.append("a", forged)
    assert json.loads(text)["Position"] == str(position) == "p1:1"


def test_position_parse_round_trip_and_refusals() -> None:
    assert Position.parse("ab12-3:42") == Position("ab12-3", 42)
    assert str(Position("e", 7)) == "e:7"
    for bad in (
        "",
        "e",
        "e:",
        ":5",
        "e:-1",
        "e:x",
        "e:1.5",
        'e"x:1',
        "e\\:1",
        "e\n:1",
        "x" * 100 + ":1",
        "e:" + "9" * 30,
    ):
        with pytest.raises(ValueError):
            Position.parse(bad)


def test_count_bound_per_topic_keeps_the_newest() -> None:
    h = History(3, epoch_prefix="p")
    for _ in range(5):
        h.append("a", _text("a"))
    assert _seqs(h.latest("a", 10)) == [3, 4, 5]
    assert h.messages == 3


def test_byte_bound_per_topic_and_an_oversized_message_is_not_kept() -> None:
    one = len(_text("a")) + len(',"Position":"p1:1"') + ENTRY_OVERHEAD
    h = History(100, max_bytes=2 * one + 2, epoch_prefix="p")
    for _ in range(4):
        h.append("a", _text("a"))
    assert _seqs(h.latest("a", 10)) == [3, 4]
    big, _ = h.append("b", _text("b", b"x" * 1000))
    assert h.latest("b", 10) == [] and h.top("b") is None  # not retained, topic forgotten
    again, _ = h.append("b", _text("b"))
    assert again.epoch != big.epoch and again.seq == 1  # never a reused position


def test_total_budget_evicts_the_least_recently_published_topic_first() -> None:
    h = History(100, total_bytes=10_000, epoch_prefix="p")
    h.append("old", _text("old"))
    for _ in range(200):
        h.append("hot", _text("hot"))
    assert h.size <= 10_000
    assert h.top("old") is None  # forgotten: its only message went first
    assert h.evicted > 0 and h.forgotten == 1


def test_a_hundred_thousand_distinct_topics_stay_within_the_budget() -> None:
    # The budget holds some 900 topics: from then on each append evicts one. A hundred times
    # that many distinct names proves it as well as a million did, in a tenth of the time.
    budget = 1 << 20
    h = History(5, total_bytes=budget, epoch_prefix="p")
    peak = 0
    text = _text("t")  # the text is not parsed: the same one under many names is fine here
    for i in range(100_000):
        h.append(f"t{i}", text)
        if not i % 1000:
            peak = max(peak, h.size)
    assert h.size <= budget and peak <= budget
    per_topic = TOPIC_OVERHEAD + ENTRY_OVERHEAD + len(text)
    assert h.topics <= budget // per_topic + 1
    assert h.messages == h.topics  # one message each: nothing forgotten left behind
    assert len(h._lru) == len(h._topics)


def test_replay_since_in_the_same_epoch_is_exact() -> None:
    h = History(10, epoch_prefix="p")
    positions = [h.append("a", _text("a"))[0] for _ in range(5)]
    r = h.subscribe("a", since=positions[1])
    assert _seqs(r.texts) == [3, 4, 5] and r.recovered and r.start == positions[1]
    r = h.subscribe("a", since=positions[-1])
    assert r.texts == [] and r.recovered and r.start == positions[-1]
    r = h.subscribe("a", since=Position(positions[0].epoch, 0))
    assert _seqs(r.texts) == [1, 2, 3, 4, 5] and r.recovered


def test_replay_not_recovered_when_trimmed_other_epoch_or_ahead() -> None:
    h = History(3, epoch_prefix="p")
    positions = [h.append("a", _text("a"))[0] for _ in range(6)]
    r = h.subscribe("a", since=positions[1])  # seq 2; oldest kept is 4: 3 is gone
    assert _seqs(r.texts) == [4, 5, 6] and not r.recovered and r.start.seq == 3
    r = h.subscribe("a", since=positions[2])  # seq 3: 4.. is all that follows, all kept
    assert _seqs(r.texts) == [4, 5, 6] and r.recovered
    r = h.subscribe("a", since=Position("other", 2))
    assert _seqs(r.texts) == [4, 5, 6] and not r.recovered
    r = h.subscribe("a", since=Position(positions[0].epoch, 99))
    assert not r.recovered


def test_replay_last_n() -> None:
    h = History(10, epoch_prefix="p")
    for _ in range(4):
        h.append("a", _text("a"))
    assert _seqs(h.subscribe("a", last=2).texts) == [3, 4]
    assert _seqs(h.subscribe("a", last=50).texts) == [1, 2, 3, 4]
    assert h.subscribe("a").texts == []


def test_a_subscribed_topic_keeps_its_epoch_while_empty() -> None:
    h = History(1, total_bytes=2_000, epoch_prefix="p")
    r = h.subscribe("quiet")
    assert r.start.seq == 0 and r.recovered
    for i in range(100):
        h.append(f"flood{i}", _text("f"))
    assert h.top("quiet") == r.start  # pinned: not forgotten
    first, _ = h.append("quiet", _text("quiet"))
    assert first == Position(r.start.epoch, 1)
    h.unsubscribe("quiet")
    for i in range(100):
        h.append(f"flood{i}", _text("f"))
    assert h.top("quiet") is None  # unpinned, evicted, forgotten
    h.unsubscribe("quiet")  # once too often: harmless


def test_a_since_for_an_unknown_topic_is_not_recovered() -> None:
    h = History(5, epoch_prefix="p")
    r = h.subscribe("new", since=Position("p1", 3))
    assert r.texts == [] and not r.recovered and r.start.seq == 0


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError):
        History(0)
    with pytest.raises(ValueError):
        History(1, epoch_prefix="a:b")


def test_random_epochs_differ_between_histories() -> None:
    assert History(1).prefix != History(1).prefix


def test_the_budget_is_what_memory_really_costs() -> None:
    # PyPy has no tracemalloc (CI runs the suite on PyPy 3.9 too); CPython's run checks this.
    tracemalloc = pytest.importorskip("tracemalloc", reason="no tracemalloc on this interpreter (PyPy)")

    budget = 2 << 20
    text = _text("t")
    tracemalloc.start()
    try:
        h = History(5, total_bytes=budget, epoch_prefix="p")
        before = tracemalloc.get_traced_memory()[0]
        for i in range(30_000):  # far past the budget: distinct topics, the costliest input
            h.append(f"t{i}", text)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert h.evicted > 0
    assert grown <= budget * 1.25, grown


def test_a_message_carries_its_position_read_lazily_and_not_in_equality() -> None:
    h = History(5, epoch_prefix="p")
    position, text = h.append("a", messages.encode_text("a", b"hi", {"k": "v"}))
    msg = messages.decode_body(text.encode())[0]
    assert msg.position == position and msg == messages.Message("a", b"hi", {"k": "v"})
    assert "position=p1:1" in repr(msg)
    assert msg.encode() == messages.encode("a", b"hi", {"k": "v"})  # Go's JSON: no Position field
    assert messages.decode(b'{"Topic":"a","Payload":null,"Headers":null}').position is None
    assert messages.decode(b'{"Topic":"a","Payload":null,"Headers":null,"Position":"bad"}').position is None
    assert messages.decode(b'{"Topic":"a","Payload":null,"Headers":null,"Position":7}').position is None
    import pickle

    assert pickle.loads(pickle.dumps(msg)).position == position
