"""The server's error texts: one table, written by the server and read by the clients."""

from __future__ import annotations

import pytest

from pulsyflux.wire import errors
from pulsyflux.wire.errors import (
    NoProviderError,
    PermissionDenied,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    ServerOverloaded,
    error_from_message,
    error_kind,
)

# The wire texts, spelled out: a change here is a wire change (Go reads them too).
WRITTEN = [
    (errors.MSG_PEER_DISAPPEARED, "peer disappeared", NoProviderError, "peer disappeared"),
    (errors.MSG_TIMED_OUT, "request timed out", RequestTimeout, "request timed out"),
    (errors.MSG_BAD_TYPE, "invalid message type", ProtocolError, "invalid message type"),
    (errors.MSG_BAD_ROLE, "invalid client role", ProtocolError, "invalid client role"),
    (errors.MSG_BAD_START_LENGTH, "invalid start frame payload length", ProtocolError, None),
    (
        errors.MSG_CLIENT_MISMATCH,
        "client id does not match the connection's registration",
        ProtocolError,
        "client id does not match the connection's registration",
    ),
    (errors.MSG_DUPLICATE_ID, "duplicate request id", ProtocolError, "duplicate request id"),
    (errors.MSG_SHUTTING_DOWN, "server overloaded: shutting down", ServerOverloaded, "server overloaded"),
    (errors.MSG_CHANNEL_RESERVED, "channel reserved: the server's own broker serves it", PermissionDenied, None),
    (
        errors.overloaded("more than 3 connections"),
        "server overloaded: more than 3 connections",
        ServerOverloaded,
        None,
    ),
    (errors.too_large("request", "x"), "request too large: x", ServerOverloaded, "request too large"),
    (errors.too_large("response", "x"), "response too large: x", ServerOverloaded, "response too large"),
    (errors.bad_response("x"), "bad response: x", ProtocolError, "bad response"),
    (errors.register_timeout("x"), "register timeout: x", ProtocolError, "register timeout"),
    (errors.frame_timeout("x"), "frame timeout: x", ProtocolError, "frame timeout"),
]


@pytest.mark.parametrize(("text", "wire", "kind", "counted_as"), WRITTEN)
def test_every_text_the_server_writes_is_read_back_as_its_kind(text, wire, kind, counted_as):
    assert text == wire
    assert type(error_from_message(text)) is kind
    assert error_from_message(text).args == (wire,)
    if counted_as is not None:
        assert error_kind(text) == counted_as
    assert error_kind(text) != "other"


def test_anything_else_is_the_providers_own_error():
    assert type(error_from_message("peer disappeared!")) is RemoteError
    assert error_kind("no such order") == "other"
