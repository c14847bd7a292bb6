"""A Twisted service that listens on one endpoint: the server's and the HTTP API's.

One owner for what both need: the endpoint from what the user typed, the
port once listening, a failure logged once, and ``whenListening`` for
whoever waits (tests with ephemeral ports, ``twistd``'s startup check).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Optional

from twisted.application import service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IListeningPort, IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._reactor import default_reactor
from ..endpoints import describe_address, server_description, server_endpoint

if TYPE_CHECKING:
    from .._types import IReactor

__all__ = ["ListeningService"]


class ListeningService(service.Service):
    """Listens on ``listen`` (a bare port means 127.0.0.1, else an endpoint description).

    Subclasses call :meth:`_listen` from ``startService`` and say what they
    are in ``_what`` (for the failure's log line).
    """

    log = Logger()
    _what = "listener"
    _exposes = "other hosts can connect to it"  # what a listener not on loopback lets them do

    def __init__(self, listen: str | int, reactor: Optional[IReactor] = None) -> None:
        self.reactor: IReactor = default_reactor(reactor)
        self.description = server_description(listen)
        self.port: Optional[IListeningPort] = None
        self._started = False
        self._failure: Optional[Failure] = None
        self._waiting: list[Deferred[IListeningPort]] = []

    def _listen(self, factory: IProtocolFactory) -> "Deferred[Optional[IListeningPort]]":
        """Listen with ``factory``: fires with the port, or fails (logged here, once).

        The failure is also given to every :meth:`whenListening` waiting; then
        it is handled, and the Deferred returned here fires with None.
        """
        self._started = True
        self._failure = None

        def listening(port: IListeningPort) -> IListeningPort:
            self.port = port
            self._listening(port)
            self._warn_if_exposed(port.getHost())
            waiting, self._waiting = self._waiting, []
            for waiter in waiting:
                waiter.callback(port)
            return port

        def failed(failure: Failure) -> Optional[Failure]:
            # One line: a port in use or a bad interface is the operator's to fix, not a bug.
            self.log.error(
                "{what} cannot listen on {d}: {reason}", what=self._what, d=self.description, reason=_reason(failure)
            )
            self._failure = failure
            waiting, self._waiting = self._waiting, []
            for waiter in waiting:
                waiter.errback(failure)
            return None if waiting else failure  # handled once someone was told

        return server_endpoint(self.reactor, self.description).listen(factory).addCallbacks(listening, failed)

    def _listening(self, port: IListeningPort) -> None:
        """Called once listening (a log line saying where)."""

    def _warn_if_exposed(self, address: IAddress) -> None:
        """A warning naming what other hosts can reach, when not listening on loopback only."""
        host = getattr(address, "host", None)
        if host is None or _is_loopback(host):
            return  # a Unix socket, or loopback
        where = describe_address(address)
        everywhere = " (all interfaces)" if host in ("0.0.0.0", "::", "") else ""
        self.reactor.callWhenRunning(
            self.log.warn,
            "{what} listens on {where}{everywhere}, not loopback: {exposed}",
            what=self._what,
            where=where,
            everywhere=everywhere,
            exposed=self._exposes,
        )

    def whenListening(self) -> "Deferred[IListeningPort]":
        """Fires with the listening port (for ephemeral ports in tests), or the failure to listen."""
        if self.port is not None:
            return succeed(self.port)
        if self._failure is not None:
            return fail(self._failure)
        if not self._started:
            return fail(RuntimeError(f"the {self._what} service is not started"))
        d: Deferred[IListeningPort] = Deferred()
        self._waiting.append(d)
        return d


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def _reason(failure: Failure) -> str:
    """Why listening failed, in a few words: "Address already in use", not the whole exception."""
    error = failure.value
    if isinstance(error, CannotListenError) and isinstance(error.socketError, OSError):
        return error.socketError.strerror or str(error.socketError)
    return failure.getErrorMessage()
