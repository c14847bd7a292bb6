"""Bytes <-> frames for pulsyflux wire protocol version 1 (docs/protocol.md).

Sans-I/O: nothing here touches a socket or imports Twisted, so the server,
the clients, the fuzzers and the benchmarks all share one codec.

    >>> decoder = FrameDecoder()
    >>> [f.type for f in decoder.feed(encode_frame(END, b"\\0" * 16))]
    [6]
"""

from __future__ import annotations

import struct
from typing import Callable, Iterator, NamedTuple

from . import errors as _errors
from .errors import ProtocolError

VERSION = 1
HEADER = struct.Struct(">BBH16sI")
HEADER_SIZE = HEADER.size  # 24
MAX_PAYLOAD = 1 << 20  # 1 MiB: the largest payload one frame may carry

# Frame types.
RESPONSE = 0x02
ERROR = 0x03
START = 0x04
CHUNK = 0x05
END = 0x06
RESPONSE_START = 0x07
RESPONSE_CHUNK = 0x08
RESPONSE_END = 0x09
FRAME_TYPES = frozenset(range(RESPONSE, RESPONSE_END + 1))
# Not a protocol type: every server (Go's and ours) answers an unknown type
# with an ERROR on the same request id, in order. A client sends PROBE right
# after registering to learn that the server has processed its registration.
PROBE = 0x00
# Not a Go type either: a client presents (or refreshes) its token in an AUTH frame, payload the
# token; a server with --auth answers AUTH (JSON: subject, expires) or ERROR ``permission denied: ...``
# on the same id, one without answers ``invalid message type`` (docs/protocol.md, "Tokens").
AUTH = 0x0A

FLAG_REGISTRATION = 0x0001

ROLE_CONSUMER = 0x01
ROLE_PROVIDER = 0x02

# A START's payload from a client (its metadata): role, timeout in ms, client
# id, channel id. The last 32 bytes are the request's routing, which the
# server forwards to the provider as the START payload it sends.
METADATA = struct.Struct(">BQ16s16s")
METADATA_SIZE = METADATA.size  # 41
ROUTING_SIZE = 32
METADATA_ROUTING_OFFSET = METADATA_SIZE - ROUTING_SIZE  # 9: where the routing starts in the metadata
# A whole START frame from a client: its header, then its metadata.
START_FRAME = struct.Struct(HEADER.format + METADATA.format[1:])
START_FRAME_SIZE = START_FRAME.size  # 65
START_ROUTING_OFFSET = HEADER_SIZE + METADATA_ROUTING_OFFSET  # where the routing starts in a START frame
# A START frame and the header of the CHUNK after it: a small request in one pack.
_START_AND_CHUNK = struct.Struct(START_FRAME.format + HEADER.format[1:])
# A RESPONSE_START with its routing and the header of the RESPONSE_CHUNK after it: a small response in one pack.
_RESPONSE_START_AND_CHUNK = struct.Struct(HEADER.format + f"{ROUTING_SIZE}s" + HEADER.format[1:])
# Payloads up to this size are copied to join their frames into one write;
# larger ones are written as they are (copying a megabyte costs more than a
# second write). The client, the provider and the writer all use it.
JOIN_LIMIT = 64 * 1024
# Up to this size ``head + payload + tail`` costs no more than a join; past it
# the chain's second copy of the payload does (callgrind: 1 KB 14% more, 16 KB twice).
_PLUS_LIMIT = 512
_join = b"".join
ZERO_ROUTING = bytes(ROUTING_SIZE)
DEFAULT_TIMEOUT_MS = 5000

# The longest error message (UTF-8 bytes) an ERROR frame carries: an error of
# any size fits one frame, so answering with it never costs a connection.
MAX_ERROR_TEXT = 4096


_pack_header = HEADER.pack
_unpack_header_from = HEADER.unpack_from
_pack_start = START_FRAME.pack
_pack_start_and_chunk = _START_AND_CHUNK.pack
_pack_response_start_and_chunk = _RESPONSE_START_AND_CHUNK.pack


class Frame(NamedTuple):
    """One decoded frame; ``request_id`` is 16 raw bytes."""

    type: int
    flags: int
    request_id: bytes
    payload: bytes

    def encode(self) -> bytes:
        return _pack_header(VERSION, self.type, self.flags, self.request_id, len(self.payload)) + self.payload


class Metadata(NamedTuple):
    """The 41-byte START payload a client sends to the server."""

    role: int
    timeout_ms: int
    client_id: bytes
    channel_id: bytes


def encode_frame(ftype: int, request_id: bytes, payload: bytes = b"", flags: int = 0) -> bytes:
    """Header + payload as one bytes object; the payload must be <= 1 MiB."""
    return _pack_header(VERSION, ftype, flags, request_id, len(payload)) + payload


def encode_header(ftype: int, request_id: bytes, length: int, flags: int = 0) -> bytes:
    """Only the 24-byte header, for writers that send the payload separately."""
    return _pack_header(VERSION, ftype, flags, request_id, length)


