"""--auth beyond the wire: HTTP (Bearer publish, /stats behind a token, refusals in /metrics), the CLI, twistd."""

from __future__ import annotations

import json
import uuid
from typing import Any

import jwt
import pytest
import pytest_twisted
import treq
from twisted.python import usage

from pulsyflux.auth.grants import Grants
from pulsyflux.auth.tokens import Authority, Key, mint
from pulsyflux.client import Provider
from pulsyflux.service import Options, makeService
from pulsyflux.testing import start_server

SECRET = "k" * 32
KEY = Key.hs256("k1", SECRET)


def _authority(**options: Any) -> Authority:
    return Authority([KEY], Grants.none(), leeway=0, **options)


def _token(**grants: Any) -> str:
    return mint(KEY, grants, 60, subject="ops")


async def _post(url: str, body: bytes, token: "str | None" = None) -> tuple[int, dict]:  # type: ignore[type-arg]
    headers = {b"authorization": [f"Bearer {token}".encode()]} if token else {}
    response = await treq.post(url, data=body, headers=headers, persistent=False)
    return response.code, json.loads(await response.content())


async def _get(url: str, token: "str | None" = None) -> tuple[int, bytes]:
    headers = {b"authorization": [f"Bearer {token}".encode()]} if token else {}
    response = await treq.get(url, headers=headers, persistent=False)
    return response.code, await response.content()


@pytest_twisted.ensureDeferred
async def test_http_publish_takes_bearer_tokens_and_refusals_are_counted() -> None:
    server = await start_server(http=True, auth=_authority())
    try:
        sub = await server.broker.subscribe("orders.new")
        url = server.http_url + "/publish/orders.new"
        assert await _post(url, b"x") == (
            401,
            {"error": "permission denied: anonymous clients may not publish to 'orders.new'"},
        )
        assert await _post(url, b"x", _token(publish=["invoices.>"])) == (
            403,
            {"error": "permission denied: token 'ops' may not publish to 'orders.new'"},
        )
        code, body = await _post(url, b"x", mint(Key.hs256("k1", "z" * 32), {"publish": [">"]}, 60))
        assert (code, body["error"]) == (401, "permission denied: token signature does not verify with key 'k1'")
        code, _ = await _post(url, b"hello", _token(publish=["orders.*"]))
        assert code == 202
        assert (await sub.get()).payload == b"hello"
        code, stats = await _get(server.http_url + "/stats")
        assert code == 200  # "stats": "open", the default
        assert json.loads(stats)["server"]["auth"]["refusals"] == {"publish": 2, "bad signature": 1}
        code, metrics = await _get(server.http_url + "/metrics")
        assert b'pulsyflux_auth_refusals_total{kind="publish"} 2' in metrics
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_stats_can_require_a_token() -> None:
    server = await start_server(http=True, auth=_authority(stats_need_token=True))
    try:
        for path in ("/stats", "/metrics"):
            url = server.http_url + path
            code, body = await _get(url)
            assert code == 401 and b"anonymous clients may not read /stats and /metrics" in body
            code, body = await _get(url, _token(publish=[">"]))
            assert code == 403 and b"token 'ops' may not read /stats and /metrics" in body
            code, body = await _get(url, "garbage")
            assert code == 401 and b"malformed token" in body
            code, _ = await _get(url, _token(stats=True))
            assert code == 200
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_cli_token_mints_and_every_command_presents_one(cli: Any, tmp_path: Any) -> None:
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps({"keys": [{"kid": "k1", "alg": "HS256", "secret": SECRET}]}))
    ch = uuid.uuid4()
    minted = await cli("token", "--key", str(auth_file), "--consume", str(ch), "--publish", "a.>", "--ttl", "10m")
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.decode().strip()
    identity = _authority().verify(token)
    assert identity.grants.may("consume", str(ch)) and identity.grants.may_publish("a.b")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 600  # --ttl 10m
    server = await start_server(auth=_authority())
    try:
        provider = await Provider.connect(
            server.address, ch, handler=lambda b: b"re:" + b, token=_token(provide=[str(ch)])
        )
        refused = await cli("request", "--server", server.address, str(ch), "hi")
        assert refused.returncode == 1
        assert b"permission denied: anonymous clients may not consume on this channel" in refused.stderr
        done = await cli("request", "--server", server.address, str(ch), "hi", env={"PULSYFLUX_TOKEN": token})
        assert (done.returncode, done.stdout) == (0, b"re:hi"), done.stderr
        published = await cli("pub", "--server", server.address, "--token", token, "a.b", "x")
        assert published.returncode == 0, published.stderr
        bad = await cli("pub", "--server", server.address, "--token", token, "b", "x")
        assert bad.returncode == 1 and b"may not publish to 'b'" in bad.stderr
        await provider.close()
    finally:
        await server.stop()
    unusable = await cli("token", "--key", str(auth_file), "--publish", "a.>.b")
    assert unusable.returncode == 2 and b"topic rule 'a.>.b'" in unusable.stderr


def test_twistd_auth_option(tmp_path: Any) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"keys": [{"kid": "k1", "secret": "short"}]}))
    options = Options()
    with pytest.raises(
        usage.UsageError, match=r"--auth: .*bad.json: keys\[0\]: key 'k1': an HS256 secret needs at least 32 bytes"
    ):
        options.parseOptions(["--auth", str(bad), "--port", "0"])
    good = tmp_path / "auth.json"
    good.write_text(json.dumps({"keys": [{"kid": "k1", "secret": SECRET}], "anonymous": "all"}))
    options = Options()
    options.parseOptions(["--auth", str(good), "--port", "0"])
    top = makeService(options)
    assert top.factory.router.gate is not None
    assert top.factory.router.gate.authority.anonymous.grants.may_publish("x")
    plain = Options()
    plain.parseOptions(["--port", "0"])
    assert makeService(plain).factory.router.gate is None  # without --auth: no checks at all


@pytest_twisted.ensureDeferred
async def test_http_history_needs_the_right_to_subscribe_to_the_topic() -> None:
    server = await start_server(http=True, auth=_authority(), history=10)
    try:
        await server.broker.publish("orders.new", b"kept")
        url = server.http_url + "/history/orders.new?last=5"
        code, body = await _get(url)
        assert code == 401 and b"anonymous clients may not read the history of 'orders.new'" in body
        code, body = await _get(url, _token(subscribe=["invoices.>"]))
        assert code == 403
        code, body = await _get(url, _token(subscribe=["orders.*"]))
        assert code == 200 and [m["Payload"] for m in json.loads(body)["messages"]] == ["a2VwdA=="]
    finally:
        await server.stop()
