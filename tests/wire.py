"""A raw wire-level client for tests: speaks frames by hand, like a Go client
or a hostile one would, and lets a test await the frames it receives."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from pulsyflux.wire import codec
from pulsyflux.wire.codec import FrameDecoder


class RawClient(Protocol):
    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self.frames: list[codec.Frame] = []
        self.raw = b""
        self._waiters: list[tuple[int, Deferred]] = []
        self.lost: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        self.frames.extend(self.decoder.feed(data))
        for count, d in list(self._waiters):
            if len(self.frames) >= count:
                self._waiters.remove((count, d))
                d.callback(self.frames[:count])

    def connectionLost(self, reason=None) -> None:
        self.lost.callback(None)
        for _, d in self._waiters:
            d.errback(reason)
        self._waiters = []

    def send(self, *frames: bytes) -> None:
        self.transport.write(b"".join(frames))

    def wait_frames(self, count: int) -> Deferred:
        """Fires with the first ``count`` frames received since connecting."""
        if len(self.frames) >= count:
            d = Deferred()
            d.callback(self.frames[:count])
            return d
        d = Deferred()
        self._waiters.append((count, d))
        return d


def connect_raw(server) -> Deferred:
    return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server.port), RawClient())


def register_frames(role: int, client_id: bytes, channel: bytes, request_id: bytes | None = None) -> bytes:
    request_id = request_id or bytes(range(16))
    meta = codec.pack_metadata(role, 5000, client_id, channel)
    return codec.encode_frame(codec.START, request_id, meta, codec.FLAG_REGISTRATION) + codec.encode_frame(
        codec.END, request_id
    )


def request_frames(request_id: bytes, client_id: bytes, channel: bytes, body: bytes, timeout_ms: int = 5000) -> bytes:
    meta = codec.pack_metadata(codec.ROLE_CONSUMER, timeout_ms, client_id, channel)
    out = codec.encode_frame(codec.START, request_id, meta)
    out += b"".join(codec.chunk_frames(codec.CHUNK, request_id, body))
    return out + codec.encode_frame(codec.END, request_id)
