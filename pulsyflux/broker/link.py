"""What the broker's pieces share about talking through a server.

The broker channel everyone assumes, the answers (``ok``, ``resumed``) and
the probe that the fan-out and the subscribers agree on, and how to send to
a Provider that may not be registered yet.
"""

from __future__ import annotations

import uuid
from typing import Any

from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from ..client import ChannelId, Consumer, channel_bytes
from ..wire import messages
from ..wire.errors import NoProviderError

__all__ = [
    "BROKER_CLOSED",
    "DEFAULT_BROKER_CHANNEL",
    "OK",
    "RESUMED",
    "PROBE",
    "channel_uuid",
    "ignore",
    "send_until_registered",
]


# uuid5(NAMESPACE_DNS, "broker.pulsyflux"): the channel everyone assumes.
DEFAULT_BROKER_CHANNEL = uuid.UUID("4cf5ad4a-c843-56c7-921e-35cba21980e2")
OK = b"ok"
# The reason a broker gives its subscribers when it shuts down (a restart, most
# often): a reconnecting BrokerClient waits for a broker to take them back.
BROKER_CLOSED = "the broker closed"
RESUMED = b"resumed"  # the answer to a re-announce of a subscription the broker still has
PROBE = messages.control(messages.PROBE).encode("utf-8")


def channel_uuid(channel: ChannelId) -> uuid.UUID:
    return uuid.UUID(bytes=channel_bytes(channel))


def ignore(failure: Failure) -> None:
    return None


async def send_until_registered(
    consumer: Consumer, body: bytes, reactor: Any, timeout: float = 5.0, patience: float = 1.0
) -> bytes:
    """Send ``body``, retrying for ``patience`` seconds while the server has no provider for it yet.

    Connections are independent, so a Provider that has just connected may
    not be registered by the time another connection's request arrives.
    """
    delay = 0.002
    waited = 0.0
    while True:
        try:
            return await consumer.send(body, timeout=timeout)
        except NoProviderError:
            if waited >= patience:
                raise
        await deferLater(reactor, delay, lambda: None)
        waited += delay
        delay = min(delay * 2, 0.1)
