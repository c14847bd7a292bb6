"""Attacks on the server's connections (issue #8, items 7, 8 and 10), over real TCP on 127.0.0.1.

Peers that connect and never register, that leave a frame incomplete, that
hold many incomplete frames, or that make the server log for each of their
bad connections. The guard's timers run on a clock of the test's own
(``guard_clock``): once the server holds what the peer sent, the test moves
time to just before the timeout (nothing happens) and past it (the close),
so nothing waits real seconds and nothing asserts how long anything took.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import DeferredList
from twisted.logger import globalLogPublisher

from pulsyflux import Consumer, Provider
from pulsyflux.server import ServerFactory
from pulsyflux.service import ServerService
from pulsyflux.testing import hang
from pulsyflux.wire import codec, errors

from .helpers import eventually
from .wire import connect_raw, register_frames

ensure = pytest_twisted.ensureDeferred

KiB = 1 << 10
LONG = 60.0  # a timeout the test does not want to reach


def guard_clock(server) -> task.Clock:
    """The server's connection guard (frame and register timeouts) runs on the returned clock from now on."""
    clock = server.factory.router.connection_guard.clock = task.Clock()
    return clock


async def closed_with(raw, timeout: float = 5.0) -> str:
    """Await the server closing ``raw``; the text of the ERROR it said goodbye with."""
    await raw.lost.addTimeout(timeout, reactor)
    goodbye = raw.frames[-1]
    assert goodbye.type == codec.ERROR and goodbye.request_id == bytes(16), raw.frames
    return codec.error_message(goodbye.payload)


async def alive(raw) -> None:
    """The server still reads and answers ``raw`` (a PROBE gets its usual ERROR)."""
    count = len(raw.frames) + 1
    raw.send(codec.encode_frame(codec.PROBE, os.urandom(16)))
    [*_, answer] = await raw.wait_frames(count).addTimeout(5, reactor)
    assert codec.error_message(answer.payload) == errors.MSG_BAD_TYPE


async def echo_works(server, channel) -> None:
    provider = await Provider.connect(server.address, channel, handler=lambda data: data)
    consumer = await Consumer.connect(server.address, channel)
    assert await consumer.send(b"still served", timeout=5) == b"still served"
    await consumer.close()
    await provider.close()


def registered_raw_frames() -> bytes:
    return register_frames(codec.ROLE_CONSUMER, os.urandom(16), os.urandom(16))


# -- item 7: incomplete frames ----------------------------------------------------


@ensure
async def test_attack_half_a_header_is_closed_after_the_frame_timeout(limited, channel):
    server = limited(frame_timeout=0.2, register_timeout=LONG)
    clock, guard = guard_clock(server), server.factory.router.connection_guard
    raw = await connect_raw(server)
    raw.send(registered_raw_frames() + codec.encode_frame(codec.CHUNK, os.urandom(16))[:12])
    await eventually(lambda: guard.partial_bytes == 12)
    clock.advance(0.19)
    assert guard.partial_bytes == 12 and not server.factory.stats.errors  # not yet
    clock.advance(0.02)
    assert (await closed_with(raw)).startswith("frame timeout: a frame stayed incomplete for 0.2 s")
    assert guard.partial_bytes == 0
    await echo_works(server, channel)


@ensure
async def test_attack_many_half_headers_are_all_closed_by_one_timer(limited):
    server = limited(frame_timeout=0.2, register_timeout=LONG)
    clock, guard = guard_clock(server), server.factory.router.connection_guard
    raws = [await connect_raw(server) for _ in range(50)]
    for raw in raws:
        raw.send(registered_raw_frames() + codec.encode_frame(codec.CHUNK, os.urandom(16))[:12])
    await eventually(lambda: guard.partial_bytes == 50 * 12)
    clock.advance(0.2)  # one timer comes due, for all of them
    await DeferredList([raw.lost for raw in raws], fireOnOneErrback=True).addTimeout(5, reactor)
    assert server.factory.stats.errors == {"frame timeout": 50}
    await eventually(lambda: not server.factory.router.connections)
    assert guard.partial_bytes == 0 and guard.timer_due is None  # nothing left to watch: no timer


