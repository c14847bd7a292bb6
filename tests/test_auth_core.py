"""The Twisted-free auth core: grant rules, token verification (each refusal its own kind), auth files."""

from __future__ import annotations

import itertools
import json
import time
import uuid

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pulsyflux.auth.config import AuthConfigError, load_auth_file, load_signing_key, parse_auth
from pulsyflux.auth.grants import GrantError, Grants, covers, overlaps
from pulsyflux.auth.tokens import Authority, Key, TokenError, mint
from pulsyflux.wire.errors import PermissionDenied, error_from_message

SECRET = "s" * 32
CH = str(uuid.uuid4())

# -- grants -------------------------------------------------------------------

_WORDS = ["a", "b"]
_SUBJECTS = [".".join(p) for n in (1, 2, 3, 4) for p in itertools.product(_WORDS, repeat=n)]


def _matches(pattern: str, subject: str) -> bool:
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


_pattern = st.lists(st.sampled_from(["a", "b", "*"]), min_size=1, max_size=3).flatmap(
    lambda tokens: st.sampled_from([".".join(tokens), ".".join(tokens[:-1] + [">"])])
)


@given(_pattern, _pattern)
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # no wall-clock bound on a loaded machine
def test_covers_and_overlaps_agree_with_brute_force(rule: str, pattern: str) -> None:
    # Over subjects of up to 4 tokens from {a, b}: patterns of 3 tokens never need a 5th to tell.
    rule_set = {s for s in _SUBJECTS if _matches(rule, s)}
    pattern_set = {s for s in _SUBJECTS if _matches(pattern, s)}
    assert covers(rule, pattern) == (pattern_set <= rule_set)
    assert overlaps(rule, pattern) == bool(pattern_set & rule_set)


def test_exact_beats_wildcard_and_first_wildcard_wins() -> None:
    g = Grants({"subscribe": ["orders.>", "!orders.audit", "!orders.audit.>", "orders.audit.summary"]})
    assert g.may_subscribe("orders.eu")
    assert not g.may_subscribe("orders.audit")  # exact deny beats the earlier wildcard
    assert g.may_subscribe("orders.audit.summary")  # exact allow beats the later deny
    assert g.may_subscribe("orders.audit.detail")  # 'orders.>' comes first: first wildcard wins
    g2 = Grants({"subscribe": ["!orders.audit.>", "orders.>"]})
    assert not g2.may_subscribe("orders.audit.detail")
    assert g2.may_subscribe("orders.eu")


def test_a_wildcard_subscription_needs_a_rule_covering_all_of_it() -> None:
    g = Grants({"subscribe": ["orders.eu.>", "!orders.audit.>", "orders.*"]})
    assert g.may_subscribe("orders.eu.>")
    assert g.may_subscribe("orders.eu.*")
    assert not g.may_subscribe("orders.>")  # wider than any rule
    assert not g.may_subscribe(">")
    assert g.may_subscribe("orders.*")
    assert not g.may_subscribe("orders.audit.*")  # overlaps a deny met first
    assert not Grants({"subscribe": ["orders.x", "!orders.y"]}).may_subscribe("orders.*")  # an exact deny inside


def test_publish_subscribe_provide_consume_are_separate() -> None:
    g = Grants({"provide": [CH], "publish": ["a"]})
    assert g.may("provide", CH) and not g.may("consume", CH)
    assert g.may_publish("a") and not g.may_subscribe("a")
    assert g.uses_broker and not Grants({"provide": [CH]}).uses_broker
    any_but = Grants({"consume": ["!" + CH, "*"]})
    assert not any_but.may("consume", CH) and any_but.may("consume", str(uuid.uuid4()))


@pytest.mark.parametrize(
    "rules",
    [
        {"publish": ["a.>.b"]},
        {"publish": ["a..b"]},
        {"publish": ["a*"]},
        {"provide": ["not-a-uuid"]},
        {"fly": ["x"]},
        {"publish": [1]},
        {"publish": ["x" * 2000]},
        {"subscribe": ["a"] * 300},
        ["publish"],
    ],
)
def test_bad_grants_are_refused_clearly(rules: object) -> None:
    with pytest.raises(GrantError):
        Grants(rules)  # type: ignore[arg-type]


def test_decision_cache_is_bounded() -> None:
    g = Grants({"publish": [">"]})
    for i in range(5000):
        assert g.may_publish(f"t.{i}")
    assert len(g._rules["publish"].cache) <= 1024


# -- tokens -------------------------------------------------------------------


def _ed_pair() -> tuple[bytes, bytes]:
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, pub


def test_hs256_and_eddsa_tokens_verify_and_carry_grants() -> None:
    pem, pub = _ed_pair()
    authority = Authority([Key.hs256("h1", SECRET), Key.eddsa_public("ed1", pub)])
    for key in (Key.hs256("h1", SECRET), Key.eddsa_private("ed1", pem)):
        identity = authority.verify(mint(key, {"provide": [CH]}, 60, subject="svc"))
        assert identity.subject == "svc" and identity.kid == key.kid
        assert identity.grants.may("provide", CH) and not identity.grants.may("consume", CH)


def _kind(authority: Authority, token: "str | bytes") -> str:
    with pytest.raises(TokenError) as caught:
        authority.verify(token)
    assert isinstance(error_from_message(caught.value.message), PermissionDenied)
    return caught.value.kind


