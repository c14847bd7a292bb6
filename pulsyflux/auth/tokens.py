"""Signed tokens (JWT, through PyJWT): verify what a client presents, mint what an operator hands out.

A token is a JWT whose header names its key (``kid``) and whose claims hold
an expiry (``exp``, required), optionally a subject (``sub``) and an id
(``jti``, what a revocation names), and the grants under ``pulsyflux``
(:class:`~pulsyflux.auth.grants.Grants`)::

    {"sub": "billing", "exp": 1796000000, "jti": "4f0c...",
     "pulsyflux": {"provide": ["<channel uuid>"], "subscribe": ["orders.>"]}}

Two kinds of key: HS256 with a shared secret (the server and the minter hold
the same bytes) and EdDSA (Ed25519: the server holds only the public key).
Several keys live side by side, told apart by ``kid``, so one can be rotated
in while the other is still accepted. Every way a token can fail is its own
:class:`TokenError` with its own ``kind`` and one clear line.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping, Optional

import jwt
from jwt.exceptions import (
    DecodeError,
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAlgorithmError,
    InvalidSignatureError,
    InvalidTokenError,
    MissingRequiredClaimError,
)

from ..wire.errors import permission_denied
from .grants import GrantError, Grants

__all__ = [
    "MAX_TOKEN_BYTES",
    "DEFAULT_LEEWAY",
    "CLAIM",
    "Key",
    "Identity",
    "TokenError",
    "Authority",
    "mint",
    "ANONYMOUS",
]

MAX_TOKEN_BYTES = 8192  # the most a token may take on the wire (and in an HTTP header)
DEFAULT_LEEWAY = 5.0  # seconds of clock skew forgiven on exp and nbf
CLAIM = "pulsyflux"  # the claim holding the grants
MIN_SECRET_BYTES = 32  # HS256 with a shorter secret can be brute-forced offline
ANONYMOUS = "anonymous"
CERTIFICATE_KID = "x509"  # an Identity's kid when a client certificate proved it (Authority.for_certificate)
CERTIFICATE_PREFIX = "cert:"  # its subject: "cert:CN=alice", never equal to a token's "sub" by accident
_CACHE = 1024  # verified tokens remembered (many connections often share one)
_ALGORITHMS = {"HS256": "HS256", "EDDSA": "EdDSA"}


class TokenError(ValueError):
    """A token the server does not accept; ``kind`` names why, ``message`` is the line the client gets.

    Kinds: ``malformed``, ``unknown key``, ``bad signature``, ``expired``,
    ``not yet valid``, ``revoked``, ``bad grants``, ``too large``.
    """

    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        self.message = permission_denied(detail)
        super().__init__(self.message)


class Key:
    """One verification (and maybe signing) key: ``kid``, algorithm, key material."""

    __slots__ = ("kid", "alg", "verify_key", "sign_key")

    def __init__(self, kid: str, alg: str, verify_key: Any, sign_key: Any = None) -> None:
        algorithm = _ALGORITHMS.get(alg.upper())
        if algorithm is None:
            raise ValueError(f"key {kid!r}: algorithm {alg!r} is not one of HS256, EdDSA")
        if not kid or len(kid) > 128 or not kid.isprintable():
            raise ValueError("a key id (kid) is 1 to 128 printable characters")
        if algorithm == "HS256":
            secret = verify_key.encode("utf-8") if isinstance(verify_key, str) else bytes(verify_key)
            if len(secret) < MIN_SECRET_BYTES:
                raise ValueError(f"key {kid!r}: an HS256 secret needs at least {MIN_SECRET_BYTES} bytes")
            verify_key = sign_key = secret
        self.kid = kid
        self.alg = algorithm
        self.verify_key = verify_key
        self.sign_key = sign_key

    @classmethod
    def hs256(cls, kid: str, secret: "str | bytes") -> "Key":
        return cls(kid, "HS256", secret)

    @classmethod
    def eddsa_public(cls, kid: str, pem: "str | bytes") -> "Key":
        """Verify with an Ed25519 public key (PEM): the server needs no secret at all."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        key = load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"key {kid!r}: an EdDSA key must be an Ed25519 public key")
        return cls(kid, "EdDSA", key)

    @classmethod
    def eddsa_private(cls, kid: str, pem: "str | bytes") -> "Key":
        """Sign (and verify) with an Ed25519 private key (PEM): for minting."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        key = load_pem_private_key(pem.encode() if isinstance(pem, str) else pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"key {kid!r}: an EdDSA key must be an Ed25519 private key")
        return cls(kid, "EdDSA", key.public_key(), key)


class Identity:
    """Who a connection is: the grants it holds, until when, and what names it.

    ``subject`` is the token's ``sub`` (or a digest of the token), the name
    the broker ties a subscription's channel to; ``expires`` is a POSIX time
    or None (anonymous rights do not expire).
    """

    __slots__ = ("subject", "grants", "expires", "jti", "kid")

    def __init__(
        self,
        subject: str,
        grants: Grants,
        expires: Optional[float] = None,
        jti: Optional[str] = None,
        kid: Optional[str] = None,
    ) -> None:
        self.subject = subject
        self.grants = grants
        self.expires = expires
        self.jti = jti
        self.kid = kid

    @property
    def anonymous(self) -> bool:
        return self.kid is None

    def copy(self) -> "Identity":
        """The same rights under a new object: each connection holds its own (its refresh is its own)."""
        return Identity(self.subject, self.grants, self.expires, self.jti, self.kid)

    def __repr__(self) -> str:
        return f"Identity({self.subject!r}, expires={self.expires!r}, kid={self.kid!r})"


class Authority:
    """Verifies tokens against a set of keys; knows what anonymous clients may do and what is revoked.

    authority = Authority([Key.hs256("k1", secret)], anonymous=Grants.none())
    identity = authority.verify(token)       # or raises TokenError
    """

    def __init__(
        self,
        keys: Iterable[Key],
        anonymous: Optional[Grants] = None,
        *,
        leeway: float = DEFAULT_LEEWAY,
        revoked: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
        stats_need_token: bool = False,
        certificates: Optional[Mapping[str, Grants]] = None,
    ) -> None:
        self.keys: dict[str, Key] = {}
        for key in keys:
            if key.kid in self.keys:
                raise ValueError(f"two keys share the kid {key.kid!r}")
            self.keys[key.kid] = key
        self.anonymous = Identity(ANONYMOUS, anonymous if anonymous is not None else Grants.none())
        self.leeway = leeway
        self.revoked: set[str] = set(revoked)
        self.clock = clock
        self.stats_need_token = stats_need_token
        # mTLS: a client certificate's subject (RFC 4514 DN, or "CN=name") -> its grants (for_certificate).
        self.certificates: dict[str, Grants] = dict(certificates or {})
        self._cache: OrderedDict[str, Identity] = OrderedDict()

    def verify(self, token: "str | bytes") -> Identity:
        """The identity a token proves (a new object each time), or :class:`TokenError` saying why not."""
        if isinstance(token, bytes):
            if len(token) > MAX_TOKEN_BYTES:
                raise TokenError("too large", f"a token is at most {MAX_TOKEN_BYTES} bytes")
            try:
                token = token.decode("ascii")
            except UnicodeDecodeError:
                raise TokenError("malformed", "malformed token: not a JWT") from None
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenError("too large", f"a token is at most {MAX_TOKEN_BYTES} bytes")
        token = token.strip()
        identity = self._cache.get(token)
        if identity is None:
            identity = self._decode(token)
            if len(self._cache) >= _CACHE:
                self._cache.popitem(last=False)
            self._cache[token] = identity
        self.check(identity)
        return identity.copy()

    def for_certificate(self, subject: str, common_name: Optional[str] = None) -> Optional[Identity]:
        """The identity a verified client certificate proves, or None if the auth file does not name it.

        ``subject`` is the certificate's whole subject as RFC 4514 prints it
        (``CN=alice,O=Acme``), looked up first; then ``CN=<common_name>``.
        The identity never expires (the TLS handshake checked the
        certificate's dates); ``revoked`` may name it (``cert:CN=alice``): then it is anonymous.
        """
        name = subject
        grants = self.certificates.get(name)
        if grants is None and common_name is not None:
            name = "CN=" + common_name
            grants = self.certificates.get(name)
        if grants is None or (self.revoked and CERTIFICATE_PREFIX + name in self.revoked):
            return None
        return Identity(CERTIFICATE_PREFIX + name, grants, None, None, CERTIFICATE_KID)

    def check(self, identity: Identity) -> None:
        """Raise :class:`TokenError` if ``identity`` has expired or been revoked since it was verified."""
        if identity.anonymous:
            return
        if identity.expires is not None and self.clock() > identity.expires + self.leeway:
            raise TokenError("expired", f"token expired at {_when(identity.expires)}")
        if self.revoked and (identity.jti in self.revoked or identity.subject in self.revoked):
            raise TokenError("revoked", "token revoked")

    def revoke(self, name: str) -> None:
        """Refuse tokens whose ``jti`` or ``sub`` is ``name`` from now on (live connections: the server re-checks)."""
        self.revoked.add(name)

    def _decode(self, token: str) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except DecodeError:
            raise TokenError("malformed", "malformed token: not a JWT") from None
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise TokenError("unknown key", "token names no key id (kid)")
        key = self.keys.get(kid)
        if key is None:
            raise TokenError("unknown key", f"token signed with an unknown key id {_short(kid)}")
        try:
            claims = jwt.decode(
                token,
                key.verify_key,
                algorithms=[key.alg],
                leeway=self.leeway,
                # Expiry is checked by check() below, on this Authority's clock (the reactor's, in tests).
                options={"require": ["exp"], "verify_aud": False, "verify_exp": False},
            )
        except InvalidSignatureError:
            raise TokenError("bad signature", f"token signature does not verify with key {_short(kid)}") from None
        except InvalidAlgorithmError:  # signed some other way than its key id's key: a wrong key too
            raise TokenError("bad signature", f"token not signed with {key.alg} as key {_short(kid)} is") from None
        except ExpiredSignatureError:  # not raised with verify_exp off; kept should PyJWT's defaults change
            exp = _unverified_exp(token)
            raise TokenError("expired", f"token expired at {_when(exp)}" if exp else "token expired") from None
        except ImmatureSignatureError:
            raise TokenError("not yet valid", "token not valid yet (nbf)") from None
        except MissingRequiredClaimError as error:
            raise TokenError("malformed", f"malformed token: no {error.claim!r} claim") from None
        except (DecodeError, InvalidTokenError) as error:
            raise TokenError("malformed", f"malformed token: {_short(str(error), 80)}") from None
        try:
            grants = Grants(claims.get(CLAIM) or {})
        except GrantError as error:
            raise TokenError("bad grants", f"token grants unreadable: {_short(str(error), 120)}") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            subject = "token:" + hashlib.sha256(token.encode("ascii")).hexdigest()[:16]
        jti = claims.get("jti")
        exp = claims["exp"]
        if not isinstance(exp, (int, float)) or isinstance(exp, bool):
            raise TokenError("malformed", "malformed token: 'exp' is not a number")
        return Identity(subject, grants, float(exp), jti if isinstance(jti, str) else None, kid)


def _short(text: str, limit: int = 40) -> str:
    """A peer's text, quoted and bounded (it goes back on the wire and into logs)."""
    from ..wire.printable import printable

    return repr(printable(text, limit))


def _when(timestamp: Optional[float]) -> str:
    if timestamp is None:
        return "?"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _unverified_exp(token: str) -> Optional[float]:
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except InvalidTokenError:
        return None
    return float(exp) if isinstance(exp, (int, float)) else None


def mint(
    key: Key,
    grants: "Grants | Mapping[str, Any]",
    ttl: float,
    *,
    subject: Optional[str] = None,
    jti: Optional[str] = None,
    now: Optional[float] = None,
) -> str:
    """A token signed with ``key`` granting ``grants`` for ``ttl`` seconds (``pulsyflux token``)."""
    if key.sign_key is None:
        raise ValueError(f"key {key.kid!r} can only verify: minting needs the private key")
    if not isinstance(grants, Grants):
        grants = Grants(grants)
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iat": issued,
        "exp": issued + max(1, int(ttl)),
        "jti": jti or uuid.uuid4().hex,
        CLAIM: grants.as_dict(),
    }
    if subject:
        claims["sub"] = subject
    return jwt.encode(claims, key.sign_key, algorithm=key.alg, headers={"kid": key.kid})
