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
    broker the server runs itself.
    """


# Messages a server originates (PROTOCOL.md section 5) and the type each maps to.
_SERVER_MESSAGES: dict[str, type[PulsyfluxError]] = {
    "peer disappeared": NoProviderError,
    "request timed out": RequestTimeout,
    "server overloaded": ServerOverloaded,
    "invalid start frame payload length": ProtocolError,
    "invalid client role": ProtocolError,
    "invalid message type": ProtocolError,
    "response routing does not match the request": ProtocolError,  # to a provider
    "client id does not match the connection's registration": ProtocolError,  # one client id per connection
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


# Server messages that carry details after a fixed prefix (limits, bad input).
_SERVER_PREFIXES: tuple[tuple[str, type[PulsyfluxError]], ...] = (
    ("server overloaded:", ServerOverloaded),
    ("request too large", ServerOverloaded),
    ("response too large", ServerOverloaded),
    ("duplicate request id", ProtocolError),
    ("bad response:", ProtocolError),  # the provider's response broke the protocol; the request failed
    ("channel reserved", PermissionDenied),
    ("register timeout:", ProtocolError),  # no START soon enough after connecting: closed (guard.py)
    ("frame timeout:", ProtocolError),  # a frame took too long to arrive whole: closed (guard.py)
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