def encode_registration(role: int, client_id: bytes, channel_id: bytes, request_id: bytes) -> bytes:
    """The START (flagged registration only) and END a client sends first on a connection."""
    return START_FRAME.pack(
        VERSION, START, FLAG_REGISTRATION, request_id, METADATA_SIZE, role, DEFAULT_TIMEOUT_MS, client_id, channel_id
    ) + _pack_header(VERSION, END, 0, request_id, 0)


def write_request(
    write: Callable[[bytes], object],
    request_id: bytes,
    timeout_ms: int,
    client_id: bytes,
    channel_id: bytes,
    payload: bytes,
) -> None:
    """Hand a consumer's whole request (START, CHUNKs, END) to ``write``, in order.

    A payload up to :data:`JOIN_LIMIT` is one call (one pack, one join: the
    hot path); a larger one is written piece by piece, never copied.
    ``write`` is any callable (a transport's, a list's ``append``): no I/O here.
    """
    size = len(payload)
    tail = _pack_header(VERSION, END, 0, request_id, 0)
    if 0 < size <= JOIN_LIMIT:
        head = _pack_start_and_chunk(
            VERSION, START, 0, request_id, METADATA_SIZE, ROLE_CONSUMER, timeout_ms, client_id, channel_id,
            VERSION, CHUNK, 0, request_id, size,
        )  # fmt: skip
        write(head + payload + tail if size <= _PLUS_LIMIT else _join((head, payload, tail)))
        return
    head = _pack_start(VERSION, START, 0, request_id, METADATA_SIZE, ROLE_CONSUMER, timeout_ms, client_id, channel_id)
    if not size:
        write(head + tail)
        return
    _write_pieces(write, head, CHUNK, request_id, payload, tail)


def write_response(write: Callable[[bytes], object], request_id: bytes, routing: bytes, payload: bytes) -> None:
    """Hand a provider's whole response (RESPONSE_START with ``routing``, chunks, RESPONSE_END) to ``write``.

    One call up to :data:`JOIN_LIMIT` (one pack for the headers before the
    payload: the hot path), pieces past it (as :func:`write_request`).
    ``routing`` is the ROUTING_SIZE bytes its START carried.
    """
    tail = _pack_header(VERSION, RESPONSE_END, 0, request_id, 0)
    size = len(payload)
    if 0 < size <= JOIN_LIMIT:
        head = _pack_response_start_and_chunk(
            VERSION, RESPONSE_START, 0, request_id, ROUTING_SIZE, routing,
            VERSION, RESPONSE_CHUNK, 0, request_id, size,
        )  # fmt: skip
        write(head + payload + tail if size <= _PLUS_LIMIT else _join((head, payload, tail)))
        return
    head = _pack_header(VERSION, RESPONSE_START, 0, request_id, ROUTING_SIZE) + routing
    if not size:
        write(head + tail)
        return
    _write_pieces(write, head, RESPONSE_CHUNK, request_id, payload, tail)


def _write_pieces(
    write: Callable[[bytes], object], head: bytes, ftype: int, request_id: bytes, payload: bytes, tail: bytes
) -> None:
    """A large message piece by piece: its head, its chunks (the payload never copied to join), its tail."""
    write(head)
    for piece in chunk_frames(ftype, request_id, bytes(payload)):
        write(piece)
    write(tail)


def pack_metadata(role: int, timeout_ms: int, client_id: bytes, channel_id: bytes) -> bytes:
    return METADATA.pack(role, timeout_ms, client_id, channel_id)


class MetadataError(ProtocolError):
    """A START payload the server must answer with an ERROR (section 5)."""

    def __init__(self, wire_message: str) -> None:
        super().__init__(wire_message)
        self.wire_message = wire_message


def unpack_metadata(payload: bytes) -> Metadata:
    """Parse and check a START payload; raises :class:`MetadataError`."""
    if len(payload) != METADATA_SIZE:
        raise MetadataError(_errors.MSG_BAD_START_LENGTH)
    meta = Metadata._make(METADATA.unpack(payload))
    if meta.role != ROLE_CONSUMER and meta.role != ROLE_PROVIDER:
        raise MetadataError(_errors.MSG_BAD_ROLE)
    return meta


def bound_error_text(message: str, limit: int = MAX_ERROR_TEXT) -> bytes:
    """``message`` as UTF-8 of at most ``limit`` bytes, cut on a character and marked when cut.

    Error texts come from handlers and peers and can be of any size; a frame
    cannot (1 MiB). A cut text ends with ``... [truncated, N bytes]``, N
    being the whole text's size, so a reader knows it saw only the start.

        >>> bound_error_text("x" * 5000, 40)
        b'xxxxxxxxxxxxx... [truncated, 5000 bytes]'
    """
    data = message.encode("utf-8", "replace")  # a lone surrogate becomes "?", not an exception
    if len(data) <= limit:
        return data
    marker = f"... [truncated, {len(data)} bytes]".encode("ascii")
    keep = max(limit - len(marker), 0)
    # errors="ignore" drops the partial character a byte cut may leave at the end.
    return data[:keep].decode("utf-8", "ignore").encode("utf-8") + marker


