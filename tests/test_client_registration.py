"""A Provider's wait for its registration probe is explicit state (no method swapped in and out)."""

from __future__ import annotations

import uuid

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from pulsyflux.client import Provider
from pulsyflux.client.connection import _ClientProtocol
from pulsyflux.wire import codec


def test_frames_after_the_probe_answer_in_the_same_read_are_handled_as_usual():
    # The server answers the probe, then (same read) says why it is closing the
    # line. Before, the rest of that read still went through the probe check,
    # which indexed the registration it had just cleared: TypeError.
    provider = Provider(uuid.uuid4(), reactor=Clock(), handler=lambda data: data)
    proto = _ClientProtocol(provider)
    proto.makeConnection(StringTransport())
    registered = provider._attach(proto)
    assert registered is not None and provider._registration is not None
    probe_id = provider._registration[0]
    answers = []
    registered.addBoth(answers.append)

    proto.dataReceived(
        codec.encode_frame(codec.ERROR, probe_id, codec.error_payload("invalid message type"))
        + codec.encode_frame(codec.ERROR, bytes(16), codec.error_payload("server overloaded: shutting down"))
    )

    assert answers == [None]  # registered
    assert provider._registration is None
    assert provider._server_said == "server overloaded: shutting down"  # the second frame was read as usual
