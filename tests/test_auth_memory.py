"""The gate's hold on the in-memory harness: a held provider registration gives up, on a clock we move."""

from __future__ import annotations

import uuid

from pulsyflux.auth.gate import HOLD_PATIENCE
from pulsyflux.auth.grants import Grants
from pulsyflux.auth.tokens import Authority, Key
from pulsyflux.client import Provider
from pulsyflux.testing import MemoryServer
from pulsyflux.wire.errors import PermissionDenied

KEY = Key.hs256("k1", "k" * 32)


def _server() -> tuple[MemoryServer, Authority]:  # the authority reads the server's clock
    server = MemoryServer(broker=False)
    authority = Authority([KEY], Grants({"subscribe": ["news"]}), leeway=1, clock=server.clock.seconds)
    server.factory.router.enable_auth(authority)
    return server, authority


def test_a_held_provider_registration_gives_up_with_one_clear_error() -> None:
    server, _ = _server()
    channel = uuid.uuid4()
    # Anonymous clients may subscribe, so a provider registration is held for the broker's claim...
    provider = server.run(server.connect(Provider, channel, handler=bytes.upper))
    gate = server.factory.router.gate
    assert len(gate.held) == 1 and not server.factory.router.providers
    server.advance(HOLD_PATIENCE + 0.1)  # ...which never comes
    server.flush()
    assert not gate.held and not provider.connected
    assert gate.refusals == {"provide": 1}
    # connect() had succeeded: the provider learns why it was closed.
    assert isinstance(provider.closed_reason, PermissionDenied)
    assert str(provider.closed_reason) == "permission denied: anonymous clients may not provide on this channel"
    server.close()
    assert server.clock.getDelayedCalls() == []
