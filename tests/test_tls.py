"""TLS over real TCP on 127.0.0.1: the server on ``ssl:`` (or ``mtls:``), clients on ``tls:``.

Certificates are made here: a test CA signs the server's certificate (for
127.0.0.1) and a client's; a second, untrusted CA plays the impostor.
"""

from __future__ import annotations

import datetime
import ipaddress
import uuid
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.interfaces import ISSLTransport

from pulsyflux import ConnectionLostError, Consumer, Provider
from pulsyflux.service import ServerService

ensure = pytest_twisted.ensureDeferred


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _issue(subject: str, issuer_key, issuer_name, *, ca: bool, ip: str | None = None):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name or _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ip:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip)), x509.DNSName("localhost")]),
            critical=False,
        )
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return key, cert


def _write(directory: Path, name: str, key, cert) -> tuple[str, str]:
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.pem"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(key_path), str(cert_path)


class PKI:
    """Files a TLS deployment needs, made for one test."""

    def __init__(self, root: Path) -> None:
        for sub in ("ca", "rogue-ca", "keys"):
            (root / sub).mkdir()
        ca_key, ca_cert = _issue("pulsyflux test CA", None, None, ca=True)
        rogue_key, rogue_cert = _issue("impostor CA", None, None, ca=True)
        _write(root / "ca", "ca", ca_key, ca_cert)
        _write(root / "rogue-ca", "ca", rogue_key, rogue_cert)
        self.ca_dir = str(root / "ca")  # a tls: client's trustRoots is a directory of PEM files
        self.ca_file = str(root / "ca" / "ca.pem")
        self.rogue_dir = str(root / "rogue-ca")
        keys = root / "keys"
        self.server_key, self.server_cert = _write(
            keys, "server", *_issue("127.0.0.1", ca_key, ca_cert.subject, ca=False, ip="127.0.0.1")
        )
        self.client_key, self.client_cert = _write(
            keys, "client", *_issue("a client", ca_key, ca_cert.subject, ca=False)
        )
        self.billing_key, self.billing_cert = _write(
            keys, "billing", *_issue("billing", ca_key, ca_cert.subject, ca=False)
        )
        self.stranger_key, self.stranger_cert = _write(
            keys, "stranger", *_issue("stranger", ca_key, ca_cert.subject, ca=False)
        )
        self.rogue_server_key, self.rogue_server_cert = _write(
            keys, "rogue-server", *_issue("127.0.0.1", rogue_key, rogue_cert.subject, ca=False, ip="127.0.0.1")
        )
        self.rogue_client_key, self.rogue_client_cert = _write(
            keys, "rogue-client", *_issue("an impostor", rogue_key, rogue_cert.subject, ca=False)
        )


@pytest.fixture
def pki(tmp_path):
    return PKI(tmp_path)


@pytest.fixture
def tls_service():
    services = []

    async def start(listen: str) -> int:
        service = ServerService(listen, reactor, grace=0)
        service.startService()
        services.append(service)
        port = await service.whenListening()
        return port.getHost().port

    yield start
    for service in services:
        pytest_twisted.blockon(service.stopService())


def client(port: int, trust: str, key: str | None = None, cert: str | None = None) -> str:
    description = f"tls:host=127.0.0.1:port={port}:trustRoots={trust}"
    if cert:
        description += f":certificate={cert}:privateKey={key}"
    return description


@ensure
async def test_requests_over_tls_with_a_verified_server(pki, tls_service, channel):
    port = await tls_service(f"ssl:0:interface=127.0.0.1:privateKey={pki.server_key}:certKey={pki.server_cert}")
    provider = await Provider.connect(client(port, pki.ca_dir), channel, handler=lambda data: b"secure:" + data)
    consumer = await Consumer.connect(client(port, pki.ca_dir), channel)
    assert await consumer.send(b"hello", timeout=5) == b"secure:hello"
    assert await consumer.send(b"x" * 3_000_000, timeout=10) == b"secure:" + b"x" * 3_000_000
    assert ISSLTransport.providedBy(consumer._protocol.transport)
    await consumer.close()
    await provider.close()


@ensure
async def test_client_refuses_a_server_its_roots_do_not_vouch_for(pki, tls_service, channel):
    port = await tls_service(
        f"ssl:0:interface=127.0.0.1:privateKey={pki.rogue_server_key}:certKey={pki.rogue_server_cert}"
    )
    with pytest.raises(ConnectionLostError):
        await Provider.connect(client(port, pki.ca_dir), channel)  # the handshake fails: nothing is sent
    consumer = await Consumer.connect(client(port, pki.ca_dir), channel)
    with pytest.raises(ConnectionLostError):
        await consumer.send(b"for the real server only", timeout=5)


