"""FrameDecoder.frames(), and with_header=True for relays: the same frames under any split."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pulsyflux.wire import codec
from pulsyflux.wire.codec import FrameDecoder

frames_strategy = st.lists(
    st.tuples(
        st.sampled_from(sorted(codec.FRAME_TYPES)),
        st.binary(min_size=16, max_size=16),
        st.one_of(st.binary(max_size=80), st.integers(0, 300_000).map(lambda n: b"z" * n)),
    ),
    max_size=6,
)


def decode(decoder: FrameDecoder, stream: bytes, cuts: list[int]) -> list[tuple]:
    out, last = [], 0
    for point in sorted({min(c, len(stream)) for c in cuts}) + [len(stream)]:
        out.extend(decoder.frames(stream[last:point]))
        last = point
    return out


@given(frames_strategy, st.lists(st.integers(0, 1_000_000), max_size=12))
def test_whole_frames_and_payloads_survive_any_split(frames, cuts):
    encoded = [codec.encode_frame(ftype, rid, payload) for ftype, rid, payload in frames]
    stream = b"".join(encoded)
    payloads = decode(FrameDecoder(), stream, cuts)
    assert payloads == [(ftype, 0, rid, payload) for ftype, rid, payload in frames]
    whole = FrameDecoder(with_header=True)
    assert decode(whole, stream, cuts) == [(ftype, 0, rid, raw) for (ftype, rid, _), raw in zip(frames, encoded)]
    assert whole.buffered == 0


def test_a_header_cut_short_is_held_and_counted():
    decoder = FrameDecoder()
    frame = codec.encode_frame(codec.CHUNK, bytes(16), b"abc")
    assert list(decoder.frames(frame[:10])) == [] and decoder.buffered == 10
    assert list(decoder.frames(frame[10:])) == [(codec.CHUNK, 0, bytes(16), b"abc")]
    assert decoder.buffered == 0