def error_payload(message: str, routing: bytes = ZERO_ROUTING) -> bytes:
    """An ERROR payload every client reads correctly: 32 bytes first, then the bounded message."""
    return routing + bound_error_text(message)


def error_message(payload: bytes) -> str:
    """Read an ERROR payload the way Go clients do: skip 32 bytes when there are."""
    text = payload[ROUTING_SIZE:] if len(payload) >= ROUTING_SIZE else payload
    return text.decode("utf-8", "replace")


def chunk_frames(ftype: int, request_id: bytes, data: bytes, max_chunk: int = MAX_PAYLOAD) -> list[bytes]:
    """Split ``data`` into frames of at most ``max_chunk`` payload bytes.

    Returns header and payload pieces alternately, ready for
    ``transport.writeSequence`` without copying large payloads. Empty data
    gives no frame at all, as the Go clients do.
    """
    pieces: list[bytes] = []
    if len(data) <= max_chunk:
        if data:
            pieces.append(_pack_header(VERSION, ftype, 0, request_id, len(data)))
            pieces.append(data)
        return pieces
    for offset in range(0, len(data), max_chunk):
        part = data[offset : offset + max_chunk]
        pieces.append(_pack_header(VERSION, ftype, 0, request_id, len(part)))
        pieces.append(part)
    return pieces


class FrameDecoder:
    """Incremental decoder: feed it any slices of the stream, get whole frames.

    A bad version or a length over the limit cannot be resynchronised, so the
    decoder raises :class:`ProtocolError` and stays broken: the caller drops
    the connection. Frames completed before the bad header are still yielded.

    ``with_header=True`` makes :meth:`frames` yield each whole frame, header
    included, in place of its payload: a relay forwards it without
    re-encoding. A large frame is joined once from the slices that carried it.
    """

    # __weakref__: tests check a closed connection's partial frame is freed at once.
    __slots__ = (
        "_head",
        "_pending",
        "_parts",
        "_held",
        "max_payload",
        "with_header",
        "broken",
        "partials",
        "__weakref__",
    )

    def __init__(self, max_payload: int = MAX_PAYLOAD, with_header: bool = False) -> None:
        self._head = b""  # the start of a header cut by the end of a slice
        self._pending: tuple[int, int, bytes, int] | None = None  # type, flags, id, size of a frame still arriving
        self._parts: list[bytes] = []  # the bytes of that frame so far
        self._held = 0
        self.max_payload = max_payload
        self.with_header = with_header
        self.broken: ProtocolError | None = None
        # Frames that were left incomplete at the end of a slice so far: a
        # server watching ``buffered`` tells a new incomplete frame from the
        # same one still arriving (its frame timeout). Never touched while
        # every slice ends on a frame boundary.
        self.partials = 0

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._head) + self._held

    def feed(self, data: bytes) -> Iterator[Frame]:
        """Yield every frame completed by ``data``, as :class:`Frame` tuples."""
        for frame in self.frames(data):
            yield Frame._make(frame)

    def frames(self, data: bytes) -> Iterator[tuple[int, int, bytes, bytes]]:
        """Yield ``(type, flags, request id, payload)`` for every frame ``data`` completes (the hot path)."""
        if self.broken is not None:
            raise self.broken
        offset = 0
        end = len(data)
        carried = False  # the frame cut at the end of the last slice goes on in this one
        if self._pending is not None:
            ftype, flags, request_id, size = self._pending
            missing = size - self._held
            if end < missing:
                self._parts.append(data)
                self._held += end
                return
            parts = self._parts
            parts.append(data[:missing] if missing < end else data)
            self._pending, self._parts, self._held = None, [], 0
            yield ftype, flags, request_id, b"".join(parts)
            offset = missing
        elif self._head:
            data = self._head + data
            self._head = b""
            end = len(data)
            carried = True
        skip = 0 if self.with_header else HEADER_SIZE
        max_payload = self.max_payload
        unpack = _unpack_header_from
        while end - offset >= HEADER_SIZE:
            version, ftype, flags, request_id, length = unpack(data, offset)
            if version != VERSION:
                self._break(f"unsupported protocol version {version}")
            if length > max_payload:
                self._break(f"frame payload of {length} bytes exceeds the {max_payload}-byte limit")
            stop = offset + HEADER_SIZE + length
            if stop > end:  # the rest of this frame comes in later slices
                part = data[offset + skip :]
                self._pending = (ftype, flags, request_id, stop - offset - skip)
                self._parts = [part]
                self._held = len(part)
                if offset or not carried:
                    self.partials += 1
                return
            yield ftype, flags, request_id, data[offset + skip : stop]
            offset = stop
        if offset < end:
            self._head = data[offset:]
            if offset or not carried:
                self.partials += 1

    def _break(self, reason: str) -> None:
        self.broken = ProtocolError(reason)
        self._head, self._pending, self._parts, self._held = b"", None, [], 0
        raise self.broken