@ensure
async def test_attack_most_of_a_frame_is_closed_after_the_frame_timeout(limited):
    server = limited(frame_timeout=0.2, register_timeout=LONG)
    clock, guard = guard_clock(server), server.factory.router.connection_guard
    raw = await connect_raw(server)
    frame = codec.encode_frame(codec.CHUNK, os.urandom(16), os.urandom(64 * KiB))
    raw.send(registered_raw_frames() + frame[:-1])  # all but the last byte, for ever
    await eventually(lambda: guard.partial_bytes == len(frame) - 1)
    clock.advance(0.2)
    assert (await closed_with(raw)).startswith("frame timeout")
    assert guard.partial_bytes == 0


@ensure
async def test_attack_a_frame_trickled_byte_by_byte_still_times_out(limited):
    """Progress does not reset the clock: the frame as a whole must arrive in time."""
    server = limited(frame_timeout=0.3, register_timeout=LONG)
    clock, guard = guard_clock(server), server.factory.router.connection_guard
    raw = await connect_raw(server)
    raw.send(registered_raw_frames())
    frame = codec.encode_frame(codec.CHUNK, os.urandom(16), os.urandom(KiB))
    for sent, byte in enumerate(frame, 1):
        raw.send(bytes([byte]))
        await eventually(lambda sent=sent: guard.partial_bytes == sent)  # read by the server: progress
        clock.advance(0.02)  # 20 ms between bytes
        if server.factory.stats.errors:
            break
    assert sent == 15  # 15 x 20 ms after its first byte, though every byte made progress
    assert (await closed_with(raw)).startswith("frame timeout")


@ensure
async def test_attack_incomplete_frames_past_the_global_bound_close_the_oldest(limited, channel):
    server = limited(frame_timeout=LONG, register_timeout=LONG, max_partial_bytes=100 * KiB)
    guard = server.factory.router.connection_guard
    first, second = await connect_raw(server), await connect_raw(server)
    for raw in (first, second):
        raw.send(registered_raw_frames())
        await alive(raw)
    frame = codec.encode_frame(codec.CHUNK, os.urandom(16), os.urandom(64 * KiB))
    first.send(frame[:-1])
    await eventually(lambda: guard.partial_bytes == len(frame) - 1)
    second.send(frame[:-1])  # 128 KiB held in all: over the bound
    assert (await closed_with(first)).startswith("server overloaded: incomplete frames hold more than 102400 bytes")
    second.send(frame[-1:])  # the younger one is still served
    await alive(second)
    assert guard.partial_bytes == 0
    await echo_works(server, channel)


@ensure
async def test_honest_large_bodies_pass_the_frame_guards(limited, channel):
    server = limited(frame_timeout=5.0, register_timeout=5.0, max_partial_bytes=4 << 20)
    provider = await Provider.connect(server.address, channel, handler=lambda data: data)
    consumer = await Consumer.connect(server.address, channel)
    body = os.urandom(3 << 20)  # three full 1 MiB frames each way, read in pieces
    assert await consumer.send(body, timeout=10) == body
    assert server.factory.stats.errors == {}
    await consumer.close()
    await provider.close()


@ensure
async def test_frame_timeout_spares_a_sender_the_server_stopped_reading(limited, channel):
    """Flow control, not the peer, keeps this frame incomplete: not a stall."""
    from .test_reliability import registered

    server = limited(frame_timeout=1.0, register_timeout=LONG)
    guard = server.factory.router.connection_guard
    clock = guard.clock = task.Clock()
    provider = await Provider.connect(server.address, channel)
    resume = hang(provider)  # this provider stops reading
    consumer = await Consumer.connect(server.address, channel)
    body = os.urandom(16 << 20)
    reply = consumer.send(body, timeout=LONG)
    conn = await registered(server, codec.ROLE_CONSUMER, channel, consumer.client_id)
    await eventually(lambda: conn.flow.reading_paused and conn.peer.held > 0)  # paused mid-frame
    clock.advance(10)  # ten frame timeouts
    assert not conn.lost and not guard.stats.errors
    resume()
    request = await provider.receive()
    assert request.payload == body
    provider.respond(request, b"ok")
    assert await reply == b"ok"
    await consumer.close()
    await provider.close()


