"""The sans-I/O codec against the Go implementation's captured frames."""

from __future__ import annotations

import re
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pulsyflux.wire import codec
from pulsyflux.wire.codec import FrameDecoder
from pulsyflux.wire.errors import NoProviderError, ProtocolError, RemoteError, RequestTimeout, error_from_message

from .conftest import SHARED, WIRE_VECTORS

VECTORS = WIRE_VECTORS.read_text()


def hx(text: str) -> bytes:
    return bytes.fromhex(re.sub(r"\s+", "", text))


# Frames from wire-vectors.txt, written out whole (header + payload).
REG_START = hx(
    "01 04 0001 f7fbe2fdeb494b39a6a6e9b35ee4508e 00000029"
    "02 0000000000001388 64a1f90fee004ff3af0f538573d42d04 11111111222233334444555555555555"
)
REG_END = hx("01 06 0000 f7fbe2fdeb494b39a6a6e9b35ee4508e 00000000")
REQ_START = hx(
    "01 04 0000 4ba005b093ed40e29088a276aef99a00 00000029"
    "01 0000000000001388 e726f3c54362469e811e71a893c1eb8a 11111111222233334444555555555555"
)
REQ_CHUNK = hx("01 05 0000 4ba005b093ed40e29088a276aef99a00 00000005 68656c6c6f")
REQ_END = hx("01 06 0000 4ba005b093ed40e29088a276aef99a00 00000000")
FWD_START = hx(
    "01 04 0000 4ba005b093ed40e29088a276aef99a00 00000020"
    "e726f3c54362469e811e71a893c1eb8a 11111111222233334444555555555555"
)
RESP_START = hx(
    "01 07 0000 4ba005b093ed40e29088a276aef99a00 00000020"
    "e726f3c54362469e811e71a893c1eb8a 11111111222233334444555555555555"
)
RESP_CHUNK = hx("01 08 0000 4ba005b093ed40e29088a276aef99a00 0000000a 6563686f3a68656c6c6f")
RESP_END = hx("01 09 0000 4ba005b093ed40e29088a276aef99a00 00000000")
PROVIDER_ERROR = hx(
    "01 03 0000 07c4d5d632f54f838cb797fc099519a5 0000002e"
    "c38692c5b97e490488e9a8909f4172af 11111111222233334444555555555555 70726f7669646572206572726f72"
)
GO_NO_PROVIDER = hx("01 03 0000 e3c56d9ced924e6c9532b3d55df50316 00000010 70656572206469736170706561726564")

CHANNEL = bytes.fromhex("11111111222233334444555555555555")


@pytest.mark.skipif(not (SHARED / "wire-vectors.txt").exists(), reason="no shared/ beside the checkout")
def test_repo_copy_of_wire_vectors_matches_shared():
    assert WIRE_VECTORS.read_text() == (SHARED / "wire-vectors.txt").read_text()


def test_vectors_in_this_file_match_the_go_capture():
    flat = re.sub(r"\s+", "", VECTORS).lower()
    for frame in (
        REG_END,
        REQ_START,
        REQ_CHUNK,
        REQ_END,
        FWD_START,
        RESP_CHUNK,
        RESP_END,
        PROVIDER_ERROR,
        GO_NO_PROVIDER,
    ):
        assert frame[:24].hex() in flat
        assert frame[24:].hex() in flat


def test_registration_frames_encode_byte_for_byte():
    request_id = bytes.fromhex("f7fbe2fdeb494b39a6a6e9b35ee4508e")
    meta = codec.pack_metadata(codec.ROLE_PROVIDER, 5000, bytes.fromhex("64a1f90fee004ff3af0f538573d42d04"), CHANNEL)
    assert codec.encode_frame(codec.START, request_id, meta, codec.FLAG_REGISTRATION) == REG_START
    assert codec.encode_frame(codec.END, request_id) == REG_END


def test_request_frames_decode_from_go_capture():
    frames = list(FrameDecoder().feed(REQ_START + REQ_CHUNK + REQ_END))
    assert [f.type for f in frames] == [codec.START, codec.CHUNK, codec.END]
    meta = codec.unpack_metadata(frames[0].payload)
    assert meta.role == codec.ROLE_CONSUMER and meta.timeout_ms == 5000
    assert meta.client_id.hex() == "e726f3c54362469e811e71a893c1eb8a" and meta.channel_id == CHANNEL
    assert frames[1].payload == b"hello"
    assert [f.encode() for f in frames] == [REQ_START, REQ_CHUNK, REQ_END]


def test_forwarded_start_and_response_routing():
    start = next(FrameDecoder().feed(FWD_START))
    request = next(FrameDecoder().feed(REQ_START))
    # The server forwards the metadata's last 32 bytes (client id, channel id) as the routing.
    assert start.payload == request.payload[codec.METADATA_ROUTING_OFFSET :]
    assert REQ_START[codec.START_ROUTING_OFFSET :] == start.payload and len(REQ_START) == codec.START_FRAME_SIZE
    assert codec.encode_frame(codec.START, start.request_id, start.payload) == FWD_START
    frames = list(FrameDecoder().feed(RESP_START + RESP_CHUNK + RESP_END))
    assert frames[0].payload == start.payload and frames[1].payload == b"echo:hello"


def _written(encoder, *args) -> list:
    pieces: list = []
    encoder(pieces.append, *args)
    return pieces


