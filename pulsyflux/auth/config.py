"""The ``--auth FILE`` format: keys, what anonymous clients may do, revocations.

JSON (or TOML, by a ``.toml`` name, on Python 3.11+)::

    {
      "keys": [
        {"kid": "2026-11", "alg": "HS256", "secret_file": "hs256.secret"},
        {"kid": "ops", "alg": "EdDSA", "public_key_file": "ops.pub.pem"}
      ],
      "anonymous": {"consume": ["*"], "publish": ["public.>"], "subscribe": ["public.>"]},
      "leeway": 5,
      "stats": "token",
      "revoked": ["<jti or sub>"],
      "certificates": {"CN=billing": {"provide": ["6f1c...-uuid"], "publish": ["billing.>"]}}
    }

``anonymous`` is ``"none"`` (the default: a client must present a token),
``"all"`` (every right: tokens only add nothing, useful while rolling tokens
out) or a grant set (:mod:`pulsyflux.auth.grants`). ``stats``: ``"open"``
(the default) or ``"token"`` (``/stats`` and ``/metrics`` need a bearer token
whose grants say ``"stats": true``). Relative file names are read beside the
auth file. A secret may also be given inline (``"secret"``), which puts it in
the file itself: keep that file private either way.

``certificates`` gives grants to clients that connect on an ``mtls:``
listener with a certificate whose subject is named: the whole subject as
RFC 4514 prints it (``CN=billing,O=Acme``) is looked up first, then
``CN=<its common name>``. A token presented on such a connection replaces
the certificate's grants while it is valid (docs/security.md).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from .grants import GrantError, Grants
from .tokens import DEFAULT_LEEWAY, Authority, Key

__all__ = ["AuthConfigError", "load_auth_file", "parse_auth", "load_signing_key"]


class AuthConfigError(ValueError):
    """An auth file that cannot be used; the message names the file and the problem."""


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as error:
        raise AuthConfigError(f"cannot read auth file {path}: {error.strerror or error}") from None
    if path.endswith(".toml"):
        try:
            import tomllib  # type: ignore[import-not-found,unused-ignore]  # Python 3.11+
        except ImportError:
            raise AuthConfigError(f"{path}: TOML auth files need Python 3.11+; use JSON") from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise AuthConfigError(f"{path}: not valid TOML: {error}") from None
    else:
        try:
            data = json.loads(raw)
        except ValueError as error:
            raise AuthConfigError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise AuthConfigError(f"{path}: an auth file holds one object")
    return data


def _material(entry: dict[str, Any], field: str, base: str, where: str) -> Optional[bytes]:
    """``field`` inline, or ``field_file`` read beside the auth file."""
    inline = entry.get(field)
    if inline is not None:
        if not isinstance(inline, str):
            raise AuthConfigError(f"{where}: {field} is a string")
        return inline.encode("utf-8")
    name = entry.get(field + "_file")
    if name is None:
        return None
    path = os.path.join(base, os.path.expanduser(str(name)))
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise AuthConfigError(f"{where}: cannot read {path}: {error.strerror or error}") from None
    return data.strip() if field == "secret" else data


def _key(entry: Any, base: str, where: str, signing: bool = False) -> Key:
    if not isinstance(entry, dict):
        raise AuthConfigError(f"{where}: a key is an object with kid, alg and its material")
    kid = entry.get("kid")
    alg = str(entry.get("alg", "HS256"))
    if not isinstance(kid, str):
        raise AuthConfigError(f"{where}: a key needs a 'kid' (string)")
    try:
        if alg.upper() == "HS256":
            secret = _material(entry, "secret", base, where)
            if secret is None:
                raise AuthConfigError(f"{where}: key {kid!r} (HS256) needs 'secret' or 'secret_file'")
            return Key.hs256(kid, secret)
        if alg.upper() == "EDDSA":
            if signing:
                private = _material(entry, "private_key", base, where)
                if private is None:
                    raise AuthConfigError(f"{where}: key {kid!r} (EdDSA) needs 'private_key_file' to sign")
                return Key.eddsa_private(kid, private)
            public = _material(entry, "public_key", base, where)
            if public is None:
                raise AuthConfigError(f"{where}: key {kid!r} (EdDSA) needs 'public_key' or 'public_key_file'")
            return Key.eddsa_public(kid, public)
    except ValueError as error:
        if isinstance(error, AuthConfigError):
            raise
        raise AuthConfigError(f"{where}: {error}") from None
    raise AuthConfigError(f"{where}: key {kid!r}: alg is HS256 or EdDSA, not {alg!r}")


def _certificates(data: Any, where: str) -> dict[str, Grants]:
    """``certificates``: client certificate subject (``CN=alice`` or a whole RFC 4514 DN) -> grant set."""
    if not isinstance(data, dict):
        raise AuthConfigError(f"{where}: 'certificates' is an object: certificate subject -> grants")
    certificates: dict[str, Grants] = {}
    for subject, rules in data.items():
        if not isinstance(subject, str) or "=" not in subject:
            raise AuthConfigError(f"{where}: certificates: {subject!r} is not a subject like 'CN=alice'")
        if not isinstance(rules, dict):
            raise AuthConfigError(f"{where}: certificates: {subject!r}: grants are an object of rule lists")
        try:
            certificates[subject.strip()] = Grants(rules)
        except GrantError as error:
            raise AuthConfigError(f"{where}: certificates: {subject!r}: {error}") from None
    return certificates


def parse_auth(data: dict[str, Any], base: str = ".", where: str = "auth file") -> Authority:
    """An :class:`Authority` from an auth file's parsed content."""
    unknown = set(data) - {"keys", "anonymous", "leeway", "stats", "revoked", "certificates"}
    if unknown:
        raise AuthConfigError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    keys_data = data.get("keys", [])
    if not isinstance(keys_data, list):
        raise AuthConfigError(f"{where}: 'keys' is a list")
    keys = [_key(entry, base, f"{where}: keys[{i}]") for i, entry in enumerate(keys_data)]
    anonymous_data = data.get("anonymous", "none")
    try:
        if anonymous_data == "none":
            anonymous = Grants.none()
        elif anonymous_data == "all":
            anonymous = Grants.everything()
        elif isinstance(anonymous_data, dict):
            anonymous = Grants(anonymous_data)
        else:
            raise AuthConfigError(f'{where}: \'anonymous\' is "none", "all" or an object of rule lists')
    except GrantError as error:
        raise AuthConfigError(f"{where}: anonymous: {error}") from None
    certificates = _certificates(data.get("certificates", {}), where)
    if not keys and anonymous_data == "none" and not certificates:
        raise AuthConfigError(f"{where}: no keys and no anonymous rights: nobody could do anything")
    leeway = data.get("leeway", DEFAULT_LEEWAY)
    if not isinstance(leeway, (int, float)) or not 0 <= leeway <= 300:
        raise AuthConfigError(f"{where}: 'leeway' is 0 to 300 seconds")
    stats = data.get("stats", "open")
    if stats not in ("open", "token"):
        raise AuthConfigError(f'{where}: \'stats\' is "open" or "token"')
    revoked = data.get("revoked", [])
    if not isinstance(revoked, list) or not all(isinstance(name, str) for name in revoked):
        raise AuthConfigError(f"{where}: 'revoked' is a list of token ids (jti) or subjects")
    try:
        return Authority(
            keys,
            anonymous,
            leeway=float(leeway),
            revoked=revoked,
            stats_need_token=stats == "token",
            certificates=certificates,
        )
    except ValueError as error:
        raise AuthConfigError(f"{where}: {error}") from None


