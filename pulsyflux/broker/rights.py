"""Who may publish and subscribe, for the broker beside a server that checks tokens (``--auth``).

The server's :class:`~pulsyflux.auth.gate.Gate` knows which connection sent
each request; the broker, a provider, asks it by request id through the
in-process link (:class:`~pulsyflux.auth.gate.BrokerLink`), so nothing a
client writes decides who it is. A broker with no such link (over TCP, or a
server without ``--auth``) has no :class:`Rights` at all and checks nothing.

A subscription lives on the rights of the identity that announced it (the
announcing connection's, updated by each re-announce, so a refreshed token
carries on): when that identity expires, is revoked, or is refreshed into
narrower grants, the subscriptions it no longer covers end with a notice
saying why (``permission denied: token expired at ...``).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ..wire.errors import PermissionDenied, permission_denied
from ..wire.printable import excerpt

if TYPE_CHECKING:
    from ..auth.gate import BrokerLink
    from ..auth.tokens import Identity
    from ..wire.ratelimit import LogLimiter
    from .outlet import Outlet

__all__ = ["Rights", "auth_link"]

log = Logger()


def auth_link(address: object) -> Optional[BrokerLink]:
    """The server's :class:`~pulsyflux.auth.gate.BrokerLink` when it checks tokens (in-process only), else None."""
    link = getattr(address, "auth_link", None)
    return link() if link is not None else None  # type: ignore[no-any-return]  # InProcessEndpoint.auth_link


def _who(identity: Identity) -> str:
    from ..auth.gate import describe

    return describe(identity)


class Rights:
    """The broker's checks and the subscriptions each identity keeps alive."""

    def __init__(
        self,
        link: BrokerLink,
        reactor: IReactorTime,
        remove: Callable[["Outlet", str], object],
        log_limiter: LogLimiter,
    ) -> None:
        self.link = link
        self.reactor = reactor
        self.remove = remove  # Fanout.remove(outlet, reason): ends a subscription with a notice
        self.log_limiter = log_limiter
        self.by_identity: dict[Identity, set[Outlet]] = {}
        self._expiries: dict[Identity, IDelayedCall] = {}  # identity -> the timer that checks it once its token expires
        self.unwatch = link.watch(self.changed)

    def identity(self, request_id: Optional[bytes]) -> Identity:
        return self.link.identity_of(request_id)

    def may_publish(self, request_id: Optional[bytes], items: list[tuple[str, str, Any, Any]]) -> None:
        """Refuse the whole publish if one of its topics is not granted to its sender (the first such is named)."""
        identity = self.link.identity_of(request_id)
        may = identity.grants.may_publish
        for item in items:
            if not may(item[0]):
                whole = f"; the batch of {len(items)} messages is refused whole" if len(items) > 1 else ""
                message = permission_denied(f"{_who(identity)} may not publish to {excerpt(item[0])}{whole}")
                self.link.refused("publish", message)
                raise PermissionDenied(message)

    def may_subscribe(self, request_id: Optional[bytes], topic: str) -> Identity:
        """The announcer's identity, if its grants cover ``topic`` (a pattern: all of it); else refused."""
        identity = self.link.identity_of(request_id)
        if not identity.grants.may_subscribe(topic):
            message = permission_denied(f"{_who(identity)} may not subscribe to {excerpt(topic)}")
            self.link.refused("subscribe", message)
            raise PermissionDenied(message)
        return identity

    def claim(self, channel: uuid.UUID, identity: Identity) -> Callable[[], None]:
        """Let the subscriber's Provider register on ``channel`` (it needs no provide right there)."""
        try:
            return self.link.claim_inbox(channel, identity)
        except ValueError as error:  # TokenError: someone else serves or claimed the channel
            message = getattr(error, "message", str(error))
            self.link.refused("subscribe", message)
            raise PermissionDenied(message) from None

    def keep(self, outlet: "Outlet", identity: Identity) -> None:
        """``outlet`` lives on ``identity``'s rights from now on (an expiry or revocation ends it)."""
        if outlet.identity is identity:
            return
        if outlet.identity is not None:
            self.unkeep(outlet)
        outlet.identity = identity
        kept = self.by_identity.get(identity)
        if kept is None:
            kept = self.by_identity[identity] = set()
            expires = identity.expires
            if expires is not None:
                # Checked here too: the announcing connection may be gone, and nothing else would tell.
                authority = self.link.authority
                delay = max(0.0, expires + authority.leeway - authority.clock())
                self._expiries[identity] = self.reactor.callLater(delay, self._check_expiry, identity)
        kept.add(outlet)

    def unkeep(self, outlet: "Outlet") -> None:
        identity = outlet.identity
        if identity is None:
            return  # kept by no one's rights
        kept = self.by_identity.get(identity)
        if kept is not None:
            kept.discard(outlet)
            if not kept:
                del self.by_identity[identity]
                timer = self._expiries.pop(identity, None)
                if timer is not None and timer.active():
                    timer.cancel()

    def _check_expiry(self, identity: Identity) -> None:
        self._expiries.pop(identity, None)
        try:
            self.link.check(identity)
        except ValueError as error:  # TokenError
            self.changed(identity, self.link.authority.anonymous, getattr(error, "message", str(error)))

    def changed(self, old: Identity, new: Identity, reason: str) -> None:
        """A token expired, was revoked or refreshed: its subscriptions move on, or end if no longer granted."""
        outlets = self.by_identity.get(old)
        if not outlets:
            return
        for outlet in list(outlets):
            self.keep(outlet, new)
            if not new.grants.may_subscribe(outlet.topic):
                why = (
                    reason
                    if reason.startswith("permission denied")
                    else permission_denied(f"{_who(new)} may not subscribe to {excerpt(outlet.topic)} ({reason})")
                )
                if self.log_limiter.allow("dropping subscription"):
                    log.info("dropping subscription {label} to {topic!r}: {reason}", label=outlet.label,
                             topic=outlet.topic, reason=why)  # fmt: skip
                self.remove(outlet, why)

    def stop(self) -> None:
        self.unwatch()
        for timer in self._expiries.values():
            if timer.active():
                timer.cancel()
        self._expiries.clear()
