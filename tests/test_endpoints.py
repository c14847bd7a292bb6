"""Addresses: parsed and formatted in one place (pulsyflux.endpoints)."""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from pulsyflux.endpoints import address_host, client_address, describe_address, http_address, port_number


def test_addresses_are_described_for_logs_and_for_clients():
    assert describe_address(IPv4Address("TCP", "0.0.0.0", 9090)) == "0.0.0.0:9090"
    assert client_address(IPv4Address("TCP", "0.0.0.0", 9090)) == "127.0.0.1:9090"
    assert describe_address(IPv6Address("TCP", "::", 9090)) == "[::]:9090"
    assert client_address(IPv6Address("TCP", "::", 9090)) == "[::1]:9090"
    assert client_address(IPv6Address("TCP", "fe80::1", 1)) == "[fe80::1]:1"
    assert describe_address(UNIXAddress(b"/run/p.sock")) == "unix:/run/p.sock"
    assert client_address(UNIXAddress("/run/p.sock")) == "unix:path=/run/p.sock"
    assert describe_address(object()).startswith("<object")
    with pytest.raises(ValueError, match="cannot connect"):
        client_address(object())


def test_the_port_number_of_a_listening_port_and_not_of_a_unix_socket():
    from twisted.internet.testing import MemoryReactor

    reactor = MemoryReactor()
    assert port_number(reactor.listenTCP(9090, None)) == 9090
    with pytest.raises(ValueError, match="does not listen on a TCP port"):
        port_number(reactor.listenUNIX("/run/p.sock", None))


@pytest.mark.parametrize(
    ("address", "host"),
    [
        ("127.0.0.1:9090", "127.0.0.1"),
        ("[::1]:9090", "::1"),
        ("tcp:host=example.com:port=9090", "example.com"),
        ("tcp:example.com:9090", "example.com"),
        ("TLS:host=example.com:port=1", "example.com"),
        ("tcp6:host=2001\\:db8\\:\\:1:port=9090", "2001:db8::1"),
        ("unix:/run/pulsyflux.sock", None),
        ("unix:path=/run/pulsyflux.sock", None),
        ("tcp:port=9090", None),
    ],
)
def test_the_host_of_a_client_address(address, host):
    assert address_host(address) == host


def test_the_http_api_beside_a_server():
    assert http_address("10.1.2.3:9090") == "10.1.2.3:8222"
    assert http_address("[::1]:9090", 80) == "[::1]:80"
    assert http_address("unix:/run/pulsyflux.sock") == "127.0.0.1:8222"