def test_each_refusal_has_its_own_kind_and_message() -> None:
    authority = Authority([Key.hs256("h1", SECRET)], leeway=2)
    other = Key.hs256("h1", "t" * 32)
    assert _kind(authority, mint(other, {}, 60)) == "bad signature"
    assert _kind(authority, mint(Key.hs256("h9", SECRET), {}, 60)) == "unknown key"
    assert _kind(authority, mint(Key.hs256("h1", SECRET), {}, 60, now=time.time() - 100)) == "expired"
    assert _kind(authority, "not.a.jwt") == "malformed"
    assert _kind(authority, b"\xff\xfe") == "malformed"
    assert _kind(authority, "x" * 9000) == "too large"
    no_exp = jwt.encode({"sub": "a"}, SECRET, algorithm="HS256", headers={"kid": "h1"})
    assert _kind(authority, no_exp) == "malformed"
    bad_grants = jwt.encode(
        {"exp": time.time() + 60, "pulsyflux": {"publish": ["a.>.b"]}}, SECRET, "HS256", {"kid": "h1"}
    )
    assert _kind(authority, bad_grants) == "bad grants"
    pem, _ = _ed_pair()
    assert _kind(authority, mint(Key.eddsa_private("h1", pem), {}, 60)) == "bad signature"  # alg mismatch
    messages = {str(e) for e in [TokenError("expired", "x")]}
    assert messages == {"permission denied: x"}


def test_leeway_expiry_and_revocation_are_rechecked() -> None:
    now = [1000.0]
    authority = Authority([Key.hs256("h1", SECRET)], leeway=5, clock=lambda: now[0])
    token = mint(Key.hs256("h1", SECRET), {}, 60, now=time.time(), jti="j1")
    identity = authority.verify(token)
    now[0] = identity.expires + 4  # inside the leeway
    authority.check(identity)
    now[0] = identity.expires + 6
    with pytest.raises(TokenError, match="expired"):
        authority.check(identity)
    now[0] = 1000.0
    authority.revoke("j1")
    assert _kind(authority, token) == "revoked"


# -- auth files -----------------------------------------------------------------


def test_auth_file_with_both_kinds_of_key(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pem, pub = _ed_pair()
    (tmp_path / "ops.pub").write_bytes(pub)
    (tmp_path / "ops.key").write_bytes(pem)
    (tmp_path / "hs.secret").write_text(SECRET + "\n")
    path = tmp_path / "auth.json"
    path.write_text(json.dumps({
        "keys": [{"kid": "h1", "alg": "HS256", "secret_file": "hs.secret"},
                 {"kid": "ops", "alg": "EdDSA", "public_key_file": "ops.pub"}],
        "anonymous": {"publish": ["public.>"]},
        "stats": "token",
    }))  # fmt: skip
    authority = load_auth_file(str(path))
    assert authority.stats_need_token and authority.anonymous.grants.may_publish("public.x")
    hs = load_signing_key(str(path))
    assert authority.verify(mint(hs, {}, 60)).kid == "h1"
    ed = load_signing_key(str(tmp_path / "ops.key"), kid="ops")
    assert authority.verify(mint(ed, {}, 60)).kid == "ops"


@pytest.mark.parametrize(
    "data, problem",
    [
        ({}, "nobody could do anything"),
        ({"keys": [{"kid": "a", "alg": "HS256", "secret": "short"}]}, "at least 32 bytes"),
        ({"keys": [{"kid": "a", "alg": "RS256", "secret": SECRET}]}, "HS256 or EdDSA"),
        ({"keys": [{"alg": "HS256", "secret": SECRET}]}, "kid"),
        ({"anonymous": "some"}, "anonymous"),
        ({"anonymous": {"publish": ["a.>.b"]}}, "last token"),
        ({"anonymous": "all", "stats": "maybe"}, "stats"),
        ({"anonymous": "all", "extra": 1}, "unknown field"),
        ({"keys": [{"kid": "a", "secret": SECRET}, {"kid": "a", "secret": SECRET}]}, "share the kid"),
        ({"certificates": {"alice": {"provide": ["*"]}}}, "not a subject"),
        ({"certificates": {"CN=alice": {"publish": ["a.>.b"]}}}, "CN=alice"),
        ({"certificates": ["CN=alice"]}, "certificate subject -> grants"),
    ],
)
def test_bad_auth_files_say_what_is_wrong(data: dict, problem: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(AuthConfigError, match=problem):
        parse_auth(data)


def test_unreadable_auth_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AuthConfigError, match="cannot read"):
        load_auth_file(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(AuthConfigError, match="not valid JSON"):
        load_auth_file(str(tmp_path / "bad.json"))


def test_certificate_subjects_whole_dn_first_then_common_name_and_revocable() -> None:
    authority = parse_auth(
        {
            "certificates": {
                "CN=alice,O=Acme": {"provide": ["*"]},
                "CN=alice": {"consume": ["*"]},
                "CN=bob": {"consume": ["*"]},
            },
            "revoked": ["cert:CN=bob"],
        }
    )
    whole = authority.for_certificate("CN=alice,O=Acme", "alice")
    assert whole is not None and whole.subject == "cert:CN=alice,O=Acme" and whole.expires is None
    assert whole.grants.may_channel("provide", bytes(16))
    by_name = authority.for_certificate("CN=alice,O=Other", "alice")
    assert by_name is not None and not by_name.grants.may_channel("provide", bytes(16))
    assert authority.for_certificate("CN=bob", "bob") is None  # revoked: anonymous
    assert authority.for_certificate("CN=carol", "carol") is None
    authority.check(whole)  # never expires
