"""Twisted services: the server on an endpoint, and the ``twistd`` options.

service = ServerService("tcp:9090:interface=127.0.0.1")
service.setServiceParent(application)
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from .endpoints import server_description, server_endpoint
from .server import DEFAULT_GRACE, ServerFactory

__all__ = ["ServerService", "Options", "makeService"]

DEFAULT_PORT = "9090"


def describe_address(address: Any) -> str:
    """``127.0.0.1:9090`` or ``unix:/path`` rather than a repr of an address object."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    if name is not None:
        return f"unix:{name.decode() if isinstance(name, bytes) else name}"
    return str(address)


class ServerService(service.Service):
    """Listens on an endpoint with a :class:`ServerFactory`.

    ``stopService`` is graceful and means "all gone": it stops accepting,
    refuses new requests, gives those in flight up to ``grace`` seconds to
    finish, then closes every connection (:meth:`ServerFactory.shutdown`).
    """

    log = Logger()

    def __init__(
        self,
        listen: str | int = DEFAULT_PORT,
        reactor: Any = None,
        factory: ServerFactory | None = None,
        grace: float = DEFAULT_GRACE,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.description = server_description(listen)
        self.factory = factory or ServerFactory(reactor)
        self.grace = grace
        self.port: Any = None
        self._listening: Any = None

    def startService(self) -> Any:
        super().startService()
        self._listening = server_endpoint(self.reactor, self.description).listen(self.factory)

        def listening(port: Any) -> Any:
            self.port = port
            self.log.info("pulsyflux server listening on {address}", address=describe_address(port.getHost()))
            return port

        def failed(failure: Any) -> Any:
            self.log.failure("pulsyflux server could not listen on {d}", failure, d=self.description)
            return failure

        self._listening.addCallbacks(listening, failed)
        return self._listening

    def whenListening(self) -> Any:
        """Deferred firing with the listening port (for ephemeral ports in tests)."""
        from twisted.internet.defer import succeed

        if self.port is not None:
            return succeed(self.port)
        d = self._listening
        from twisted.internet.defer import Deferred

        result: Deferred[Any] = Deferred()
        d.addCallback(lambda port: (result.callback(port), port)[1])
        return result

    def stopService(self) -> Any:
        super().stopService()
        from twisted.internet.defer import maybeDeferred, succeed

        port, self.port = self.port, None
        stopped = maybeDeferred(port.stopListening) if port is not None else succeed(None)
        return stopped.addBoth(lambda _: self.factory.shutdown(self.grace))


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the pulsyflux request/response router. --port takes a bare port "
        "(listens on 127.0.0.1) or any Twisted server endpoint description, "
        "e.g. tcp:9090:interface=0.0.0.0 or unix:/run/pulsyflux.sock."
    )
    optParameters = [
        ["port", "p", DEFAULT_PORT, "Where the server listens: a port (on 127.0.0.1) or an endpoint description."],
    ]


def makeService(options: Options) -> service.IService:
    top = service.MultiService()
    ServerService(options["port"]).setServiceParent(top)
    return top
