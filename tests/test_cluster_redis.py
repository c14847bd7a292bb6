"""The Redis client under the cluster: replies in order, pushes apart, nothing handed to the wrong waiter."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.testing import StringTransport

from pulsyflux.cluster.redis import (
    RedisCommands,
    RedisError,
    RedisLost,
    RedisSubscriber,
    parse_redis_url,
)


async def _connect(redis_server, protocol):
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", redis_server.port)
    return await connectProtocol(endpoint, protocol)


@pytest_twisted.ensureDeferred
async def test_commands_are_answered_in_order_and_errors_fail_only_their_own(redis_server):
    redis = await _connect(redis_server, RedisCommands())
    try:
        assert await redis.execute("SET", "k", b"v\x00\xff") == b"OK"
        waiters = [
            redis.execute(*command) for command in (("INCR", "n"), ("LPUSH", "k", "x"), ("INCR", "n"), ("GET", "k"))
        ]
        results = await defer.DeferredList(waiters, consumeErrors=True)
        assert results[0] == (True, 1)
        assert results[1][0] is False and results[1][1].check(RedisError)
        assert "WRONGTYPE" in str(results[1][1].value)
        assert results[2] == (True, 2)
        assert results[3] == (True, b"v\x00\xff")
    finally:
        redis.transport.loseConnection()
        await redis.lost


@pytest_twisted.ensureDeferred
async def test_a_cancelled_command_keeps_its_place_so_the_next_gets_its_own_reply(redis_server):
    redis = await _connect(redis_server, RedisCommands())
    try:
        await redis.execute("SET", "a", "1")
        await redis.execute("SET", "b", "2")
        first = redis.execute("GET", "a")
        second = redis.execute("GET", "b")
        first.cancel()
        with pytest.raises(defer.CancelledError):
            await first
        assert await second == b"2"
        assert redis.pending == 0
    finally:
        redis.transport.loseConnection()
        await redis.lost


@pytest_twisted.ensureDeferred
async def test_sharded_pubsub_delivers_to_the_subscriber_and_survives_nothing_silently(redis_server):
    got = []
    sub = await _connect(redis_server, RedisSubscriber(lambda channel, data: got.append((channel, data))))
    pub = await _connect(redis_server, RedisCommands())
    try:
        sub.subscribe(b"pf:t:orders")
        await sub.ping()  # everything before the ping is answered: the subscription is in place
        assert sub.confirmed == {b"pf:t:orders"}
        assert await pub.execute("SPUBLISH", "pf:t:orders", b"one") == 1
        assert await pub.execute("SPUBLISH", "pf:t:other", b"two") == 0
        await sub.ping()
        assert got == [(b"pf:t:orders", b"one")]
        sub.unsubscribe(b"pf:t:orders")
        await sub.ping()
        assert await pub.execute("SPUBLISH", "pf:t:orders", b"three") == 0
        assert sub.confirmed == set()
    finally:
        for p in (sub, pub):
            p.transport.loseConnection()
            await p.lost


@pytest_twisted.ensureDeferred
async def test_a_channel_subscribed_while_the_link_comes_up_is_in_force_once_it_is_up(redis_server, monkeypatch):
    """A subscriber that arrives while the link logs in and sends its first PING (twistd listens
    before its link is up) is subscribed when the link is up, not only after a reconnect."""
    from pulsyflux.cluster.link import RedisLink

    link = RedisLink(parse_redis_url(redis_server.url), reactor, lambda channel, data: None)
    ping = RedisSubscriber.ping

    def ping_after_a_change(self):  # the link's first PING goes out connected, before the link is up
        if not link.up:
            link.subscribe(b"pf:late")
            link.unsubscribe(b"pf:early")
        return ping(self)

    monkeypatch.setattr(RedisSubscriber, "ping", ping_after_a_change)
    link.subscribe(b"pf:early")
    link.start()
    pub = await _connect(redis_server, RedisCommands())
    try:
        await link.when_up()
        await link.settled()
        assert await pub.execute("SPUBLISH", "pf:late", b"x") == 1
        assert await pub.execute("SPUBLISH", "pf:early", b"y") == 0
    finally:
        pub.transport.loseConnection()
        await link.stop()


@pytest_twisted.ensureDeferred
async def test_waiters_fail_with_a_clear_error_when_redis_dies(redis_server):
    redis = await _connect(redis_server, RedisCommands())
    redis_server.pause()
    waiting = redis.execute("GET", "k")
    redis_server.kill()
    with pytest.raises(RedisLost, match="lost"):
        await waiting
    await redis.lost
    with pytest.raises(RedisLost, match="not connected"):
        await redis.execute("GET", "k")


def test_a_reply_nobody_asked_for_or_garbage_closes_the_connection():
    redis = RedisCommands()
    transport = StringTransport()
    redis.makeConnection(transport)
    redis.dataReceived(b"+OK\r\n")
    assert transport.disconnecting or getattr(transport, "aborting", False) or not transport.connected
    redis = RedisCommands()
    transport = StringTransport()
    redis.makeConnection(transport)
    waiting = redis.execute("GET", "k")
    redis.dataReceived(b"!garbage\r\n")
    assert transport.disconnecting or not transport.connected
    redis.connectionLost()
    failure = []
    waiting.addErrback(failure.append)
    assert failure and "malformed" in str(failure[0].value)


def test_a_command_reply_past_its_bound_closes_the_connection():
    """Worst input: a reply to a command (the registry's reads of what other servers wrote) that does not
    end. A command connection holds at most MAX_COMMAND_REPLY_BYTES of it; a subscriber, whose messages
    carry bodies, MAX_PENDING_BYTES."""
    from pulsyflux.cluster.redis import MAX_COMMAND_REPLY_BYTES, MAX_PENDING_BYTES

    assert MAX_COMMAND_REPLY_BYTES < MAX_PENDING_BYTES
    redis = RedisCommands()
    transport = StringTransport()
    redis.makeConnection(transport)
    waiting = redis.execute("SSCAN", "k", 0)
    member = b"x" * (1 << 20)
    redis.dataReceived(b"*2\r\n$1\r\n0\r\n*1000\r\n")
    for _ in range((MAX_COMMAND_REPLY_BYTES >> 20) - 1):
        redis.dataReceived(b"$%d\r\n%s\r\n" % (len(member), member))
    assert not transport.disconnecting  # under the bound: still read
    redis.dataReceived(b"$%d\r\n%s\r\n" % (len(member), member) * 2)
    assert transport.disconnecting  # past it: closed
    redis.connectionLost()
    failure = []
    waiting.addErrback(failure.append)
    assert failure and "larger than the client accepts" in str(failure[0].value)

    subscriber = RedisSubscriber(lambda channel, data: None)
    transport = StringTransport()
    subscriber.makeConnection(transport)
    subscriber.dataReceived(b">3\r\n$8\r\nsmessage\r\n$1\r\nc\r\n$%d\r\n" % (2 * MAX_COMMAND_REPLY_BYTES))
    subscriber.dataReceived(b"x" * (MAX_COMMAND_REPLY_BYTES + 1))
    assert not transport.disconnecting  # a message as large as a body may be


def test_a_turns_first_command_leaves_at_once_and_the_rest_of_the_turn_in_one_write():
    """A lone publish or request waits for nothing; a busy turn's commands cost one write, not one each."""
    from twisted.internet.task import Clock

    writes: list[bytes] = []

    class Recording(StringTransport):
        def write(self, data: bytes) -> None:
            writes.append(data)

    clock = Clock()
    redis = RedisCommands(clock)
    redis.makeConnection(Recording())
    redis.execute("PING")
    assert writes == [b"*1\r\n$4\r\nPING\r\n"]  # before any reactor turn
    clock.advance(0)
    writes.clear()
    for i in range(4):
        redis.send("SPUBLISH", "c", str(i))
    assert len(writes) == 1  # the turn's first at once, the rest wait for its end
    clock.advance(0)
    assert len(writes) == 2 and writes[1].count(b"SPUBLISH") == 3
    assert b"".join(writes).index(b"\r\n0\r\n") < b"".join(writes).index(b"\r\n3\r\n")  # in order
    clock.advance(0)
    assert len(writes) == 2  # nothing more was waiting


def test_redis_urls():
    a = parse_redis_url("redis://127.0.0.1:6380/2")
    assert (a.host, a.port, a.db, a.password, a.tls) == ("127.0.0.1", 6380, 2, None, False)
    b = parse_redis_url("rediss://user:s%40cret@redis.example:7000")
    assert (b.username, b.password, b.tls, b.port) == ("user", "s@cret", True, 7000)
    assert "s@cret" not in str(b) and str(b) == "rediss://user@redis.example:7000/0"
    assert parse_redis_url("redis://:pw@h").password == "pw"
    for bad in ("http://h", "redis://h:99999", "redis://h/x", "redis://", "h:6379"):
        with pytest.raises(RedisError):
            parse_redis_url(bad)
