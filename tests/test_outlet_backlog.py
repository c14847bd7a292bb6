"""An outlet's backlog taken in bulk: a batch queued at once, a forward taken whole.

``Outlet.push_all`` must leave what a ``push`` of each message leaves (the
same messages kept, the same drops counted), and ``Outlet.flush`` must make
the same forwards whether it takes the backlog whole or message by message.
Checked against the one-at-a-time code over random batches and bounds.
"""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.logger import globalLogPublisher

from pulsyflux.broker.fanout import Fanout
from pulsyflux.broker.outlet import FORWARD_CHARS, Outlet, _Forward
from pulsyflux.wire.messages import BINARY_MAGIC


class Sent:
    """A stand-in Consumer: records each forward's pieces, never answers."""

    reconnecting = False

    def __init__(self) -> None:
        self.channel_id = uuid.uuid4()
        self.forwards: list[list[Any]] = []

    def send_parts_for(self, parts: list[Any], timeout: float, answer: Any) -> None:
        self.forwards.append(list(parts))

    def send_for(self, body: bytes, timeout: float, answer: Any) -> None:
        self.forwards.append([body])


def outlet(limit: int, limit_bytes: int, batch: int = 256, window: int = 4) -> Outlet:
    fanout: Any = SimpleNamespace(backlog_size=0, dropped=0, batch=batch, window=window)
    return Outlet(fanout, "t", Sent(), None, limit, limit_bytes)  # type: ignore[arg-type]


def state(o: Outlet) -> tuple:
    return list(o.backlog), o.size, o.dropped, o.fanout.dropped, o.fanout.backlog_size


messages_ = st.lists(st.binary(min_size=0, max_size=40), max_size=30)


@settings(max_examples=300, deadline=None)
@given(st.lists(messages_, max_size=6), st.integers(0, 40), st.integers(0, 400))
def test_push_all_keeps_and_drops_what_a_push_of_each_does(batches, limit, limit_bytes):
    one, bulk = outlet(limit, limit_bytes), outlet(limit, limit_bytes)
    for batch in batches:
        size = sum(map(len, batch))
        for o in (one, bulk):
            o.fanout.backlog_size += size  # as the fan-out adds it, once per publish
        for text in batch:
            one.push(text)
        bulk.push_all(batch, size)
        assert state(bulk) == state(one)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 600), st.integers(1, 300), st.sampled_from([10, 1000, 5000]))
def test_a_backlog_taken_whole_makes_the_forwards_taken_one_by_one(count, batch, size):
    """Whole when it fits one forward (batch messages, under FORWARD_CHARS), else message by message."""
    texts = [bytes([n % 256]) * size for n in range(count)]
    o = outlet(10_000, 1 << 30, batch=batch, window=1_000)
    o.push_all(texts, count * size)
    o.fanout.backlog_size = count * size
    o.flush()
    expected = []
    left = list(texts)
    while left:
        taken, total = [], 0
        while left and len(taken) < batch and total < FORWARD_CHARS:
            total += len(left[0])
            taken.append(left.pop(0))
        expected.append([BINARY_MAGIC, *taken])
    assert o.consumer.forwards == expected
    assert not o.backlog and o.size == 0 and o.fanout.backlog_size == 0 and o.in_flight == count


def fanout_of(count: int, total_bytes: int, limit: int, limit_bytes: int) -> tuple[Fanout, list[Outlet]]:
    """A fan-out with ``count`` outlets whose windows are full: each published batch waits in their backlogs."""
    f = Fanout(
        "127.0.0.1:1", task.Clock(), backlog=limit, batch=512, window=4, reconnect=False, rejoin_patience=1.0,
        backlog_bytes=limit_bytes, total_backlog_bytes=total_bytes, max_subscriptions=100, max_setups=10,
        max_setups_per_client=10, history=None,
    )  # fmt: skip
    outs = []
    for n in range(count):
        o = Outlet(f, "t", Sent(), None, limit, limit_bytes, label=f"o{n}")  # type: ignore[arg-type]
        o.requests = f.window  # its window is full: it waits
        f.outlets[o.label] = o
        outs.append(o)
    return f, outs


def push_each(f: Fanout, outs: list[Outlet], texts: list[str]) -> None:
    """What a publish did before batches were taken whole: every outlet takes each message, then the bound of all."""
    for text in texts:
        for o in outs:
            o.push(text)
        f.backlog_size += len(text) * len(outs)
        if f.backlog_size > f.total_backlog_bytes:
            f.trim_backlogs()


def fan_state(f: Fanout, outs: list[Outlet]) -> tuple:
    return [(list(o.backlog), o.size, o.dropped) for o in outs], f.backlog_size, f.dropped


def test_a_batch_past_the_bound_of_all_backlogs_drops_from_every_outlet_alike():
    """Whole batches, outlet after outlet, trimmed the later outlets of almost all of it: [51, 199] here."""
    f, outs = fanout_of(2, 16_000, 10_000, 1 << 30)
    f._fan_alike(outs, [("t", "x" * 100, None, None)] * 200, False)
    assert [o.dropped for o in outs] == [120, 120] and [len(o.backlog) for o in outs] == [80, 80]


texts_ = st.lists(st.integers(1, 120).map(lambda n: "m" * n), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 4), st.lists(texts_, max_size=6), st.integers(1, 6_000), st.integers(1, 40), st.integers(1, 3_000)
)
def test_a_batch_waiting_outlets_take_drops_what_a_push_of_each_message_does(
    outlets, batches, total, limit, limit_bytes
):
    """Under the bound of all backlogs or past it, a published batch leaves what one message at a time leaves."""
    fan, fan_outs = fanout_of(outlets, total, limit, limit_bytes)
    one, one_outs = fanout_of(outlets, total, limit, limit_bytes)
    for batch in batches:
        fan._fan_alike(fan_outs, [("t", text, None, None) for text in batch], False)
        push_each(one, one_outs, batch)
        assert fan_state(fan, fan_outs) == fan_state(one, one_outs)


@pytest.mark.parametrize(
    "method, outcome, message",
    [("_answered", b"ok", "forward answer failed"), ("_failed", RuntimeError("refused"), "forward failure failed")],
    ids=["callback", "errback"],
)
def test_an_error_handling_a_forward_outcome_is_logged_never_raised_into_the_read(
    monkeypatch, method, outcome, message
):
    """A forward's outcome is handed to the outlet from the consumer's read (997f1be): an error there is
    logged once, and never raised into that read (which would end the forwarding connection)."""
    o = outlet(10, 1000)

    def broken(*args: Any) -> None:
        raise ValueError("boom")

    monkeypatch.setattr(o, method, broken)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        forward = _Forward(o, 1, ["x"])
        (forward.callback if method == "_answered" else forward.errback)(outcome)  # does not raise
    finally:
        globalLogPublisher.removeObserver(events.append)
    [event] = [e for e in events if "log_failure" in e]
    assert event["log_failure"].check(ValueError) and event["log_format"] == message