@ensure
async def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(pki, tls_service, channel):
    port = await tls_service(
        f"mtls:0:privateKey={pki.server_key}:certKey={pki.server_cert}:caCerts={pki.ca_file}:interface=127.0.0.1"
    )
    admitted = client(port, pki.ca_dir, pki.client_key, pki.client_cert)
    provider = await Provider.connect(admitted, channel, handler=lambda data: b"mutual:" + data)
    consumer = await Consumer.connect(admitted, channel)
    assert await consumer.send(b"hi", timeout=5) == b"mutual:hi"

    for refused in (
        client(port, pki.ca_dir),  # no client certificate
        client(port, pki.ca_dir, pki.rogue_client_key, pki.rogue_client_cert),  # one from another CA
    ):
        with pytest.raises(ConnectionLostError):
            await Provider.connect(refused, uuid.uuid4())
    assert await consumer.send(b"still", timeout=5) == b"mutual:still"
    await consumer.close()
    await provider.close()


def test_mtls_description_errors_are_clear(pki):
    from pulsyflux.endpoints import server_endpoint

    with pytest.raises(ValueError, match="mtls"):
        server_endpoint(reactor, f"mtls:0:privateKey={pki.server_key}:nonsense=1")
    with pytest.raises(ValueError, match="no PEM certificate"):
        server_endpoint(
            reactor, f"mtls:0:privateKey={pki.server_key}:certKey={pki.server_cert}:caCerts={pki.server_key}"
        )


@ensure
async def test_mtls_certificate_subjects_map_to_grants_and_a_token_replaces_them(pki, tls_service, channel):
    """An auth file's ``certificates``: a certificate with a grant may provide, one without may not.

    A token presented on such a connection replaces the certificate's grants
    (docs/security.md), as it replaces an anonymous client's.
    """
    from pulsyflux.auth.config import parse_auth
    from pulsyflux.auth.tokens import Key, mint
    from pulsyflux.server import ServerFactory
    from pulsyflux.wire.errors import PermissionDenied

    key = Key.hs256("k1", "k" * 32)
    authority = parse_auth(
        {
            "keys": [{"kid": "k1", "secret": "k" * 32}],
            "certificates": {
                "CN=billing": {"provide": [str(channel)]},
                "CN=a client": {"consume": [str(channel)]},
            },
        }
    )
    factory = ServerFactory(reactor)
    gate = factory.router.enable_auth(authority)
    service = ServerService(
        f"mtls:0:privateKey={pki.server_key}:certKey={pki.server_cert}:caCerts={pki.ca_file}:interface=127.0.0.1",
        reactor,
        factory,
        grace=0,
    )
    service.startService()
    try:
        port = (await service.whenListening()).getHost().port
        billing = client(port, pki.ca_dir, pki.billing_key, pki.billing_cert)
        reader = client(port, pki.ca_dir, pki.client_key, pki.client_cert)
        stranger = client(port, pki.ca_dir, pki.stranger_key, pki.stranger_cert)
        provider = await Provider.connect(billing, channel, handler=lambda data: b"billed:" + data)
        consumer = await Consumer.connect(reader, channel)
        assert await consumer.send(b"x", timeout=5) == b"billed:x"

        async def refused(d):
            with pytest.raises(PermissionDenied) as caught:
                await d
            return str(caught.value)

        # Each refusal names who and the missing right.
        assert "certificate 'CN=a client' may not provide" in await refused(Provider.connect(reader, uuid.uuid4()))
        assert "anonymous clients may not provide" in await refused(Provider.connect(stranger, channel))
        # A consumer registers with its first request: refused, it fails with the refusal, not a timeout.
        wrong_side = await Consumer.connect(billing, channel)
        assert "certificate 'CN=billing' may not consume" in await refused(wrong_side.send(b"z", timeout=30))
        # A token replaces the certificate's grants: this one grants consume only, so billing may not provide.
        token = mint(key, {"consume": [str(channel)]}, 60, subject="ops")
        assert "token 'ops' may not provide" in await refused(Provider.connect(billing, uuid.uuid4(), token=token))
        with_token = await Consumer.connect(stranger, channel, token=token)
        assert await with_token.send(b"y", timeout=5) == b"billed:y"
        assert gate.refusals == {"provide": 3, "consume": 1}
        for c in (with_token, consumer, provider):
            await c.close()
        assert not gate.certified  # forgotten with their connections
    finally:
        await service.stopService()
