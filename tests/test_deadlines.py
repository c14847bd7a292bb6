"""Request deadlines on one timer (pulsyflux.wire.deadlines), driven by task.Clock."""

from __future__ import annotations

from twisted.internet.task import Clock

from pulsyflux.wire.deadlines import Deadlines


def make():
    clock = Clock()
    live: dict = {}
    expired: list = []

    def expire(key, value):
        del live[key]
        expired.append(key)

    return clock, live, expired, Deadlines(clock, live, expire)


def test_each_deadline_fires_at_its_time_in_any_order_of_adding():
    clock, live, expired, deadlines = make()
    for key, seconds in (("slow", 5.0), ("fast", 1.0), ("mid", 3.0)):
        live[key] = object()
        deadlines.add(key, live[key], seconds)
    clock.advance(0.999)
    assert expired == []
    clock.advance(0.002)
    assert expired == ["fast"]
    clock.advance(2.0)
    assert expired == ["fast", "mid"]
    clock.advance(2.0)
    assert expired == ["fast", "mid", "slow"]
    assert clock.getDelayedCalls() == []


def test_a_finished_request_never_expires_even_if_its_key_comes_back():
    clock, live, expired, deadlines = make()
    live["a"] = first = object()
    deadlines.add("a", first, 1.0)
    del live["a"]  # answered: forgotten without telling the deadlines
    live["a"] = second = object()  # the same key reused for a later request
    deadlines.add("a", second, 2.0)
    clock.advance(1.5)
    assert expired == [] and live["a"] is second
    clock.advance(1.0)
    assert expired == ["a"]


def test_one_timer_however_many_deadlines_and_stale_entries_are_compacted():
    clock, live, expired, deadlines = make()
    for n in range(1000):
        live[n] = object()
        deadlines.add(n, live[n], 5.0)
        del live[n]  # each answered at once
    assert len(clock.getDelayedCalls()) == 1
    assert len(deadlines._heap) <= 64 + 1
    clock.advance(6)
    assert expired == [] and clock.getDelayedCalls() == []


def test_clear_cancels_the_timer():
    clock, live, expired, deadlines = make()
    live["a"] = object()
    deadlines.add("a", live["a"], 1.0)
    deadlines.clear()
    assert clock.getDelayedCalls() == []
    clock.advance(2)
    assert expired == []


def test_push_leaves_the_timer_to_arm_which_fires_at_the_earliest():
    clock, live, expired, deadlines = make()
    live["late"], live["early"] = object(), object()
    assert deadlines.push("late", live["late"], 5.0) is True  # earlier than any timer (none yet)
    assert clock.getDelayedCalls() == []  # nothing scheduled until arm()
    deadlines.arm()
    assert [call.getTime() for call in clock.getDelayedCalls()] == [5.0]
    assert deadlines.push("early", live["early"], 2.0) is True
    assert deadlines.push("later", object(), 9.0) is False  # the armed timer comes first: no arm needed
    deadlines.arm()
    assert [call.getTime() for call in clock.getDelayedCalls()] == [2.0]
    clock.advance(2)
    assert expired == ["early"]
    clock.advance(3)
    assert expired == ["early", "late"]
    clock.advance(4)  # "later" was never live: its entry is skipped, and then no timer is left
    assert expired == ["early", "late"] and clock.getDelayedCalls() == []
