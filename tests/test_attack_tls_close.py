"""Every close the server decides reaches a TLS peer at once, over real TLS on 127.0.0.1.

Twisted's TLS transport postpones a ``loseConnection`` while a producer is
registered (the server's flow control always is): a peer closed by the guard,
cut as a slow reader or left at a shutdown would read its ERROR and then wait
on an open line until the abort timer. Here the abort timers are all out of
reach (a test clock nobody advances, or a minute), and each close must arrive
within a bound that only a close that is not postponed meets.
"""

from __future__ import annotations

import os
import socket

import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import connectionDone

from pulsyflux import Consumer, Provider
from pulsyflux.endpoints import client_endpoint, server_endpoint
from pulsyflux.server import ServerFactory
from pulsyflux.wire import codec

from .helpers import eventually
from .test_tls import PKI
from .wire import RawClient, register_frames, request_frames

ensure = pytest_twisted.ensureDeferred

KiB = 1 << 10
LONG = 60.0  # an abort timer the test must never need
BOUND = 5.0  # a close that is not postponed arrives long before this


class TLSRawClient(RawClient):
    """A raw client that also keeps why its connection ended (a clean close or not)."""

    def __init__(self) -> None:
        super().__init__()
        self.reason = None

    def connectionLost(self, reason=connectionDone) -> None:
        self.reason = reason
        super().connectionLost(reason)


@pytest_twisted.async_yield_fixture
async def tls_server(tmp_path):
    """Starts a ServerFactory on ``ssl:`` with the given limits; yields ``start``, closes all after."""
    pki = PKI(tmp_path)
    started = []

    async def start(**limits):
        factory = ServerFactory(reactor, **limits)
        listen = f"ssl:0:interface=127.0.0.1:privateKey={pki.server_key}:certKey={pki.server_cert}"
        port = await server_endpoint(reactor, listen).listen(factory)
        started.append((factory, port))
        factory.address = f"tls:host=127.0.0.1:port={port.getHost().port}:trustRoots={pki.ca_dir}"
        factory.port = port
        return factory

    yield start
    for factory, port in started:
        await maybeDeferred(port.stopListening)
        await factory.router.close_all()  # aborts what a failed test left open


async def connect_tls_raw(factory) -> TLSRawClient:
    """A raw TLS client whose handshake the server has finished (a PROBE before START got its answer)."""
    raw = await connectProtocol(client_endpoint(reactor, factory.address), TLSRawClient())
    raw.send(codec.encode_frame(codec.PROBE, os.urandom(16)))
    await raw.wait_frames(1).addTimeout(BOUND, reactor)
    return raw


async def closed_cleanly(raw: TLSRawClient) -> str:
    """Await the server's close of ``raw`` (bounded): a TLS close, not an abort; the text of its ERROR."""
    await raw.lost.addTimeout(BOUND, reactor)
    assert raw.reason.check(ConnectionDone), raw.reason  # close_notify, then FIN: not a reset
    goodbye = raw.frames[-1]
    assert goodbye.type == codec.ERROR and goodbye.request_id == bytes(16), raw.frames
    return codec.error_message(goodbye.payload)


@ensure
async def test_attack_tls_client_that_never_registers_sees_the_close(tls_server):
    factory = await tls_server(register_timeout=0.2)
    guard = factory.router.connection_guard
    guard.clock = clock = task.Clock()  # its LINGER abort never fires: only a real close ends the line
    raw = await connect_tls_raw(factory)
    clock.advance(0.2)
    assert (await closed_cleanly(raw)).startswith("register timeout")


@ensure
async def test_attack_tls_client_with_an_incomplete_frame_sees_the_close(tls_server):
    factory = await tls_server(frame_timeout=0.2, register_timeout=LONG)
    guard = factory.router.connection_guard
    guard.clock = clock = task.Clock()
    raw = await connect_tls_raw(factory)
    raw.send(register_frames(codec.ROLE_CONSUMER, os.urandom(16), os.urandom(16)))
    raw.send(codec.encode_frame(codec.CHUNK, os.urandom(16))[:12])
    await eventually(lambda: guard.partial_bytes == 12)
    clock.advance(0.2)
    assert (await closed_cleanly(raw)).startswith("frame timeout")


@ensure
async def test_attack_tls_slow_reader_cut_by_backpressure_sees_the_close(tls_server, channel):
    factory = await tls_server(max_unsent=256 * KiB)
    router = factory.router
    router.flow_control.linger = LONG  # the abort of a cut reader: out of reach
    provider = await Provider.connect(factory.address, channel, handler=lambda data: data)  # an echo service
    honest = await Consumer.connect(factory.address, channel)  # shares it: the provider is not held for the reader
    try:
        raw = await connect_tls_raw(factory)
        raw.transport.pauseProducing()  # reads nothing until it is cut
        raw_id = os.urandom(16)
        raw.send(register_frames(codec.ROLE_CONSUMER, raw_id, channel.bytes))
        key = (codec.ROLE_CONSUMER, channel.bytes, raw_id)
        await eventually(lambda: key in router.registry)
        conn = router.registry[key].conn
        conn.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # a slow network
        big = os.urandom(128 * KiB)
        for _ in range(48):  # 6 MiB of echoes it does not read
            raw.send(request_frames(os.urandom(16), raw_id, channel.bytes, big, timeout_ms=30000))
        await eventually(lambda: conn.flow.paused)
        for n in range(100):  # its echoes keep coming while the provider serves another client too
            assert await honest.send(b"ping %d" % n, timeout=5) == b"ping %d" % n
            if factory.stats.slow_consumers:
                break
        assert factory.stats.slow_consumers == 1
        raw.transport.resumeProducing()  # it reads again: what was sent, its ERROR, then the close
        assert (await closed_cleanly(raw)).startswith("server overloaded: slow consumer")
    finally:
        await honest.close()
        await provider.close()


@ensure
async def test_attack_tls_clients_see_a_shutdown_close(tls_server):
    factory = await tls_server(register_timeout=LONG)
    raws = [await connect_tls_raw(factory) for _ in range(3)]
    for raw in raws:
        raw.send(register_frames(codec.ROLE_CONSUMER, os.urandom(16), os.urandom(16)))
    await eventually(lambda: len(factory.router.registry) == 3)
    await maybeDeferred(factory.port.stopListening)
    gone: Deferred = factory.shutdown(grace=0, linger=LONG)  # the abort of what cannot flush: out of reach
    await gone.addTimeout(BOUND, reactor)
    for raw in raws:
        await raw.lost.addTimeout(BOUND, reactor)
        assert raw.reason.check(ConnectionDone), raw.reason
