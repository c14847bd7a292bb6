"""Every kind of value a Provider handler may return reaches the consumer as documented."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from pulsyflux import Consumer, Provider, RemoteError


def handler(data: bytes):
    kind = data.decode()
    if kind == "bytes":
        return b"plain"
    if kind == "bytearray":
        return bytearray(b"mutable")
    if kind == "none":
        return None
    if kind == "deferred":
        return deferLater(reactor, 0.001, lambda: b"later")
    if kind == "failed-deferred":
        return defer.fail(KeyError("gone"))
    if kind == "wrong-type":
        return 42
    raise ValueError(f"unknown kind {kind}")


@pytest_twisted.ensureDeferred
async def test_handler_results_of_every_kind(server, channel):
    provider = await Provider.connect(server.address, channel, handler=handler)
    consumer = await Consumer.connect(server.address, channel)
    try:
        assert await consumer.send(b"bytes") == b"plain"
        assert await consumer.send(b"bytearray") == b"mutable"
        assert await consumer.send(b"none") == b""
        assert await consumer.send(b"deferred") == b"later"
        with pytest.raises(RemoteError, match="gone"):
            await consumer.send(b"failed-deferred")
        with pytest.raises(RemoteError, match="handler returned int, not bytes"):
            await consumer.send(b"wrong-type")
        with pytest.raises(RemoteError, match="unknown kind other"):
            await consumer.send(b"other")
        assert provider.unanswered == 0
    finally:
        await consumer.close()
        await provider.close()
