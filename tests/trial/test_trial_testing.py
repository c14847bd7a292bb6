"""pulsyflux.testing under trial: setUp/addCleanup, and trial's own check
that the reactor is clean after every test."""

from __future__ import annotations

import json
import uuid

import treq
from twisted.internet import defer
from twisted.trial import unittest

from pulsyflux import BrokerClient, Consumer, Provider
from pulsyflux.testing import start_server


class ServerForATest(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.server = yield start_server(cleanup=self.addCleanup)
        self.channel = uuid.uuid4()

    @defer.inlineCallbacks
    def test_round_trip(self):
        provider = yield Provider.connect(self.server.address, self.channel, handler=lambda data: b"trial:" + data)
        self.addCleanup(provider.close)
        consumer = yield Consumer.connect(self.server.address, self.channel)
        self.addCleanup(consumer.close)
        before = self.server.stats.requests_routed
        reply = yield consumer.send(b"hello")
        self.assertEqual(reply, b"trial:hello")
        self.assertEqual(self.server.stats.requests_routed, before + 1)

    @defer.inlineCallbacks
    def test_publish_and_subscribe(self):
        client = yield BrokerClient.connect(self.server.address)
        self.addCleanup(client.close)
        subscription = yield client.subscribe("orders")
        yield self.server.broker.publish("orders", b"order 42", {"priority": "high"})
        message = yield subscription.get()
        self.assertEqual((message.payload, message.headers), (b"order 42", {"priority": "high"}))

    @defer.inlineCallbacks
    def test_clients_left_open_do_not_dirty_the_reactor(self):
        # No addCleanup for these: stopping the server must still leave the
        # reactor clean, or trial fails this test with DirtyReactorAggregateError.
        yield Provider.connect(self.server.address, self.channel, handler=lambda data: data)
        consumer = yield Consumer.connect(self.server.address, self.channel)
        yield consumer.send(b"x")
        client = yield BrokerClient.connect(self.server.address)
        yield client.subscribe("left-open")

    @defer.inlineCallbacks
    def test_requests_in_flight_at_the_end_leave_no_timers(self):
        provider = yield Provider.connect(self.server.address, self.channel)  # receives, never answers
        consumer = yield Consumer.connect(self.server.address, self.channel)
        self.pending = consumer.send(b"never answered", timeout=30)
        self.pending.addErrback(lambda failure: None)  # fails when the server stops
        yield provider.receive()


class ServerWithHTTPForATest(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.server = yield start_server(http=True, cleanup=self.addCleanup)

    @defer.inlineCallbacks
    def test_stats_over_http(self):
        # persistent=False: treq's shared pool would keep a timer for an idle
        # connection, which trial reports as a dirty reactor.
        response = yield treq.get(self.server.http_url + "/stats", persistent=False)
        body = json.loads((yield response.content()))
        self.assertEqual(response.code, 200)
        # An idle server: its own broker's two connections, shown apart from clients.
        self.assertEqual(
            body["server"]["connections"]["by_role"],
            {"consumer": 0, "provider": 0, "unregistered": 0, "broker": 2, "cluster relay": 0},
        )
        self.assertEqual(body["broker"]["published"], 0)
