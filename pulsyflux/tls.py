"""Mutual TLS for the server: an ``mtls:`` listen description.

Twisted's ``ssl:`` server description proves the server to its clients but
cannot ask clients for a certificate. ``mtls:`` takes the same arguments plus
``caCerts``, a PEM file of the certificate authorities whose client
certificates are accepted; a client without one is refused during the
handshake. Unlike ``ssl:`` it listens on 127.0.0.1 unless ``interface`` says
otherwise.

    twistd -n pulsyflux --port "mtls:9443:privateKey=server.key:certKey=server.pem:caCerts=clients-ca.pem"

Clients connect with Twisted's ``tls:`` description and their own
certificate: ``tls:host=...:port=9443:trustRoots=ca-dir:certificate=me.pem:privateKey=me.key``.
"""

from __future__ import annotations

import re
from typing import Optional, Union

from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.python.filepath import FilePath

__all__ = ["mtls_server_endpoint", "parse_mtls"]

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def mtls_server_endpoint(
    reactor: object,
    port: Union[int, str],  # a string too: from an endpoint description
    privateKey: str,
    caCerts: str,
    certKey: Optional[str] = None,
    interface: str = "127.0.0.1",
    backlog: Union[int, str] = 50,
) -> IStreamServerEndpoint:
    """A TLS server endpoint that requires a client certificate signed by one of ``caCerts``.

    endpoint = mtls_server_endpoint(reactor, 9443, "server.key", "clients-ca.pem", "server.pem")
    """
    from twisted.internet import ssl

    key_pem = FilePath(privateKey).getContent()
    cert_pem = FilePath(certKey or privateKey).getContent()
    server = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
    authorities = [ssl.Certificate.loadPEM(pem) for pem in _PEM_CERT.findall(FilePath(caCerts).getContent())]
    if not authorities:
        raise ValueError(f"caCerts file {caCerts!r} holds no PEM certificate")
    options = ssl.CertificateOptions(
        privateKey=server.privateKey.original,
        certificate=server.original,
        trustRoot=ssl.trustRootFromCertificates(authorities),  # verify, and require, client certificates
    )
    return SSL4ServerEndpoint(reactor, int(port), options, backlog=int(backlog), interface=interface)


def parse_mtls(reactor: object, description: str) -> IStreamServerEndpoint:
    """``mtls:PORT:privateKey=...:certKey=...:caCerts=...[:interface=...]`` -> endpoint (``\\:`` escapes a colon)."""
    kind, _, rest = description.partition(":")
    if kind != "mtls":
        raise ValueError(f"not an mtls: description: {description!r}")
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for part in re.split(r"(?<!\\):", rest):
        part = part.replace("\\:", ":")
        key, eq, value = part.partition("=")
        if eq:
            kwargs[key] = value
        elif part:
            args.append(part)
    if "port" not in kwargs and args:
        kwargs["port"] = args.pop(0)
    if args:
        raise ValueError(f"unexpected positional arguments in {description!r}: {args}")
    try:
        return mtls_server_endpoint(reactor, **kwargs)
    except TypeError as error:
        raise ValueError(f"bad mtls: description {description!r}: {error}") from None
