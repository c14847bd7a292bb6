"""The socket layer under trial, the runner many Twisted users run."""

from __future__ import annotations

import uuid

from twisted.internet import defer, reactor
from twisted.trial import unittest

from pulsyflux import Consumer, NoProviderError, Provider, ServerFactory


class RoundTripTests(unittest.TestCase):
    def setUp(self):
        self.factory = ServerFactory(reactor)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.address = f"127.0.0.1:{self.port.getHost().port}"
        self.channel = uuid.uuid4()

    @defer.inlineCallbacks
    def test_round_trip(self):
        provider = yield Provider.connect(self.address, self.channel, handler=lambda data: b"trial:" + data)
        self.addCleanup(provider.close)
        consumer = yield Consumer.connect(self.address, self.channel)
        self.addCleanup(consumer.close)
        reply = yield consumer.send(b"hello")
        self.assertEqual(reply, b"trial:hello")

    @defer.inlineCallbacks
    def test_no_provider(self):
        consumer = yield Consumer.connect(self.address, self.channel)
        self.addCleanup(consumer.close)
        yield self.assertFailure(consumer.send(b"x"), NoProviderError)