def load_auth_file(path: str) -> Authority:
    """Read ``--auth FILE``; :class:`AuthConfigError` says what is wrong with it."""
    return parse_auth(_read(path), os.path.dirname(os.path.abspath(path)), path)


def load_signing_key(path: str, kid: Optional[str] = None) -> Key:
    """The key ``pulsyflux token --key FILE`` signs with.

    ``FILE`` is an Ed25519 private key (PEM; ``--kid`` names it), one key
    entry as in an auth file (``{"kid", "alg", "secret_file"...}``), or a
    whole auth file (the HS256 key named by ``--kid``, else its first one).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as error:
        raise AuthConfigError(f"cannot read key file {path}: {error.strerror or error}") from None
    base = os.path.dirname(os.path.abspath(path))
    if raw.lstrip().startswith(b"-----BEGIN"):
        if not kid:
            raise AuthConfigError(f"{path}: a PEM key needs --kid (the key id the server knows it by)")
        try:
            return Key.eddsa_private(kid, raw)
        except ValueError as error:
            raise AuthConfigError(f"{path}: {error}") from None
    data = _read(path)
    entries = data.get("keys") if "keys" in data else [data]
    if not isinstance(entries, list):
        raise AuthConfigError(f"{path}: 'keys' is a list")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            continue
        if kid is not None and entry.get("kid") != kid:
            continue
        if kid is None and str(entry.get("alg", "HS256")).upper() != "HS256" and "private_key_file" not in entry:
            continue
        return _key(entry, base, f"{path}: keys[{i}]", signing=True)
    raise AuthConfigError(f"{path}: no key {'with kid ' + repr(kid) if kid else 'to sign with'}")
