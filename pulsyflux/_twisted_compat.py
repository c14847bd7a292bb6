"""Every use of a Twisted private attribute, each behind one small function.

Twisted does not promise these names; pulsyflux needs them for speed (the
immediate send), for a clean exit status, for closing what Twisted keeps
behind a proxy, and to refuse an out-of-range port before listening. Keeping
each one here means one place to look when Twisted changes, and
tests/test_twisted_compat.py fails loudly when it does (the range of Twisted
versions tested is pinned in setup.cfg).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.abstract import FileDescriptor

__all__ = [
    "immediate_send",
    "immediate_send_pieces",
    "unsent_bytes",
    "exit_signal",
    "tls_handshake_pending",
    "http_channel_transport",
    "server_endpoint_port",
]


def _sendable(transport: object) -> Any:
    """``transport`` if it is a plain TCP or UNIX transport whose socket may be written at once, else None.

    A TLS wrapper (tls:/ssl: endpoints) forwards attribute lookups to the TCP
    transport under it, socket included: only a FileDescriptor itself qualifies.
    """
    if not isinstance(transport, FileDescriptor):
        return None
    sock = getattr(transport, "socket", None)
    if sock is None or getattr(transport, "TLS", True) or not hasattr(transport, "_tempDataBuffer"):
        return None
    return transport  # tcp.Connection / unix.Server: the attributes read below are theirs, not FileDescriptor's


def immediate_send(transport: object) -> Optional[Callable[[bytes], None]]:
    """A ``write`` that hands bytes to the kernel at once, or None if ``transport`` does not allow it.

    Only a plain TCP or UNIX transport (a :class:`FileDescriptor` with a
    socket, not TLS) qualifies. The bytes go straight to the socket only when
    Twisted holds none (``dataBuffer`` and the private ``_tempDataBuffer``),
    is not closing, and was not aborted (the private ``_aborting``: an abort
    drops what is not yet sent, so must we); otherwise, and for what the
    kernel did not take, ``transport.write`` keeps Twisted's ordering,
    producers and error reporting. The attributes are read on every write
    (a hot path), so they are read inline here, not through more calls.
    """
    fd = _sendable(transport)
    if fd is None:
        return None
    buffered_write = fd.write
    send = fd.socket.send

    def write(data: bytes) -> None:
        if fd.dataBuffer or fd._tempDataBuffer or fd.disconnecting or fd._aborting or not fd.connected:
            buffered_write(data)
            return
        try:
            sent = send(data)
        except OSError:
            sent = 0  # full, or the connection is going: Twisted finds out and reports it
        if sent < len(data):
            buffered_write(data[sent:] if sent else data)

    return write


def immediate_send_pieces(transport: object) -> Optional[Callable[[list[bytes]], None]]:
    """As :func:`immediate_send`, for bytes given as a few pieces: one ``sendmsg`` (a gather write) hands
    them to the kernel without joining them first; what it did not take goes to ``transport.write``.

    Joining a large piece costs PyPy five times what it costs CPython (a
    16 KB forward: 2 us against 0.4, its allocation more than its copy).
    None where :func:`immediate_send` gives None, or the socket has no ``sendmsg``.
    """
    fd = _sendable(transport)
    if fd is None or not hasattr(fd.socket, "sendmsg"):
        return None
    buffered_write = fd.write
    sendmsg = fd.socket.sendmsg

    def write_pieces(pieces: list[bytes]) -> None:
        if fd.dataBuffer or fd._tempDataBuffer or fd.disconnecting or fd._aborting or not fd.connected:
            buffered_write(b"".join(pieces))
            return
        size = sum(map(len, pieces))
        try:
            sent = sendmsg(pieces)
        except OSError:
            sent = 0  # as write: Twisted finds out
        if sent < size:
            for piece in pieces:  # what is left, piece by piece (Twisted keeps them in order, none joined)
                if sent >= len(piece):
                    sent -= len(piece)
                    continue
                buffered_write(piece[sent:] if sent else piece)
                sent = 0

    return write_pieces


def unsent_bytes(transport: Any) -> int:
    """Bytes a TCP transport holds that the kernel has not taken yet (what a peer left unread piles up as).

    For tests and diagnostics of flow control: Twisted keeps them in
    ``dataBuffer`` past ``offset``, and in the private ``_tempDataBuffer``
    (counted by the private ``_tempDataLen``) until its next write loop.
    """
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen  # type: ignore[no-any-return]


def exit_signal(reactor: object) -> Optional[int]:
    """The signal that stopped ``reactor.run()`` (SIGINT, SIGTERM...), or None.

    Twisted records it as the private ``_exitSignal`` (see its
    ``_ISupportsExitSignalCapturing``), as twistd does to exit with ``128 + n``.
    """
    signum = getattr(reactor, "_exitSignal", None)
    return None if signum is None else int(signum)


def tls_handshake_pending(transport: object) -> bool:
    """True for a TLS transport (Twisted's ``TLSMemoryBIOProtocol``) whose handshake has not finished.

    No ERROR can reach such a peer, and a clean close would wait for the
    handshake: it must be aborted. Any other transport: False.
    """
    return getattr(transport, "_handshakeDone", True) is False


def http_channel_transport(proto: Any) -> Any:
    """The transport of a protocol built by a ``twisted.web`` Site.

    The Site wraps each ``HTTPChannel`` in a proxy (the private
    ``_GenericHTTPChannelProtocol``) that has no ``transport`` of its own; the
    channel behind it (the private ``_channel``) does.
    """
    return getattr(proto, "transport", None) or proto._channel.transport


def server_endpoint_port(endpoint: object) -> Optional[int]:
    """The port number a TCP server endpoint will listen on (the private ``_port``), or None for any other kind.

    Twisted's ``serverFromString`` accepts a port out of 0-65535 and fails
    only when listening; reading it back lets a bad option be refused before
    anything starts.
    """
    port = getattr(endpoint, "_port", None)
    return port if isinstance(port, int) else None