# -- item 8: idle, unregistered peers ---------------------------------------------


@ensure
async def test_attack_idle_unregistered_peer_is_closed_after_the_register_timeout(limited, channel):
    server = limited(register_timeout=0.2)
    clock = guard_clock(server)
    provider = await Provider.connect(server.address, channel, handler=lambda data: data)
    idle = await connect_raw(server)
    probing = await connect_raw(server)
    probing.send(codec.encode_frame(codec.PROBE, os.urandom(16)))  # frames, but never a START
    await probing.wait_frames(1).addTimeout(5, reactor)  # answered (an ERROR): read, so admitted
    await eventually(lambda: len(server.factory.router.connections) == 3)
    clock.advance(0.19)
    assert not server.factory.stats.errors  # not yet
    clock.advance(0.02)
    assert (await closed_with(idle)).startswith("register timeout: no START within 0.2 s")
    await probing.lost.addTimeout(5, reactor)
    assert codec.error_message(probing.frames[-1].payload).startswith("register timeout")
    consumer = await Consumer.connect(server.address, channel)
    assert await consumer.send(b"registered clients stay") == b"registered clients stay"
    assert len(server.factory.router.connections) == 2
    await consumer.close()
    await provider.close()


@ensure
async def test_attack_idle_peers_cannot_lock_clients_out_for_good(limited, channel):
    server = limited(max_connections=3, register_timeout=LONG)
    clock = server.factory.router.connection_guard.clock = task.Clock()  # drives the guard only
    squatters = [await connect_raw(server) for _ in range(3)]
    await eventually(lambda: len(server.factory.router.connections) == 3)
    clock.advance(2)  # they had time to register, and did not
    provider = await Provider.connect(server.address, channel, handler=lambda data: data)
    consumer = await Consumer.connect(server.address, channel)
    assert await consumer.send(b"in") == b"in"
    evicted = [await closed_with(raw) for raw in squatters[:2]]  # the oldest make room
    assert evicted == ["server overloaded: more than 3 connections"] * 2
    await alive(squatters[2])  # not needed yet: kept
    await consumer.close()
    await provider.close()


@ensure
async def test_trusted_connections_are_exempt_from_the_connection_limits(limited, channel):
    server = limited(max_connections=1, register_timeout=0.2)
    clock = guard_clock(server)
    factory = server.factory
    build = factory.buildProtocol
    marked = []

    def trusted_first(addr):
        proto = build(addr)
        if not marked:
            proto.trusted = True
            marked.append(proto)
        return proto

    factory.buildProtocol = trusted_first
    own = await connect_raw(server)  # the server's own (its broker's): never counted, never timed out
    await eventually(lambda: len(factory.router.connections) == 1)
    outsider = await connect_raw(server)
    await eventually(lambda: len(factory.router.connections) == 2)
    clock.advance(0.2)
    assert (await closed_with(outsider)).startswith("register timeout")  # admitted, then timed out
    await alive(own)
    assert not own.lost.called


@ensure
async def test_attack_peer_that_never_starts_the_tls_handshake_is_closed(tmp_path):
    from .test_tls import PKI

    pki = PKI(tmp_path)
    factory = ServerFactory(reactor, register_timeout=0.2)
    clock = guard_clock(SimpleNamespace(factory=factory))
    listen = f"mtls:0:privateKey={pki.server_key}:certKey={pki.server_cert}:caCerts={pki.ca_file}:interface=127.0.0.1"
    service = ServerService(listen, reactor, factory=factory, grace=0)
    service.startService()
    try:
        port = (await service.whenListening()).getHost().port
        raw = await connect_raw(SimpleNamespace(port=port))  # plain TCP: says nothing, never handshakes
        await eventually(lambda: len(factory.router.connections) == 1)
        clock.advance(0.2)
        await raw.lost.addTimeout(4, reactor)  # at once: no waiting for a handshake that never comes
        assert factory.stats.errors == {"register timeout": 1}
    finally:
        await service.stopService()


