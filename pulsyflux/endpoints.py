"""Addresses: what users type, parsed into Twisted endpoints, and what we print.

Users come from the Go API ("host:port") or from Twisted ("tcp:host=...");
both work, and so does an endpoint object they built themselves. This
module is the one place that parses and formats them (the CLI, the
services, the HTTP API and the test harness all ask here).

    endpoint = client_endpoint(reactor, "127.0.0.1:9090")
"""

from __future__ import annotations

import re
from typing import Optional, Union

from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint, IStreamServerEndpoint

from ._twisted_compat import server_endpoint_port

Address = Union[str, IStreamClientEndpoint]

DEFAULT_PORT = 9090  # where a server listens (on 127.0.0.1) unless told otherwise
DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_PORT}"
DEFAULT_HTTP_PORT = 8222  # the HTTP API's usual port, beside the server

_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:=\s]+)):(?P<port>\d+)$")
_ENDPOINT_KINDS = {"tcp", "tcp6", "unix", "tls", "ssl", "ssl6", "systemd", "onion", "tor"}


def client_endpoint(reactor: object, address: Address) -> IStreamClientEndpoint:
    """``"host:port"``, a client endpoint description, or an endpoint object.

    ``reactor`` goes to Twisted's parser, which asks of it what the kind of
    address needs (``IReactorTCP`` for host:port, ``IReactorUNIX`` for ``unix:``):
    any reactor Twisted installs has both.
    """
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


_ADDRESS_FORMS = "give host:port (e.g. 127.0.0.1:9090) or a Twisted endpoint (tcp:host=H:port=P, unix:path=P)"
_CLIENT_TLS_KINDS = {"tls", "ssl", "ssl6"}  # client endpoint kinds that need pyOpenSSL


def address_problem(address: Address, reactor: object = None) -> Optional[str]:
    """What is wrong with a client address, in one line that says what to do; None if it is usable.

    Checks what can be checked without connecting: the form, the port's
    range, and that TLS has pyOpenSSL. What only connecting tells (refused,
    no such socket file) is the caller's to report.

        address_problem("localhost")  # "'localhost' has no port: give host:port (e.g. ...) or ..."
    """
    if not isinstance(address, str):
        return None
    text = address.strip()
    if not text:
        return f"the address is empty: {_ADDRESS_FORMS}"
    match = _HOST_PORT.match(text)
    if match and (match.group("v6") or match.group("host").lower() not in _ENDPOINT_KINDS):
        port = int(match.group("port"))
        return None if 0 < port < 65536 else f"port {port} is out of range: ports are 1 to 65535"
    kind, given, kwargs = _description_fields(text)
    kind = kind.lower()
    args = [arg for arg in given if arg]
    if ":" not in text:
        return f"{text!r} has no port: {_ADDRESS_FORMS}"
    if kind in _CLIENT_TLS_KINDS:
        import importlib.util

        if importlib.util.find_spec("OpenSSL") is None:
            return "TLS needs pyOpenSSL, which is not installed: pip install 'pulsyflux[tls]'"
    if kind in _HOSTED_KINDS:
        port_text = kwargs.get("port") or (args[1] if len(args) > 1 else "")
        if not (kwargs.get("host") or args):
            return f"{kind}: needs a host and a port: {kind}:host=H:port=P (or H:P)"
        if not port_text:
            return f"{kind}: needs a port: {kind}:host=H:port=P (or H:P)"
        if not port_text.isdigit():
            return f"port {port_text!r} is not a number"
        if not 0 < int(port_text) < 65536:
            return f"port {port_text} is out of range: ports are 1 to 65535"
    if kind == "unix" and not (kwargs.get("path") or args):
        return "unix: needs a path: unix:path=/run/pulsyflux.sock"
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    try:
        clientFromString(reactor, text)
    except ValueError as error:
        if "Unknown endpoint type" in str(error):
            return f"unknown address kind {kind!r}: {_ADDRESS_FORMS}"
        return f"{error}: {_ADDRESS_FORMS}"
    except Exception as error:  # noqa: BLE001 - a parser's TypeError, a missing certificate file, ...
        detail = str(error) or type(error).__name__
        return f"cannot use {text!r} as an address ({detail}): {_ADDRESS_FORMS}"
    return None


def server_description(listen: str | int) -> str:
    """A bare port listens on 127.0.0.1 (like the Go server); anything else is a description."""
    text = str(listen).strip()
    if text.isdigit():
        return f"tcp:{text}:interface=127.0.0.1"
    return text


def server_endpoint(reactor: object, listen: str | int) -> IStreamServerEndpoint:
    """The server endpoint ``listen`` describes, on ``reactor`` (given to Twisted's parser, as for a client)."""
    description = server_description(listen)
    if description.startswith("mtls:"):  # TLS that also checks client certificates (pulsyflux.tls)
        from .tls import parse_mtls

        return parse_mtls(reactor, description)
    return serverFromString(reactor, description)


# Server endpoint kinds that need pyOpenSSL (the ``tls`` extra).
_TLS_KINDS = {"ssl", "ssl6", "mtls"}