def test_the_client_encoders_write_what_go_writes():
    registration = next(FrameDecoder().feed(REG_START))
    meta = codec.unpack_metadata(registration.payload)
    assert (
        codec.encode_registration(meta.role, meta.client_id, meta.channel_id, registration.request_id)
        == REG_START + REG_END
    )
    start = next(FrameDecoder().feed(REQ_START))
    meta = codec.unpack_metadata(start.payload)
    [request] = _written(
        codec.write_request, start.request_id, meta.timeout_ms, meta.client_id, meta.channel_id, b"hello"
    )
    assert request == REQ_START + REQ_CHUNK + REQ_END
    routing = next(FrameDecoder().feed(FWD_START)).payload
    [response] = _written(
        codec.write_response, next(FrameDecoder().feed(RESP_START)).request_id, routing, b"echo:hello"
    )
    assert response == RESP_START + RESP_CHUNK + RESP_END


@pytest.mark.parametrize("size", [0, 1, codec.JOIN_LIMIT, codec.JOIN_LIMIT + 1, codec.MAX_PAYLOAD + 5])
def test_the_client_encoders_join_small_payloads_and_never_copy_large_ones(size):
    payload = bytes(size)
    rid, client, channel = bytes(range(16)), bytes(16), bytes([7]) * 16
    pieces = _written(codec.write_request, rid, 250, client, channel, payload)
    expected = (
        codec.encode_frame(codec.START, rid, codec.pack_metadata(codec.ROLE_CONSUMER, 250, client, channel))
        + b"".join(codec.chunk_frames(codec.CHUNK, rid, payload))
        + codec.encode_frame(codec.END, rid)
    )
    assert b"".join(pieces) == expected
    assert len(pieces) == (1 if size <= codec.JOIN_LIMIT else 2 + len(codec.chunk_frames(codec.CHUNK, rid, payload)))
    routing = client + channel
    pieces = _written(codec.write_response, rid, routing, payload)
    expected = (
        codec.encode_frame(codec.RESPONSE_START, rid, routing)
        + b"".join(codec.chunk_frames(codec.RESPONSE_CHUNK, rid, payload))
        + codec.encode_frame(codec.RESPONSE_END, rid)
    )
    assert b"".join(pieces) == expected
    assert len(pieces) == 1 if size <= codec.JOIN_LIMIT else len(pieces) > 2


def test_error_prefix_rule_reads_provider_and_bare_go_errors():
    provider_error = next(FrameDecoder().feed(PROVIDER_ERROR))
    assert codec.error_message(provider_error.payload) == "provider error"
    go_error = next(FrameDecoder().feed(GO_NO_PROVIDER))
    assert codec.error_message(go_error.payload) == "peer disappeared"
    ours = codec.error_payload("peer disappeared")
    assert len(ours) == 32 + 16 and codec.error_message(ours) == "peer disappeared"


def test_error_types():
    assert isinstance(error_from_message("peer disappeared"), NoProviderError)
    assert isinstance(error_from_message("request timed out"), RequestTimeout)
    remote = error_from_message("provider error")
    assert isinstance(remote, RemoteError) and remote.message == "provider error"


def test_chunking_matches_go_sizes():
    data = bytes(2_100_000)
    pieces = codec.chunk_frames(codec.CHUNK, bytes(16), data)
    frames = list(FrameDecoder().feed(b"".join(pieces)))
    assert [len(f.payload) for f in frames] == [1048576, 1048576, 2848]
    assert codec.chunk_frames(codec.CHUNK, bytes(16), b"") == []


def test_bad_metadata_is_reported_with_the_go_message():
    with pytest.raises(codec.MetadataError) as info:
        codec.unpack_metadata(b"short")
    assert info.value.wire_message == "invalid start frame payload length"
    with pytest.raises(codec.MetadataError) as info:
        codec.unpack_metadata(codec.pack_metadata(3, 1, bytes(16), bytes(16)))
    assert info.value.wire_message == "invalid client role"


def test_bad_version_and_oversized_length_break_the_decoder():
    decoder = FrameDecoder()
    seen = []
    with pytest.raises(ProtocolError, match="version 2"):
        for frame in decoder.feed(REQ_END + b"\x02" + REQ_END[1:]):
            seen.append(frame)
    assert [f.type for f in seen] == [codec.END]  # frames before the bad header still arrive
    with pytest.raises(ProtocolError):
        list(decoder.feed(REQ_END))  # and the decoder stays broken
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError, match="exceeds"):
        list(decoder.feed(codec.HEADER.pack(1, codec.CHUNK, 0, bytes(16), (1 << 20) + 1)))


def test_frame_split_at_every_byte():
    stream = REQ_START + REQ_CHUNK + REQ_END + RESP_START + RESP_CHUNK + RESP_END
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        frames = list(decoder.feed(stream[:cut])) + list(decoder.feed(stream[cut:]))
        assert b"".join(f.encode() for f in frames) == stream
        assert decoder.buffered == 0


frame_strategy = st.builds(
    lambda t, flags, rid, payload: codec.Frame(t, flags, rid, payload),
    st.sampled_from(sorted(codec.FRAME_TYPES)),
    st.integers(0, 0xFFFF),
    st.binary(min_size=16, max_size=16),
    st.binary(max_size=300),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(frame_strategy, max_size=20), st.lists(st.integers(0, 10_000), max_size=10))
def test_roundtrip_under_random_splits(frames, cuts):
    stream = b"".join(f.encode() for f in frames)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    decoder = FrameDecoder()
    out = []
    last = 0
    for point in points + [len(stream)]:
        out.extend(decoder.feed(stream[last:point]))
        last = point
    assert out == frames


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=10))
def test_garbage_raises_only_protocol_error(chunks):
    decoder = FrameDecoder(max_payload=1 << 20)
    try:
        for chunk in chunks:
            for frame in decoder.feed(chunk):
                assert frame.type in range(256)
    except ProtocolError:
        pass


def test_uuid_bytes_are_rfc4122_order():
    u = uuid.UUID("11111111-2222-3333-4444-555555555555")
    assert u.bytes == CHANNEL