# -- item 10: log lines per bad connection ----------------------------------------


@pytest.fixture
def log_events():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@ensure
async def test_attack_malformed_connections_cannot_flood_the_log(limited, log_events):
    server = limited()
    limiter = server.factory.router.log_limiter
    limiter.clock = clock = task.Clock()
    bad = [await connect_raw(server) for _ in range(30)]
    for raw in bad:
        raw.send(b"\x09" * codec.HEADER_SIZE)  # protocol version 9: cannot be read on
    await DeferredList([raw.lost for raw in bad], fireOnOneErrback=True).addTimeout(5, reactor)
    closing = [e for e in log_events if e.get("log_format", "").startswith("closing")]
    assert len(closing) == limiter.burst < 30
    clock.advance(limiter.interval)
    [summary] = [e for e in log_events if e.get("log_format", "").startswith("... and") and e["kind"] == "closing"]
    assert summary["count"] == 30 - limiter.burst


@ensure
async def test_attack_unroutable_error_frames_cannot_flood_the_log(limited, log_events):
    server = limited()
    raw = await connect_raw(server)
    raw.send(register_frames(codec.ROLE_PROVIDER, os.urandom(16), os.urandom(16)))
    raw.send(b"".join(codec.encode_frame(codec.ERROR, os.urandom(16), bytes(32) + b"x") for _ in range(30)))
    await raw.wait_frames(30).addTimeout(5, reactor)  # each comes back to its sender
    lines = [e for e in log_events if e.get("log_format", "").startswith("returning unroutable")]
    assert len(lines) == server.factory.router.log_limiter.burst


@ensure
async def test_log_lines_repeat_at_most_a_bounded_part_of_a_peers_text(limited, log_events):
    server = limited(register_timeout=LONG)
    raw = await connect_raw(server)
    raw.send(codec.encode_header(codec.CHUNK, os.urandom(16), codec.MAX_PAYLOAD + 1))
    await raw.lost.addTimeout(5, reactor)
    [line] = [e for e in log_events if e.get("log_format", "").startswith("closing")]
    assert len(str(line["error"])) <= 300


def test_log_limiter_writes_a_burst_then_one_summary_per_interval():
    from pulsyflux.wire.ratelimit import LogLimiter

    clock = task.Clock()
    summaries = []
    limiter = LogLimiter(clock, lambda kind, count, seconds: summaries.append((kind, count, seconds)), 3, 10.0)
    assert [limiter.allow("closing") for _ in range(5)] == [True] * 3 + [False] * 2
    assert limiter.allow("other")  # kinds are counted apart
    clock.advance(9.9)
    assert summaries == [] and not limiter.allow("closing")
    clock.advance(0.1)
    assert summaries == [("closing", 3, 10.0)]
    assert limiter.allow("closing")  # a new interval
    assert clock.getDelayedCalls() == []  # no timer while nothing is suppressed


def test_decoder_counts_an_incomplete_frame_once_however_it_arrives():
    """The frame timeout's clock: a new number only when a new frame is cut."""
    frame = codec.encode_frame(codec.CHUNK, bytes(16), b"x" * 100)
    decoder = codec.FrameDecoder(with_header=True)
    seen = []
    for piece in (frame[:10], frame[10:20], frame[20:60], frame[60:]):  # half a header, then the body
        list(decoder.frames(piece))
        seen.append((decoder.partials, decoder.buffered))
    assert seen == [(1, 10), (1, 20), (1, 60), (1, 0)]
    list(decoder.frames(frame + frame[:5]))  # a whole frame, then the next one cut
    assert (decoder.partials, decoder.buffered) == (2, 5)
    list(decoder.frames(frame[5:] + frame))  # whole frames only: nothing counted
    assert (decoder.partials, decoder.buffered) == (2, 0)


