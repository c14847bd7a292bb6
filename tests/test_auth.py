"""Tokens and grants over real TCP: each refusal kind, each grant kind, refresh, expiry, revocation, Go clients."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.internet.defer import Deferred

from pulsyflux.auth.grants import Grants
from pulsyflux.auth.tokens import Authority, Key, mint
from pulsyflux.broker import BrokerClient, SubscriptionClosed
from pulsyflux.broker.link import DEFAULT_BROKER_CHANNEL
from pulsyflux.client import Consumer, Provider
from pulsyflux.testing import start_server
from pulsyflux.wire import codec, messages
from pulsyflux.wire.errors import PermissionDenied
from tests.helpers import eventually
from tests.wire import connect_raw, register_frames, request_frames

KEY = Key.hs256("k1", "k" * 32)
OTHER_KEY = Key.hs256("k1", "x" * 32)  # same kid, wrong secret
UNKNOWN_KID = Key.hs256("k9", "k" * 32)


def _authority(anonymous: Any = None) -> Authority:
    return Authority([KEY], anonymous if anonymous is not None else Grants.none(), leeway=0)


async def _server(anonymous: Any = None) -> Any:
    server = await start_server(auth=_authority(anonymous))
    return server


async def _clocked_server(**options: Any) -> "tuple[Any, task.Clock]":
    """A server over TCP whose token expiries run on a clock of the test's own.

    The Authority reads it and the Gate's expiry timers run on it, so a
    token lapses when the test moves the clock: exactly then, without
    waiting real seconds (JWT expiry has whole-second granularity).
    """
    clock = task.Clock()
    clock.advance(int(time.time()))  # a whole second: ``mint`` rounds ``now`` down, so a ttl is exact
    authority = Authority([KEY], Grants.none(), leeway=0, clock=clock.seconds)
    server = await start_server(auth=authority, **options)
    server.factory.router.gate.clock = clock  # before any connection: every timer of the Gate on it
    return server, clock


def _token(ttl: float = 60, key: Key = KEY, now: "float | None" = None, **grants: Any) -> str:
    return mint(key, grants, ttl, subject="alice", now=now)


async def _refused(d: "Deferred[Any]") -> str:
    with pytest.raises(PermissionDenied) as caught:
        await d
    return str(caught.value)


def _echo(body: bytes) -> bytes:
    return body


# -- each refusal kind ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_each_refusal_is_its_own_clear_error() -> None:
    server = await _server()
    try:
        ch = uuid.uuid4()
        grant = {"provide": [str(ch)]}
        no_token = await _refused(Provider.connect(server.address, ch, handler=_echo))
        assert no_token == "permission denied: anonymous clients may not provide on this channel"
        expired = await _refused(
            Provider.connect(server.address, ch, handler=_echo, token=_token(1, now=time.time() - 100, **grant))
        )
        assert expired.startswith("permission denied: token expired at ")
        wrong = await _refused(
            Provider.connect(server.address, ch, handler=_echo, token=_token(key=OTHER_KEY, **grant))
        )
        assert wrong == "permission denied: token signature does not verify with key 'k1'"
        unknown = await _refused(
            Provider.connect(server.address, ch, handler=_echo, token=_token(key=UNKNOWN_KID, **grant))
        )
        assert unknown == "permission denied: token signed with an unknown key id 'k9'"
        no_right = await _refused(Provider.connect(server.address, ch, handler=_echo, token=_token(consume=[str(ch)])))
        assert no_right == "permission denied: token 'alice' may not provide on this channel"
        refusals = server.factory.router.gate.stats()["refusals"]
        assert refusals == {"provide": 2, "expired": 1, "bad signature": 1, "unknown key": 1}
        assert server.factory.stats.errors["permission denied"] == 5
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_a_consumer_without_the_right_fails_clearly_and_does_not_reconnect() -> None:
    server = await _server()
    try:
        ch = uuid.uuid4()
        said = await _refused(Consumer.connect(server.address, ch, token=_token(provide=[str(ch)])))
        assert said == "permission denied: token 'alice' may not consume on this channel"
        # Without a token connect() does not wait; the first request says why, and no reconnect follows.
        consumer = await Consumer.connect(server.address, ch, reconnect=True)
        with pytest.raises(PermissionDenied, match="anonymous clients may not consume"):
            await consumer.send(b"x")
        await eventually(lambda: not consumer.reconnecting and not consumer.connected)
        assert consumer.reconnects == 0
    finally:
        await server.stop()


# -- each grant kind ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_provide_and_consume_are_granted_separately() -> None:
    server = await _server()
    try:
        ch, other = uuid.uuid4(), uuid.uuid4()
        provider = await Provider.connect(server.address, ch, handler=_echo, token=_token(provide=[str(ch)]))
        consumer = await Consumer.connect(server.address, ch, token=_token(consume=[str(ch)]))
        assert await consumer.send(b"hi") == b"hi"
        assert consumer.token_subject == "alice" and consumer.token_expires is not None
        await _refused(Consumer.connect(server.address, other, token=_token(consume=[str(ch)])))
        await _refused(Consumer.connect(server.address, ch, token=_token(provide=[str(ch)])))
        wildcard = await Consumer.connect(server.address, ch, token=_token(consume=["!" + str(other), "*"]))
        assert await wildcard.send(b"any") == b"any"
        await _refused(Consumer.connect(server.address, other, token=_token(consume=["!" + str(other), "*"])))
        for client in (provider, consumer, wildcard):
            await client.close()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_publish_and_subscribe_exact_pattern_and_uncovered() -> None:
    server = await _server()
    try:
        sub_token = _token(subscribe=["orders.eu.>", "news"])
        subscriber = await BrokerClient.connect(server.address, token=sub_token)
        pattern = await subscriber.subscribe("orders.eu.>")
        exact = await subscriber.subscribe("news")
        with pytest.raises(PermissionDenied, match="may not subscribe to 'orders.>'"):
            await subscriber.subscribe("orders.>")  # wider than the grant: not covered
        with pytest.raises(PermissionDenied, match="may not subscribe to 'sports'"):
            await subscriber.subscribe("sports")
        publisher = await BrokerClient.connect(server.address, token=_token(publish=["orders.*.paris", "news"]))
        await publisher.publish("news", b"n")
        assert (await exact.get()).payload == b"n"
        with pytest.raises(PermissionDenied, match="may not publish to 'orders.eu'"):
            await publisher.publish("orders.eu", b"x")
        # A batch with one refused topic is refused whole, and the error names that topic.
        raw = await Consumer.connect(server.address, DEFAULT_BROKER_CHANNEL, token=_token(publish=["news"]))
        batch = messages.encode_batch([messages.encode_text(t, b"b", None) for t in ("news", "sports", "news")])
        with pytest.raises(PermissionDenied) as caught:
            await raw.send(batch)
        assert str(caught.value) == (
            "permission denied: token 'alice' may not publish to 'sports'; the batch of 3 messages is refused whole"
        )
        await publisher.publish("news", b"after")
        assert (await exact.get()).payload == b"after"  # nothing of the refused batch was delivered
        await raw.close()
        with pytest.raises(PermissionDenied, match="may not subscribe"):
            await publisher.subscribe("news")  # publish is not subscribe
        with pytest.raises(PermissionDenied, match="may not publish"):
            await subscriber.publish("news", b"x")  # nor the other way round
        refusals = server.factory.router.gate.stats()["refusals"]
        assert refusals["subscribe"] == 3 and refusals["publish"] == 3
        await publisher.close()
        await subscriber.close()
        assert pattern.closed
    finally:
        await server.stop()


# -- refresh, expiry, revocation -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_refresh_extends_a_live_connection_and_expiry_drops_subscriptions() -> None:
    server, clock = await _clocked_server()
    gate = server.factory.router.gate
    try:
        short = mint(KEY, {"subscribe": ["a"]}, 2, subject="short", now=clock.seconds())
        kept = await BrokerClient.connect(server.address, token=short, heartbeat=None)
        lapsing = await BrokerClient.connect(server.address, token=short, heartbeat=None)
        kept_sub = await kept.subscribe("a")
        lapsing_sub = await lapsing.subscribe("a")
        await kept.refresh(mint(KEY, {"subscribe": ["a"]}, 3600, subject="short", now=clock.seconds()))
        clock.advance(1.99)
        assert "expired" not in gate.refusals  # not a moment early
        clock.advance(0.02)
        # the lapsing client's two connections (publishing, and its subscription's); the refreshed one's are good
        assert gate.refusals["expired"] == 2
        with pytest.raises(SubscriptionClosed, match="permission denied: token expired at"):
            while True:
                await lapsing_sub.get()  # ends when its token does
        assert not kept_sub.closed
        publisher = server.broker
        await publisher.publish("a", b"still here")
        assert (await kept_sub.get()).payload == b"still here"
        await kept.close()
        await lapsing.close()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_revocation_drops_subscriptions_and_a_bad_refresh_keeps_the_old_rights() -> None:
    server = await _server()
    try:
        token = mint(KEY, {"subscribe": ["a", "b"]}, 3600, subject="bob", jti="bob-1")
        client = await BrokerClient.connect(server.address, token=token, heartbeat=None)
        sub = await client.subscribe("a")
        with pytest.raises(PermissionDenied, match="token expired"):
            await client.refresh(mint(KEY, {"subscribe": ["a"]}, 1, subject="bob", now=time.time() - 100))
        await server.broker.publish("a", b"1")
        assert (await sub.get()).payload == b"1"  # the refused refresh changed nothing
        # A refresh that narrows the grants ends what is no longer covered.
        other = await client.subscribe("b")
        await client.refresh(mint(KEY, {"subscribe": ["a"]}, 3600, subject="bob", jti="bob-2"))
        with pytest.raises(SubscriptionClosed, match="may not subscribe to 'b'"):
            while True:
                await other.get()
        assert server.factory.router.gate.revoke("bob") >= 1
        with pytest.raises(SubscriptionClosed, match="permission denied: token revoked"):
            while True:
                await sub.get()
        await client.close()
    finally:
        await server.stop()


# -- Go clients, anonymous -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_go_clients_work_under_an_anonymous_grant() -> None:
    # Frames as a Go client writes them (registration, then a request), no AUTH frame.
    ch = uuid.uuid4()
    server = await _server(Grants({"provide": [str(ch)], "consume": [str(ch)]}))
    try:
        go_provider = await connect_raw(server)
        go_provider.send(register_frames(codec.ROLE_PROVIDER, uuid.uuid4().bytes, ch.bytes))
        await eventually(lambda: server.factory.router.providers.get(ch.bytes))
        go_consumer = await connect_raw(server)
        request_id = uuid.uuid4().bytes
        go_consumer.send(request_frames(request_id, uuid.uuid4().bytes, ch.bytes, b"from go"))
        start, chunk, end = await go_provider.wait_frames(3)
        assert (start.type, chunk.payload, end.type) == (codec.START, b"from go", codec.END)
        # On another channel the anonymous grant does not reach.
        stranger = await connect_raw(server)
        other = uuid.uuid4().bytes
        stranger.send(request_frames(request_id, uuid.uuid4().bytes, other, b"x"))
        (error,) = await stranger.wait_frames(1)
        assert (
            codec.error_message(error.payload) == "permission denied: anonymous clients may not consume on this channel"
        )
        for client in (go_provider, go_consumer, stranger):
            client.transport.loseConnection()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_go_style_subscriber_registers_before_it_announces() -> None:
    # A subscriber with no provide right registers on its fresh channel first (as Go's does):
    # the server holds the registration until the broker accepts the subscription.
    server = await _server(Grants({"subscribe": ["public.>"], "publish": ["public.>"]}))
    try:
        client = await BrokerClient.connect(server.address)  # anonymous
        sub = await client.subscribe("public.news")
        await client.publish("public.news", b"hello")
        assert (await sub.get()).payload == b"hello"
        with pytest.raises(PermissionDenied):
            await client.subscribe("private")
        await client.close()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_a_token_against_a_server_without_auth_changes_nothing(server: Any) -> None:
    ch = uuid.uuid4()
    provider = await Provider.connect(server.address, ch, handler=_echo, token=_token(provide=[str(ch)]))
    consumer = await Consumer.connect(server.address, ch, token=_token())
    assert await consumer.send(b"x") == b"x"
    assert consumer.token_subject is None  # the server did not read it
    await consumer.refresh(_token())  # nothing to refresh: answered as an unknown frame type, ignored
    await provider.close()
    await consumer.close()


@pytest_twisted.ensureDeferred
async def test_hostile_auth_frames_are_bounded() -> None:
    server = await _server()
    try:
        raw = await connect_raw(server)
        raw.send(codec.encode_frame(codec.AUTH, bytes(16), b"x" * (codec.MAX_PAYLOAD)))
        (error,) = await raw.wait_frames(1)
        assert codec.error_message(error.payload) == "permission denied: a token is at most 8192 bytes"
        await raw.lost
        assert server.factory.router.gate.stats()["refusals"] == {"too large": 1}
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_broker_refresh_keeps_all_its_connections_past_the_old_tokens_expiry() -> None:
    """A Broker over TCP: its provider, publishing consumer, forwarding consumer and subscription provider."""
    from pulsyflux.broker import Broker

    server, clock = await _clocked_server(broker=False)
    brokers: list[Broker] = []
    try:
        rights = {"provide": ["*"], "consume": ["*"]}
        short = mint(KEY, rights, 2, subject="broker", now=clock.seconds())
        refreshed = await Broker.connect(server.address, uuid.uuid4(), token=short)
        lapsing = await Broker.connect(server.address, uuid.uuid4(), token=short)
        brokers += [refreshed, lapsing]
        sub = await refreshed.subscribe("a")
        await refreshed.publish("a", b"before")
        assert (await sub.get()).payload == b"before"
        await refreshed.refresh(mint(KEY, rights, 3600, subject="broker", now=clock.seconds()))
        assert refreshed.token != short
        clock.advance(1.99)
        assert "expired" not in server.factory.router.gate.refusals
        clock.advance(0.02)  # past the short token's expiry, on the server's clock
        await lapsing.when_closed()  # the short token expired: the server ended the broker that kept it
        assert lapsing.lost_link
        await refreshed.publish("a", b"after")  # every connection of this one presented the new token
        assert (await sub.get()).payload == b"after"
        later = await refreshed.subscribe("b")  # and new ones present it
        await refreshed.publish("b", b"new")
        assert (await later.get()).payload == b"new"
        with pytest.raises(PermissionDenied, match="unknown key"):
            await refreshed.refresh(_token(key=UNKNOWN_KID))
        assert not refreshed.closed
    finally:
        for broker in brokers:
            await broker.close()
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_a_held_provider_that_no_subscription_claims_learns_why_it_was_closed(monkeypatch: Any) -> None:
    """Anonymous clients may subscribe, so a provider's registration is held for the broker's claim; none comes."""
    from pulsyflux.auth import gate

    monkeypatch.setattr(gate, "HOLD_PATIENCE", 0.2)
    server = await _server(Grants({"subscribe": ["news"]}))
    try:
        provider = await Provider.connect(server.address, uuid.uuid4(), handler=_echo)  # succeeds: held
        await provider.when_lost()
        assert isinstance(provider.closed_reason, PermissionDenied)
        assert str(provider.closed_reason) == "permission denied: anonymous clients may not provide on this channel"
        assert server.factory.router.gate.refusals == {"provide": 1}
    finally:
        await server.stop()
