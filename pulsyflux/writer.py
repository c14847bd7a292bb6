"""How bytes leave a connection: at once when the socket can take them, coalesced per read.

Twisted's ``transport.write`` buffers the bytes and asks the reactor to watch
the socket; they leave on the next loop iteration, and the socket is unwatched
again after. For a router that forwards one small frame and then waits, that
is two ``epoll_ctl`` calls and a whole extra reactor turn per hop: more than
the routing itself. When nothing is buffered, the kernel can usually take
the bytes right away: send them, and give ``transport.write`` only what the
kernel did not take, so ordering, producers (flow control), closing and error
reporting all stay Twisted's. :class:`ImmediateWriter` adds holding the writes
made while one read is handled, so they leave as one send.

    write = immediate_writer(transport)
    write(frame)
"""

from __future__ import annotations

from typing import Callable

from ._twisted_compat import immediate_send
from ._types import IStreamTransport
from .wire.codec import JOIN_LIMIT

__all__ = ["immediate_writer", "ImmediateWriter", "coalesce", "hang_up"]

# Pieces larger than JOIN_LIMIT (codec's) are written on their own, never copied to be joined.


def coalesce(pieces: list[bytes]) -> list[bytes]:
    """``pieces`` as few writes: runs of small pieces joined, large ones left alone."""
    if len(pieces) == 1 or max(map(len, pieces)) <= JOIN_LIMIT:
        return [pieces[0] if len(pieces) == 1 else b"".join(pieces)]
    writes: list[bytes] = []
    run: list[bytes] = []
    for piece in pieces:
        if len(piece) <= JOIN_LIMIT:
            run.append(piece)
            continue
        if run:
            writes.append(b"".join(run))
            run = []
        writes.append(piece)
    if run:
        writes.append(b"".join(run))
    return writes


def immediate_writer(transport: IStreamTransport) -> Callable[[bytes], None]:
    """A ``write`` for ``transport`` that sends at once when it safely can.

    Only plain TCP and UNIX transports qualify (TLS must encrypt first);
    anything else gets ``transport.write`` itself. How it is done reads
    Twisted privates: see :func:`pulsyflux._twisted_compat.immediate_send`.
    """
    return immediate_send(transport) or transport.write


class ImmediateWriter:
    """Sends each write at once, except between :meth:`hold` and :meth:`release`.

    A client holds its writes while it handles one read, so the answers to a
    batch of frames leave in one send instead of one send each.
    """

    __slots__ = ("_write_now", "_held")

    def __init__(self, transport: IStreamTransport) -> None:
        self._write_now = immediate_writer(transport)
        self._held: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is None:
            self._write_now(data)
        else:
            held.append(data)

    @property
    def waiting(self) -> bool:
        """Writes are held and some wait: whatever left another way now would overtake them."""
        return bool(self._held)

    @property
    def holding(self) -> bool:
        """Between :meth:`hold` and :meth:`release`: its client is handling a read."""
        return self._held is not None

    def hold(self) -> None:
        if self._held is None:
            self._held = []

    def release(self) -> None:
        held, self._held = self._held, None
        if held:
            if len(held) == 1:  # one answer to one read (a request, a response): no call, no list
                self._write_now(held[0])
            else:
                for data in coalesce(held):
                    self._write_now(data)


def hang_up(transport: IStreamTransport) -> None:
    """Close after what was written, even over TLS with a producer registered.

    Twisted's TLS transport postpones its close until the producer (a
    server connection's flow control) is unregistered: a refused TLS client
    would read its ERROR and then wait on an open line (its request timing
    out instead of failing with the refusal), a timed-out, cut or shut-down
    one until an abort timer. Plain TCP closes either way. Every close the
    server decides goes through here (tests/test_attack_tls_close.py).
    """
    unregister = getattr(transport, "unregisterProducer", None)
    if unregister is not None:
        unregister()
    transport.loseConnection()
