"""Wildcard subscriptions and queue groups through the broker (issue 11, parts 1 and 2)."""

from __future__ import annotations

import uuid

import pytest
import pytest_twisted

from pulsyflux import Broker, Consumer, RemoteError
from pulsyflux.wire import messages

from .helpers import clocked

ensure = pytest_twisted.ensureDeferred


@clocked
async def test_publishing_to_a_pattern_or_empty_token_is_refused_at_once(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)
    for topic in ("orders.*", "orders.>", "orders..eu", "orders.", "orders.*x"):
        with pytest.raises(ValueError, match="token 2"):
            broker.publish(topic, b"x")
    # A Go publisher gets an error answer, and the broker keeps working.
    go_publisher = await memory.connect(Consumer, channel)
    for topic in ("orders.*", "a..b"):
        with pytest.raises(RemoteError, match="publish refused: token 2"):
            await go_publisher.send(messages.encode(topic, b"x"))
    batch = messages.encode_batch([messages.encode_text("ok", b"", None), messages.encode_text("x.>", b"", None)])
    with pytest.raises(RemoteError, match="publish refused: token 2 is the wildcard '>'"):
        await go_publisher.send(batch)  # one bad message refuses the batch: none of it was published
    assert broker.stats()["rejected"] == 3 and broker.published == 0
    assert await go_publisher.send(messages.encode("a b.c", b"spaces were always fine")) == b"ok"
    await go_publisher.close()
    await broker.close()
