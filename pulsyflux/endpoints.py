"""Turn the addresses users type into Twisted endpoints.

Users come from the Go API ("host:port") or from Twisted ("tcp:host=...");
both work, and so does an endpoint object they built themselves.

    endpoint = client_endpoint(reactor, "127.0.0.1:9090")
"""

from __future__ import annotations

import re
from typing import Any, Union

from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint

Address = Union[str, IStreamClientEndpoint]

DEFAULT_ADDRESS = "127.0.0.1:9090"

_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:=\s]+)):(?P<port>\d+)$")
_ENDPOINT_KINDS = {"tcp", "tcp6", "unix", "tls", "ssl", "ssl6", "systemd", "onion", "tor"}


def client_endpoint(reactor: Any, address: Address) -> IStreamClientEndpoint:
    """``"host:port"``, a client endpoint description, or an endpoint object."""
    if IStreamClientEndpoint.providedBy(address):
        return address
    if not isinstance(address, str):
        raise TypeError(f"address must be 'host:port', an endpoint description or an endpoint, not {address!r}")
    match = _HOST_PORT.match(address)
    if match and (match.group("v6") or match.group("host").lower() not in _ENDPOINT_KINDS):
        host = match.group("v6") or match.group("host")
        host = host.replace(":", r"\:")
        return clientFromString(reactor, f"tcp:host={host}:port={match.group('port')}")
    return clientFromString(reactor, address)


def server_description(listen: str | int) -> str:
    """A bare port listens on 127.0.0.1 (like the Go server); anything else is a description."""
    text = str(listen).strip()
    if text.isdigit():
        return f"tcp:{text}:interface=127.0.0.1"
    return text


def server_endpoint(reactor: Any, listen: str | int) -> IStreamServerEndpoint:
    description = server_description(listen)
    if description.startswith("mtls:"):  # TLS that also checks client certificates (pulsyflux.tls)
        from .tls import parse_mtls

        return parse_mtls(reactor, description)
    return serverFromString(reactor, description)
