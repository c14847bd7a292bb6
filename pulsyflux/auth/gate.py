"""The server's side of authentication: who each connection is, and what it may register as.

A :class:`Gate` sits beside the :class:`~pulsyflux.server.Router` when the
server runs with an :class:`~pulsyflux.auth.tokens.Authority` (``--auth``).
It never runs on the request path: the router asks it when a connection
*registers* (provide/consume a channel) and when an AUTH frame arrives;
the broker asks it, through :class:`BrokerLink`, for the identity behind a
publish or a subscribe. Without ``--auth`` there is no Gate and the router
does exactly what it did before.

No Twisted import: the clock is any object with ``callLater`` (the
reactor, or a ``task.Clock`` in tests).

Wire (docs/protocol.md, "Tokens"): a client sends frame type ``AUTH``
(0x0A, a type Go clients never send) whose payload is the token, on any
request id, before its registration START (or at any time later to refresh).
The server answers an AUTH frame on the same id (payload: JSON with the
subject and expiry) or an ERROR ``permission denied: ...``. A refused
*first* token closes the connection (one clear error, nothing else is
routed); a refused refresh leaves the connection with the rights it had.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..wire import codec
from ..wire.errors import permission_denied
from ..wire.printable import printable
from .grants import Grants
from .tokens import CERTIFICATE_KID, CERTIFICATE_PREFIX, Authority, Identity, TokenError

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

    from ..server.router import Peer, Router

__all__ = ["Gate", "BrokerLink", "HOLD_PATIENCE", "MAX_HELD"]

HOLD_PATIENCE = 5.0  # seconds a provider may wait for the broker to claim its subscription channel
MAX_HELD = 4096  # providers waiting so at once; more are refused
# Refusal kinds counted in stats: the token's (tokens.TokenError.kind) and the missing right's.
RIGHT_KINDS = ("provide", "consume", "publish", "subscribe", "stats")

Listener = Callable[[Identity, Identity, str], None]


def describe(identity: Identity) -> str:
    """How a refusal names who was refused: never the token, at most a short subject."""
    if identity.anonymous:
        return "anonymous clients"
    if identity.kid == CERTIFICATE_KID:
        return f"certificate {printable(identity.subject[len(CERTIFICATE_PREFIX) :], 64)!r}"
    return f"token {printable(identity.subject, 64)!r}"


class _Held:
    """A provider registration waiting for the broker to claim its channel (a subscription's)."""

    __slots__ = ("peer", "channel", "client_id", "request_id", "timer")

    def __init__(self, peer: "Peer", channel: bytes, client_id: bytes, request_id: bytes, timer: IDelayedCall) -> None:
        self.peer = peer
        self.channel = channel
        self.client_id = client_id
        self.request_id = request_id
        self.timer = timer


class Gate:
    """Per-connection identities for one router: AUTH frames, registration checks, expiry, revocation."""

    def __init__(self, authority: Authority, router: "Router", clock: Optional[IReactorTime] = None) -> None:
        self.authority = authority
        self.router = router
        self.clock = clock if clock is not None else router.clock
        self.refusals: Counter[str] = Counter()  # by kind: a fixed vocabulary
        self.authenticated = 0  # AUTH frames accepted (first tokens and refreshes)
        self.inboxes: dict[bytes, list[Any]] = {}  # channel -> [subject, claims held]
        self.held: dict[Peer, _Held] = {}  # peer -> its waiting provider registration
        self.subscribers: set[Peer] = set()  # providers registered on a subscription's channel (claim_inbox)
        self._timers: dict[Peer, IDelayedCall] = {}  # peer -> its expiry timer
        self.listeners: list[Listener] = []  # told when an identity's rights change (the broker)
        self.certified: dict[Any, Identity] = {}  # peer -> what its client certificate grants (mTLS)

    # -- identities ------------------------------------------------------------

    def identity(self, peer: "Peer") -> Identity:
        """A token's identity while it is valid, else its certificate's (mTLS), else anonymous."""
        identity = peer.identity
        if identity is not None:
            return identity
        if self.certified:
            return self.certified.get(peer, self.authority.anonymous)
        return self.authority.anonymous

    def certificate(self, peer: "Peer", subject: str, common_name: Optional[str]) -> None:
        """A TLS handshake proved a client certificate (verified by the listener's CA): adopt its grants.

        Called before the connection's first frame is read. A subject the
        auth file does not name leaves the connection anonymous.
        """
        identity = self.authority.for_certificate(subject, common_name)
        if identity is not None:
            self.certified[peer] = identity

    def refuse(self, kind: str, peer_text: str = "") -> None:
        """Count a refusal and log it, rate-limited (peers decide how often this happens)."""
        self.refusals[kind] += 1
        router = self.router
        if router.log_limiter.allow("permission denied"):
            router.log.info("permission denied ({kind}): {text}", kind=kind, text=printable(peer_text, 200))

    def authenticate(self, peer: "Peer", request_id: bytes, token: bytes) -> bool:
        """An AUTH frame: verify, adopt, answer. False: refuse the connection (a bad first token)."""
        router = self.router
        try:
            identity = self.authority.verify(token)
        except TokenError as error:
            self.refuse(error.kind, error.message)
            router._server_error(peer, request_id, error.message)
            first = peer.identity is None and peer.key is None
            return not first  # a bad refresh keeps what the connection had; a bad first token ends it
        self.authenticated += 1
        old = self.identity(peer)
        peer.identity = identity
        self._schedule(peer, identity)
        answer = json.dumps({"subject": identity.subject, "expires": identity.expires}).encode()
        router.send(peer, codec.encode_frame(codec.AUTH, request_id, answer))
        if old is not identity:
            self._changed(old, identity, "token refreshed")
            if peer.key is not None and not self._still_allowed(peer):
                self._end(peer, permission_denied("the new token does not grant what this connection registered as"))
        return True

    def _schedule(self, peer: "Peer", identity: Identity) -> None:
        timer = self._timers.pop(peer, None)
        if timer is not None and timer.active():
            timer.cancel()
        if identity.expires is None:
            return
        delay = max(0.0, identity.expires + self.authority.leeway - self.authority.clock())
        self._timers[peer] = self.clock.callLater(delay, self._expired, peer)

    def _expired(self, peer: "Peer") -> None:
        self._timers.pop(peer, None)
        identity = peer.identity
        if identity is None:
            return
        try:
            self.authority.check(identity)
        except TokenError as error:
            self._rights_ended(peer, error)
            return
        self._schedule(peer, identity)  # the clock ran early: look again later

    def _rights_ended(self, peer: "Peer", error: TokenError) -> None:
        """Expired or revoked: the connection is anonymous from now on; what it may no longer do ends."""
        old = self.identity(peer)
        peer.identity = None  # back to its certificate's grants (mTLS), or anonymous
        self.refuse(error.kind, error.message)
        self._changed(old, self.identity(peer), error.message)
        key = peer.key
        if peer in self.subscribers:
            return  # a subscription's channel: the broker ends it, with a notice the subscriber reads first
        if key is not None and not self._still_allowed(peer):
            self._end(peer, error.message)

    def revoke(self, name: str) -> int:
        """Revoke tokens whose ``jti`` or ``sub`` is ``name``; live connections holding one lose its rights.

        Returns how many connections were affected.
        """
        self.authority.revoke(name)
        hit = 0
        for peer in list(self.router.peers):
            identity = peer.identity
            if identity is not None and (identity.jti == name or identity.subject == name):
                hit += 1
                timer = self._timers.pop(peer, None)
                if timer is not None and timer.active():
                    timer.cancel()
                self._rights_ended(peer, TokenError("revoked", "token revoked"))
        return hit

    def _changed(self, old: Identity, new: Identity, reason: str) -> None:
        for listener in list(self.listeners):
            listener(old, new, reason)

    def _end(self, peer: "Peer", message: str) -> None:
        """Tell the peer why (on the zero id) and close it: its registration is no longer allowed."""
        router = self.router
        router.stats.error(message)
        router.send(peer, codec.encode_frame(codec.ERROR, bytes(16), codec.error_payload(message)))
        router.forget(peer)
        if router.reading is None:
            router.flush()
        from ..writer import hang_up  # imports Twisted: this module stays importable without it

        hang_up(peer.transport)

    # -- registrations -----------------------------------------------------------

    def _still_allowed(self, peer: "Peer") -> bool:
        key = peer.key
        if key is None:
            return True
        role, channel, _ = key
        return self._verdict(self.identity(peer), role, channel) is None

    def _verdict(self, identity: Identity, role: int, channel: bytes) -> Optional[str]:
        """None if ``identity`` may register so, else the missing right ("provide" or "consume")."""
        grants = identity.grants
        if role == codec.ROLE_PROVIDER:
            if grants.may_channel("provide", channel):
                return None
            inbox = self.inboxes.get(channel)
            if inbox is not None and inbox[0] == identity.subject:
                return None  # the channel of a subscription this identity made (claim_inbox)
            return "provide"
        if grants.may_channel("consume", channel):
            return None
        if channel in self.router.reserved and grants.uses_broker:
            return None  # the broker's own channel: publish/subscribe rights are checked per message
        return "consume"

    def admit(self, peer: "Peer", role: int, channel: bytes, client_id: bytes, request_id: bytes) -> Optional[bool]:
        """A registration: None to register now, False to hold it (a subscription's channel), True to refuse.

        Refused: the ERROR naming the missing right is queued; the router closes the connection.
        """
        identity = self.identity(peer)
        missing = self._verdict(identity, role, channel)
        if missing is None:
            if role == codec.ROLE_PROVIDER and channel in self.inboxes:
                self.subscribers.add(peer)
            return None
        router = self.router
        if (
            missing == "provide"
            and identity.grants.uses_broker
            and not router.providers.get(channel)
            and channel not in self.inboxes
            and len(self.held) < MAX_HELD
            and peer not in self.held
        ):
            # Perhaps a subscriber registering before it announces (as Go's and ours do):
            # wait for the broker to claim this channel for it, a few seconds at most.
            timer = self.clock.callLater(HOLD_PATIENCE, self._hold_expired, peer)
            self.held[peer] = _Held(peer, channel, client_id, request_id, timer)
            return False
        message = permission_denied(f"{describe(identity)} may not {missing} on this channel")
        self.refuse(missing, message)
        router._server_error(peer, request_id, message)
        return True

    def _hold_expired(self, peer: "Peer") -> None:
        held = self.held.pop(peer, None)
        if held is None:
            return
        message = permission_denied(f"{describe(self.identity(peer))} may not provide on this channel")
        self.refuse("provide", message)
        router = self.router
        router._server_error(peer, held.request_id, message)
        router.forget(peer)
        if router.reading is None:
            router.flush()
        from ..writer import hang_up  # imports Twisted: this module stays importable without it

        hang_up(peer.transport)

    def disconnected(self, peer: "Peer") -> None:
        self.subscribers.discard(peer)
        self.certified.pop(peer, None)
        timer = self._timers.pop(peer, None)
        if timer is not None and timer.active():
            timer.cancel()
        held = self.held.pop(peer, None)
        if held is not None and held.timer.active():
            held.timer.cancel()

    def claim_inbox(self, channel: bytes, identity: Identity) -> Callable[[], None]:
        """The broker accepted a subscription on ``channel`` from ``identity``: its providers may register.

        Refused (:class:`TokenError` kind ``provide``) if someone else serves
        or has claimed the channel: subscribing must not take over a channel.
        Returns the call that ends the claim (the subscription ended).
        """
        router = self.router
        subject = identity.subject
        inbox = self.inboxes.get(channel)
        if inbox is not None and inbox[0] != subject:
            raise TokenError("subscribe", "the subscription's channel belongs to another client")
        for provider in router.providers.get(channel, ()):
            if not provider.trusted and self.identity(provider).subject != subject:
                raise TokenError("subscribe", "the subscription's channel is served by another client")
        if inbox is None:
            inbox = self.inboxes[channel] = [subject, 0]
        inbox[1] += 1
        for peer, held in list(self.held.items()):
            if held.channel == channel and self.identity(peer).subject == subject:
                del self.held[peer]
                if held.timer.active():
                    held.timer.cancel()
                router.register(peer, codec.ROLE_PROVIDER, channel, held.client_id)
                self.subscribers.add(peer)
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            inbox[1] -= 1
            if inbox[1] <= 0 and self.inboxes.get(channel) is inbox:
                del self.inboxes[channel]

        return release

    def stats(self) -> dict[str, Any]:
        """For /stats and /metrics: refusals by kind, tokens accepted, connections by identity kind."""
        with_token = sum(1 for peer in self.router.peers if peer.identity is not None)
        return {
            "refusals": dict(self.refusals),
            "authenticated": self.authenticated,
            "connections_with_token": with_token,
            "held": len(self.held),
        }


class BrokerLink:
    """What the broker beside the server (in-process) learns from the Gate: who sent a request.

    The broker is a provider; the router knows which connection sent each
    request in flight, so the broker asks by request id instead of trusting
    anything the sender wrote.
    """

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.authority = gate.authority
        self.server = Identity("the server", Grants.everything())  # its own connections (trusted)

    def identity_of(self, request_id: Optional[bytes]) -> Identity:
        """The identity of the connection that sent request ``request_id`` (anonymous if it is gone)."""
        entry = self.gate.router.requests.get(request_id) if request_id is not None else None
        if entry is None:
            return self.authority.anonymous
        consumer = entry.consumer
        return self.server if consumer.trusted else self.gate.identity(consumer)

    def refused(self, kind: str, message: str) -> None:
        self.gate.refuse(kind, message)

    def claim_inbox(self, channel: uuid.UUID, identity: Identity) -> Callable[[], None]:
        return self.gate.claim_inbox(channel.bytes, identity)

    def watch(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(old, new, reason)`` whenever an identity's rights change; returns the unwatch call."""
        listeners = self.gate.listeners
        listeners.append(listener)
        return lambda: listeners.remove(listener) if listener in listeners else None

    def check(self, identity: Identity) -> None:
        """Raise :class:`TokenError` if ``identity`` expired or was revoked."""
        self.authority.check(identity)