class _ParseOnly:
    """Stands in for the reactor while a description is only checked: nothing may use it."""


def check_server_description(listen: str | int) -> str:
    """The description ``listen`` means, or ValueError with one line saying what is wrong.

    Checks what can be known before listening (the syntax, the port's range,
    the files a TLS description names, pyOpenSSL for TLS), so ``twistd`` can
    refuse a bad option before it starts anything. Listening may still fail
    (a port in use).
    """
    description = server_description(listen)
    kind = description.partition(":")[0].strip().lower()
    if kind in _TLS_KINDS:
        try:
            import OpenSSL  # noqa: F401
        except ImportError:
            raise ValueError(f"{kind}: needs pyOpenSSL: pip install 'pulsyflux[tls]'") from None
    try:
        endpoint = server_endpoint(_ParseOnly(), description)
    except ImportError as error:
        raise ValueError(f"{description!r} needs a module that is not installed: {error}") from None
    except OSError as error:  # a file it names (a TLS key or certificate)
        raise ValueError(f"{description!r}: {error.strerror or error}: {error.filename}") from None
    except Exception as error:  # Twisted's parsers raise ValueError, TypeError, KeyError, OSError...
        reason = str(error) or type(error).__name__
        example = "e.g. 9090, tcp:9090:interface=0.0.0.0 or unix:/run/pulsyflux.sock"
        raise ValueError(
            f"{description!r} is not a port or a server endpoint description ({reason}; {example})"
        ) from None
    port = server_endpoint_port(endpoint)
    if port is not None and not 0 <= port <= 65535:
        raise ValueError(f"{description!r}: the port must be 0-65535, not {port}")
    return description


# Client endpoint kinds whose description names a host (first positional or host=).
_HOSTED_KINDS = {"tcp", "tcp6", "tls", "ssl", "ssl6"}


def _description_fields(description: str) -> tuple[str, list[str], dict[str, str]]:
    """(kind, positional args, keyword args) of an endpoint description; ``\\:`` escapes a colon."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(description)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if sep:
            kwargs[key] = value
        else:
            args.append(part)
    return parts[0], args, kwargs


def address_host(address: Address) -> Optional[str]:
    """The host a client address names, or None (a Unix socket, an endpoint object, ...).

    >>> address_host("example.com:9090"), address_host("tcp:host=example.com:port=9090")
    ('example.com', 'example.com')
    >>> address_host("[::1]:9090"), address_host("unix:/run/pulsyflux.sock")
    ('::1', None)
    """
    if not isinstance(address, str):
        return None
    match = _HOST_PORT.match(address)
    if match and (match.group("v6") or match.group("host").lower() not in _ENDPOINT_KINDS):
        return match.group("v6") or match.group("host")
    kind, args, kwargs = _description_fields(address.strip())
    if kind.lower() not in _HOSTED_KINDS:
        return None
    return kwargs.get("host") or (args[0] if args else None) or None


def host_port(host: str, port: Union[int, str]) -> str:
    """``host:port``, with an IPv6 host in brackets as ``client_endpoint`` reads it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def http_address(server: Address, port: int = DEFAULT_HTTP_PORT) -> str:
    """Where the HTTP API beside ``server`` usually is: the server's host on ``port``.

    A server without a host (a Unix socket, an endpoint object) is taken to
    be local: 127.0.0.1.

        >>> http_address("tcp:host=example.com:port=9090"), http_address("unix:/run/pulsyflux.sock")
        ('example.com:8222', '127.0.0.1:8222')
    """
    return host_port(address_host(server) or "127.0.0.1", port)


def describe_address(address: object, connectable: bool = False) -> str:
    """A listening or peer address as text: ``127.0.0.1:9090`` or ``unix:/path``, not a repr.

    With ``connectable=True`` the text is one a client in this process can
    connect to (:func:`client_endpoint`): a wildcard host becomes loopback, a
    Unix socket is ``unix:path=...``, and an address with neither host nor
    name raises ValueError rather than giving an unusable text.
    """
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is not None and port is not None:
        if connectable:
            if host in ("0.0.0.0", ""):
                host = "127.0.0.1"
            elif host == "::":
                host = "::1"
        return host_port(host, port)
    name = getattr(address, "name", None)
    if name is not None:
        path = name.decode() if isinstance(name, bytes) else name
        return f"unix:path={path}" if connectable else f"unix:{path}"
    if connectable:
        raise ValueError(f"cannot connect to {address!r}")
    return str(address)


def client_address(address: object) -> str:
    """Where a client in this process reaches a listening port (wildcards become loopback)."""
    return describe_address(address, connectable=True)


def port_number(port: IListeningPort) -> int:
    """The TCP port number ``port`` listens on (what ``listenTCP(0)`` or ``tcp:0`` chose).

    ``IListeningPort.getHost`` promises only an ``IAddress``; a TCP port's is
    an ``IPv4Address`` or ``IPv6Address``. Any other kind: ValueError.
    """
    number = getattr(port.getHost(), "port", None)
    if not isinstance(number, int):
        raise ValueError(f"{port!r} does not listen on a TCP port")
    return number
