"""Each Twisted private that pulsyflux reads (pulsyflux/_twisted_compat.py) still means what it did.

These fail loudly when a Twisted release renames or changes one of them,
instead of pulsyflux silently falling back to a slower path or misreading a
state. The Twisted versions tested are pinned in setup.cfg.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.base import ReactorBase
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.web.resource import Resource
from twisted.web.server import Site

from pulsyflux._twisted_compat import (
    exit_signal,
    http_channel_transport,
    immediate_send,
    immediate_send_pieces,
    server_endpoint_port,
    tls_handshake_pending,
    unsent_bytes,
)


@pytest_twisted.ensureDeferred
async def test_a_tcp_transport_still_has_the_buffers_and_flags_the_immediate_send_reads():
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Protocol))
    try:
        proto = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Protocol())
        transport: Any = proto.transport
        assert transport.TLS is False
        assert transport.socket is not None
        assert transport.dataBuffer == b"" and transport._tempDataBuffer == []
        assert transport._aborting is False and transport.connected and not transport.disconnecting
        assert immediate_send(transport) is not None, "the immediate send no longer applies to plain TCP"
        assert immediate_send_pieces(transport) is not None, "nor the gather write"
        assert unsent_bytes(transport) == 0
        transport.write(b"x" * 10)
        assert transport._tempDataBuffer == [b"x" * 10]  # Twisted's write buffers here first
        assert transport._tempDataLen == 10 and unsent_bytes(transport) == 10
        lost: Deferred[None] = Deferred()
        proto.connectionLost = lambda reason: lost.callback(None)  # type: ignore[method-assign]  # a test probe
        transport.abortConnection()
        assert transport._aborting is True
        await lost
    finally:
        await port.stopListening()


def test_the_signal_that_stopped_the_reactor_is_still_recorded_as_exitSignal():
    assert ReactorBase._exitSignal is None

    class Stub:
        _exitSignal = None

        def callFromThread(self, f: Any, *args: Any) -> None:
            pass

        def stop(self) -> None:
            pass

    stub: Any = Stub()
    assert exit_signal(stub) is None
    ReactorBase.sigTerm(stub, signal.SIGTERM, None)
    assert stub._exitSignal == signal.SIGTERM
    assert exit_signal(stub) == signal.SIGTERM


def test_a_tls_transport_before_its_handshake_is_still_told_by_handshakeDone():
    tls = TLSMemoryBIOProtocol(None, Protocol())
    assert tls._handshakeDone is False
    assert tls_handshake_pending(tls)
    assert not tls_handshake_pending(StringTransport())


def test_a_site_protocol_still_reaches_its_transport_through_the_channel():
    proto = Site(Resource()).buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    assert proto._channel.transport is transport
    assert http_channel_transport(proto) is transport
    proto.connectionLost(None)


def test_a_tcp_server_endpoint_still_keeps_its_port_as_port():
    from twisted.internet.endpoints import serverFromString

    for description, port in (("tcp:9090:interface=127.0.0.1", 9090), ("tcp6:70000", 70000)):
        endpoint = serverFromString(reactor, description)
        assert endpoint._port == port  # type: ignore[attr-defined]
        assert server_endpoint_port(endpoint) == port
    assert server_endpoint_port(serverFromString(reactor, "unix:/tmp/x.sock")) is None
