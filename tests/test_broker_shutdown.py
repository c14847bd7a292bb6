"""Orderly ends: what a closing broker's subscribers refuse is counted, and a server's shutdown drains."""

from __future__ import annotations

import uuid

import pytest_twisted

from pulsyflux import Broker, Consumer, Provider
from pulsyflux.wire import messages

from .helpers import clocked

ensure = pytest_twisted.ensureDeferred


async def _raw_member(memory, broker_channel, topic, group=None):
    """A subscriber by hand (as a Go provider is): announced, probe answered; it answers nothing else itself."""
    channel = uuid.uuid4()
    provider = await memory.connect(Provider, channel)
    announcer = await memory.connect(Consumer, broker_channel)
    fields = {"group": group} if group is not None else {}
    answer = announcer.send(messages.control(messages.SUBSCRIBE, topic=topic, channel=str(channel), **fields).encode())
    probe = await provider.receive()
    provider.respond(probe, b"ok")
    assert await answer == b"ok"
    return provider, announcer


@clocked
async def test_a_group_members_refusal_while_the_broker_closes_is_counted_lost(memory):
    """Closing, the broker waits for a queue group member's answers; one it refuses has no member to go to."""
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)
    member, announcer = await _raw_member(memory, channel, "jobs", group="g")
    await broker.publish("jobs", b"1")
    forward = await member.receive()  # held: the forward is in flight
    closed = broker.close()
    await memory.quiet()
    assert not closed.called  # it waits for the member's answer (at most 2 s)
    member.respond(forward, error="subscription closed")
    await closed
    assert broker.fanout.lost == 1  # it was neither delivered nor handed to anyone: counted, not silent
    await member.close()
    await announcer.close()


@clocked
async def test_a_refusal_reaching_a_closed_plain_outlet_is_counted_lost(memory):
    """The outlet ended while its forward was on its way, and the subscriber refused it: lost, and counted."""
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)
    subscriber, announcer = await _raw_member(memory, channel, "news")
    await broker.publish("news", b"1")
    forward = await subscriber.receive()
    (outlet,) = broker.fanout.outlets.values()
    outlet.open = False  # as close() leaves it before it cuts the line: ended, its forward still in flight
    subscriber.respond(forward, error="subscription closed")
    await memory.quiet()
    assert (outlet.lost, broker.fanout.lost, outlet.requests) == (1, 1, 0)
    await broker.close()
    await subscriber.close()
    await announcer.close()