# -- twistd: the limits as options ------------------------------------------------

LIMIT_OPTIONS = [
    "max-connections",
    "max-in-flight",
    "max-body",
    "max-partial-bytes",
    "max-unsent",
    "max-unsent-total",
    "frame-timeout",
    "register-timeout",
]


@pytest.mark.parametrize("option", LIMIT_OPTIONS)
@pytest.mark.parametrize("bad", ["0", "-1", "lots", "nan", ""])
def test_twistd_limit_options_refuse_bad_values_with_one_line(option, bad):
    from twisted.python import usage

    from pulsyflux.service import Options

    with pytest.raises(usage.UsageError, match=f"^--{option} must be .* greater than 0, not '{bad}'$"):
        Options().parseOptions([f"--{option}", bad])


@ensure
async def test_twistd_limit_options_reach_the_server(channel):
    from pulsyflux.service import Options, makeService

    options = Options()
    limits = {
        "max-connections": "7",
        "max-in-flight": "5",
        "max-body": "65536",
        "max-partial-bytes": "1000000",
        "max-unsent": "100000",
        "max-unsent-total": "2000000",
        "frame-timeout": "2.5",
        "register-timeout": "0.2",
    }
    args = ["--port", "tcp:0:interface=127.0.0.1", "--no-broker"]
    options.parseOptions(args + [part for name, value in limits.items() for part in (f"--{name}", value)])
    top = makeService(options)
    top.startService()
    try:
        router = top.factory.router
        assert (router.max_connections, router.max_in_flight, router.max_body) == (7, 5, 65536)
        assert (router.connection_guard.max_partial_bytes, router.connection_guard.frame_timeout) == (1000000, 2.5)
        assert (router.flow_control.max_unsent, router.flow_control.max_unsent_total) == (100000, 2000000)
        port = (await top.server.whenListening()).getHost().port
        idle = await connect_raw(SimpleNamespace(port=port))
        assert (await closed_with(idle)).startswith("register timeout: no START within 0.2 s")
    finally:
        await top.stopService()


def test_twistd_refuses_a_bad_limit_with_one_line(tmp_path):
    from .test_twistd import refused  # twistd's own option parsing, in this process

    line = refused(tmp_path, "--frame-timeout", "soon")
    assert line.endswith("--frame-timeout must be a number of seconds greater than 0, not 'soon'")


def test_guard_timer_fires_for_whichever_entry_is_due_first():
    """In memory, with a Clock: each close happens at its own deadline."""
    from twisted.internet.testing import StringTransport

    clock = task.Clock()
    factory = ServerFactory(clock, register_timeout=10, frame_timeout=1)

    def connect():
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        return proto

    idle = connect()  # due at 10
    clock.advance(0.5)
    stalled = connect()
    stalled.dataReceived(registered_raw_frames() + b"\x01\x05")  # half a header at 0.5: due at 1.5
    clock.advance(0.99)
    assert not stalled.transport.disconnecting
    clock.advance(0.01)
    assert stalled.transport.disconnecting and not idle.transport.disconnecting
    clock.advance(8.49)
    assert not idle.transport.disconnecting
    clock.advance(0.01)
    assert idle.transport.disconnecting
    assert factory.stats.errors == {"frame timeout": 1, "register timeout": 1}
    assert list(factory.stats.recent_errors) == [
        "frame timeout: a frame stayed incomplete for 1 s",
        "register timeout: no START within 10 s of connecting",
    ]


def test_shorten_cuts_and_escapes_like_printable() -> None:
    """A log line repeating a peer's text is one bounded line, whatever it sent."""
    from pulsyflux.wire.printable import printable
    from pulsyflux.wire.ratelimit import shorten

    assert shorten("fine") == "fine"
    assert shorten(ValueError("bad\n\x1b[2J")) == "bad\\n\\x1b[2J"
    line = shorten("x" * 1000 + "\r\n", 10)
    assert line == printable("x" * 1000 + "\r\n", 10) == "x" * 10 + "... (992 chars more)"
