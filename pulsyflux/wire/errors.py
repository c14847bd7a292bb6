"""Exceptions a pulsyflux user can catch by type.

Kept free of Twisted so the sans-I/O codec can raise them too.

    try:
        reply = await consumer.send(b"hi")
    except NoProviderError:
        ...
"""

from __future__ import annotations

__all__ = [
    "PulsyfluxError",
    "ProtocolError",
    "NoProviderError",
    "RemoteError",
    "RequestTimeout",
    "ConnectionLostError",
    "ServerOverloaded",
    "PermissionDenied",
    "error_from_message",
    "error_kind",
    "permission_denied",
]


class PulsyfluxError(Exception):
    """Base class of every error pulsyflux raises on purpose."""


class ProtocolError(PulsyfluxError):
    """Bytes that do not follow the wire protocol (ours or the peer's)."""


class NoProviderError(PulsyfluxError):
    """No provider is registered on the channel, or it vanished mid-request.

    The server says ``peer disappeared``.
    """


class RemoteError(PulsyfluxError):
    """The provider answered with an error; ``message`` is its text."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RequestTimeout(PulsyfluxError, TimeoutError):
    """The request's timeout passed before its response arrived."""


class ConnectionLostError(PulsyfluxError, ConnectionError):
    """The connection to the server closed while the call was pending."""


class ServerOverloaded(PulsyfluxError):
    """The server refused the request because a limit was reached."""


class PermissionDenied(PulsyfluxError):
    """The server refused what this client tried, and closed its connection.

    ``channel reserved: ...``: a Provider registering on the channel of the
    broker the server runs itself. ``permission denied: ...``: a token the
    server does not accept, or one (or anonymous rights) without the right
    the client used (docs/security.md); a refused publish or subscribe fails
    only that call.
    """


# -- the server's error texts -------------------------------------------------
#
# One table: the server (server/router.py, guard.py, backpressure.py) and the clients
# write these texts, and error_from_message / error_kind read them, so writer
# and reader never disagree. The texts are wire bytes: Go clients and the Go
# server use the same ones (docs/protocol.md, Errors); never reword one.

MSG_PEER_DISAPPEARED = "peer disappeared"
MSG_TIMED_OUT = "request timed out"
MSG_OVERLOADED = "server overloaded"
MSG_BAD_START_LENGTH = "invalid start frame payload length"
MSG_BAD_ROLE = "invalid client role"
MSG_BAD_TYPE = "invalid message type"
MSG_BAD_ROUTING = "response routing does not match the request"  # the Go server's, to a provider
MSG_DUPLICATE_ID = "duplicate request id"
MSG_SHUTTING_DOWN = MSG_OVERLOADED + ": shutting down"
MSG_CHANNEL_RESERVED = "channel reserved: the server's own broker serves it"
# What a request naming another client id than its connection registered with gets:
# a client id is then one connection's, so a provider (the broker) can count per client.
MSG_CLIENT_MISMATCH = "client id does not match the connection's registration"

# Messages with details after a fixed prefix (limits, bad input), and what each formats.
PREFIX_OVERLOADED = MSG_OVERLOADED + ":"
PREFIX_REQUEST_TOO_LARGE = "request too large"
PREFIX_RESPONSE_TOO_LARGE = "response too large"
PREFIX_BAD_RESPONSE = "bad response:"
PREFIX_CHANNEL_RESERVED = "channel reserved"
PREFIX_REGISTER_TIMEOUT = "register timeout:"
PREFIX_FRAME_TIMEOUT = "frame timeout:"
PREFIX_PERMISSION_DENIED = "permission denied:"


def overloaded(detail: str) -> str:
    """``server overloaded: <detail>``: a limit was reached (:class:`ServerOverloaded`)."""
    return f"{PREFIX_OVERLOADED} {detail}"


def too_large(which: str, detail: str) -> str:
    """``request too large: ...`` or ``response too large: ...`` (``which`` is ``request`` or ``response``)."""
    return f"{which} too large: {detail}"


def bad_response(detail: str) -> str:
    """``bad response: <detail>``: the provider's response broke the protocol."""
    return f"{PREFIX_BAD_RESPONSE} {detail}"


def permission_denied(detail: str) -> str:
    """``permission denied: <detail>``: a refused token, or a missing right (:class:`PermissionDenied`)."""
    return f"{PREFIX_PERMISSION_DENIED} {detail}"


def register_timeout(detail: str) -> str:
    """``register timeout: <detail>``: no START soon enough after connecting."""
    return f"{PREFIX_REGISTER_TIMEOUT} {detail}"


def frame_timeout(detail: str) -> str:
    """``frame timeout: <detail>``: a frame took too long to arrive whole."""
    return f"{PREFIX_FRAME_TIMEOUT} {detail}"


# Each whole message and the type a client raises for it.
_SERVER_MESSAGES: dict[str, type[PulsyfluxError]] = {
    MSG_PEER_DISAPPEARED: NoProviderError,
    MSG_TIMED_OUT: RequestTimeout,
    MSG_OVERLOADED: ServerOverloaded,
    MSG_BAD_START_LENGTH: ProtocolError,
    MSG_BAD_ROLE: ProtocolError,
    MSG_BAD_TYPE: ProtocolError,
    MSG_BAD_ROUTING: ProtocolError,  # to a provider
    MSG_CLIENT_MISMATCH: ProtocolError,  # one client id per connection
}


def error_from_message(message: str) -> PulsyfluxError:
    """Turn the text of an ERROR frame into the exception a caller should see.

    Known server messages get their own type; anything else is the provider's
    own error and becomes a :class:`RemoteError`.
    """
    kind = _SERVER_MESSAGES.get(message)
    if kind is None:
        for prefix, prefixed_kind in _SERVER_PREFIXES:
            if message.startswith(prefix):
                return prefixed_kind(message)
        return RemoteError(message)
    return kind(message)


# Each prefix and the type a client raises for it (see the table above).
_SERVER_PREFIXES: tuple[tuple[str, type[PulsyfluxError]], ...] = (
    (PREFIX_OVERLOADED, ServerOverloaded),
    (PREFIX_REQUEST_TOO_LARGE, ServerOverloaded),
    (PREFIX_RESPONSE_TOO_LARGE, ServerOverloaded),
    (MSG_DUPLICATE_ID, ProtocolError),
    (PREFIX_BAD_RESPONSE, ProtocolError),  # the provider's response broke the protocol; the request failed
    (PREFIX_CHANNEL_RESERVED, PermissionDenied),
    (PREFIX_PERMISSION_DENIED, PermissionDenied),  # a token refused, or a right missing (pulsyflux.auth)
    (PREFIX_REGISTER_TIMEOUT, ProtocolError),  # no START soon enough after connecting: closed (guard.py)
    (PREFIX_FRAME_TIMEOUT, ProtocolError),  # a frame took too long to arrive whole: closed (guard.py)
)


def error_kind(message: str) -> str:
    """The bounded name a server counts one of its own error messages under.

    A known message is its own kind; one with details after a known prefix
    is that prefix (``server overloaded: shutting down`` -> ``server
    overloaded``); anything else is ``other``. Counting by kind keeps the
    server's stats small whatever texts go by.
    """
    if message in _SERVER_MESSAGES:
        return message
    for prefix, _ in _SERVER_PREFIXES:
        if message.startswith(prefix):
            return prefix.rstrip(":")
    return "other"
