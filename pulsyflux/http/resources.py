"""The twisted.web resources: /healthz, /stats, /metrics, POST /publish/{topic} and GET /history/{topic}."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Optional, Union, cast
from urllib.parse import unquote

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..wire.printable import excerpt, printable
from ..wire.ratelimit import LogLimiter, summary_to
from .prometheus import prometheus_text
from .stats import TOPIC_TEXT_LIMIT, HTTPBroker

if TYPE_CHECKING:
    from ..auth.gate import Gate
    from ..auth.grants import Grants
    from ..auth.tokens import Identity
    from ..wire.messages import Position

__all__ = [
    "HEADER_PREFIX",
    "JSON_TYPE",
    "PROMETHEUS_TYPE",
    "DEFAULT_MAX_PUBLISH_BODY",
    "Healthz",
    "Stats",
    "Metrics",
    "Publish",
    "History",
    "DEFAULT_HISTORY_LAST",
    "MAX_HISTORY_LAST",
    "Root",
]

log = Logger()


HEADER_PREFIX = "x-pulsyflux-header-"
JSON_TYPE = b"application/json"
PROMETHEUS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
# What a published body may weigh (like NATS's max_payload): what one wire
# frame carries; larger bodies are refused with 413 before they are read.
DEFAULT_MAX_PUBLISH_BODY = 1 << 20


def _json(request: Request, code: int, body: object) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", JSON_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, indent=2).encode() + b"\n"


class _Leaf(Resource):
    """An endpoint: JSON 405 for other methods, 404 below it unless it takes a path."""

    isLeaf = True
    takes_path = False

    def render(self, request: Request) -> bytes:
        if request.postpath and request.postpath != [b""] and not self.takes_path:
            return _not_found(request)
        method = request.method.decode("ascii", "replace")
        handler = getattr(self, "render_" + method, None)
        if handler is None:
            allowed = [name[len("render_") :].encode() for name in dir(self) if name.startswith("render_")]
            request.setHeader(b"allow", b", ".join(allowed))
            return _json(request, http.NOT_ALLOWED, {"error": f"method {method} not allowed"})
        return handler(request)


class Healthz(_Leaf):
    """200 once every part runs (``degraded`` if the cluster link is down); 503 with what is missing otherwise."""

    def __init__(self, ready: Callable[[], list[str]], degraded: Optional[Callable[[], list[str]]] = None) -> None:
        super().__init__()
        self.ready = ready
        self.degraded = degraded

    def render_GET(self, request: Request) -> bytes:
        missing = self.ready()
        if missing:
            return _json(request, http.SERVICE_UNAVAILABLE, {"status": "unavailable", "not_running": missing})
        # Degraded still serves its own clients: 200, so a balancer keeps sending them.
        degraded = self.degraded() if self.degraded is not None else []
        if degraded:
            return _json(request, http.OK, {"status": "degraded", "degraded": degraded})
        return _json(request, http.OK, {"status": "ok"})

    render_HEAD = render_GET


def bearer_identity(request: Request, gate: Gate) -> Union[Identity, tuple[int, dict[str, str]]]:
    """The identity an ``Authorization: Bearer <token>`` header proves (anonymous without one).

    Returns ``(status, body)`` instead when the header is refused: 401, with
    the token's own ``permission denied: ...`` line (counted, as on the wire).
    """
    from ..auth.tokens import TokenError

    raw = request.getHeader(b"authorization")
    if raw is None:
        return gate.authority.anonymous
    header = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    scheme, _, token = header.partition(" ")
    try:
        if scheme.lower() != "bearer" or not token.strip():
            raise TokenError("malformed", "the Authorization header takes 'Bearer <token>'")
        return gate.authority.verify(token.strip())
    except TokenError as error:
        gate.refuse(error.kind, error.message)
        request.setHeader(b"www-authenticate", b'Bearer error="invalid_token"')
        return http.UNAUTHORIZED, {"error": error.message}


def _refused(request: Request, gate: Gate, identity: Identity, right: str, what: str) -> bytes:
    """403 (401 for anonymous clients: a token may help) naming the missing ``right`` (doing ``what``), counted."""
    from ..auth.gate import describe
    from ..wire.errors import permission_denied

    message = permission_denied(f"{describe(identity)} may not {what}")
    gate.refuse(right, message)
    if identity.anonymous:
        request.setHeader(b"www-authenticate", b"Bearer")
        return _json(request, http.UNAUTHORIZED, {"error": message})
    return _json(request, http.FORBIDDEN, {"error": message})


def _refusal(request: Request, gate: Gate, right: str, granted: Callable[[Grants], bool], what: str) -> Optional[bytes]:
    """None if the request's bearer holds ``right`` (``granted`` by its grants), else the answer.

    The answer is 401 for a refused token (:func:`bearer_identity`), else
    :func:`_refused`'s 401/403 saying it may not do ``what``.
    """
    identity = bearer_identity(request, gate)
    if isinstance(identity, tuple):
        return _json(request, *identity)
    if not granted(identity.grants):
        return _refused(request, gate, identity, right, what)
    return None


def _stats_refusal(request: Request, gate: Optional[Gate]) -> Optional[bytes]:
    """None if this request may read /stats and /metrics (auth file ``"stats": "token"``), else the answer."""
    if gate is None or not gate.authority.stats_need_token:
        return None
    return _refusal(request, gate, "stats", lambda grants: grants.stats, "read /stats and /metrics")


class Stats(_Leaf):
    """GET: the stats document as JSON (behind a token when the auth file says so)."""

    def __init__(self, document: Callable[[], dict[str, Any]], gate: Optional[Gate] = None) -> None:
        super().__init__()
        self.document = document
        self.gate = gate

    def render_GET(self, request: Request) -> bytes:
        refused = _stats_refusal(request, self.gate)
        if refused is not None:
            return refused
        return self.render_document(request, self.document())

    def render_document(self, request: Request, document: dict[str, Any]) -> bytes:
        return _json(request, http.OK, document)


class Metrics(Stats):
    """GET: the same document in the Prometheus text format, behind the same check."""

    def render_document(self, request: Request, document: dict[str, Any]) -> bytes:
        request.setHeader(b"content-type", PROMETHEUS_TYPE)
        # Every label is printable() already; "replace" is the last safety net.
        return prometheus_text(document).encode("utf-8", "replace")


class Publish(_Leaf):
    """``POST /publish/{topic}``: the body is the payload; headers come from
    ``X-Pulsyflux-Header-<name>`` (names lowercased, as HTTP ignores case)."""

    log = Logger()
    takes_path = True

    def __init__(
        self,
        broker: Optional[HTTPBroker],
        max_body: int = DEFAULT_MAX_PUBLISH_BODY,
        timeout: float = 5.0,
        gate: Optional[Gate] = None,
    ) -> None:
        super().__init__()
        self.broker = broker
        self.gate = gate  # a server with --auth: Authorization: Bearer <token>, checked as on the wire
        self.max_body = max_body
        self.timeout = timeout
        from twisted.internet import reactor

        self.log_limiter = LogLimiter(reactor, summary_to(self.log))  # clients decide how often publishes fail

    def render_POST(self, request: Request) -> Union[bytes, int]:  # int: NOT_DONE_YET
        path = request.path.decode("utf-8", "replace")
        raw_topic = path[len("/publish") :].lstrip("/")
        topic = unquote(raw_topic)
        if getattr(request, "body_too_large", False):
            return self._too_large(request)
        problem = _topic_problem(topic)
        if problem:
            return _json(request, http.BAD_REQUEST, {"error": problem})
        content = cast(BinaryIO, request.content)  # Twisted's stub says None: it is the buffered body
        content.seek(0)
        payload = content.read()
        if len(payload) > self.max_body:
            return self._too_large(request)
        gate = self.gate
        if gate is not None:
            refused = _refusal(request, gate, "publish", lambda g: g.may_publish(topic), f"publish to {excerpt(topic)}")
            if refused is not None:
                return refused
        if self.broker is None:
            return _json(request, http.SERVICE_UNAVAILABLE, {"error": "this server runs no broker"})
        headers = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            lower = name.decode("latin-1").lower()
            if lower.startswith(HEADER_PREFIX) and len(lower) > len(HEADER_PREFIX):
                headers[lower[len(HEADER_PREFIX) :]] = values[-1].decode("utf-8", "replace")
        d = maybeDeferred(self.broker.publish, topic, payload, headers or None, timeout=self.timeout)
        gone: list[Failure] = []  # the client hung up: the message is still published, nobody to tell
        request.notifyFinish().addErrback(gone.append)

        def answer(code: int, body: dict[str, Any]) -> None:
            if not gone and not request.finished:
                request.write(_json(request, code, body))
                request.finish()

        def failed(failure: Failure) -> None:
            code, message = _publish_error(failure.value)
            if code >= 500 and self.log_limiter.allow("publish failed"):
                self.log.warn(
                    "publish to {topic} failed: {error}",
                    topic=printable(repr(topic), TOPIC_TEXT_LIMIT),
                    error=printable(str(failure.value)),
                )
            answer(code, {"error": message})

        def accepted(position: Optional[Position]) -> None:
            body: dict[str, Any] = {"status": "accepted", "topic": topic, "bytes": len(payload)}
            if position is not None:  # a broker with history: where it stands in its topic
                body["position"] = str(position)
            answer(http.ACCEPTED, body)

        d.addCallbacks(accepted, failed)
        return NOT_DONE_YET

    def _too_large(self, request: Request) -> bytes:
        return _json(
            request,
            http.REQUEST_ENTITY_TOO_LARGE,
            {"error": f"payload larger than {self.max_body} bytes ({_size(self.max_body)})", "limit": self.max_body},
        )


def _size(count: int) -> str:
    """1048576 -> "1 MiB": the number people read in the docs."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift and count % (1 << shift) == 0:
            return f"{count >> shift} {unit}"
    return f"{count} bytes"


DEFAULT_HISTORY_LAST = 100  # GET /history/{topic} without ?last=
MAX_HISTORY_LAST = 1000  # and with it, at most (the topic's own bounds apply too)


class History(_Leaf):
    """``GET /history/{topic}?last=N``: the last N retained messages of a topic, oldest first.

    Each is the broker's JSON for it (Go's ``Topic``/``Payload``/``Headers``,
    payload in base64, plus ``Position``); ``position`` is the topic's
    position now, which ``pulsyflux sub --since`` takes. Bounded: N is at
    most :data:`MAX_HISTORY_LAST`, and a topic keeps at most its history
    bounds; the answer is ASCII JSON (every other character escaped).
    """

    takes_path = True

    def __init__(self, broker: Optional[HTTPBroker], gate: Optional[Gate] = None) -> None:
        super().__init__()
        self.broker = broker
        self.gate = gate  # a server with --auth: reading a topic's history needs the right to subscribe to it

    def render_GET(self, request: Request) -> bytes:
        path = request.path.decode("utf-8", "replace")
        topic = unquote(path[len("/history") :].lstrip("/"))
        from ..wire.messages import is_pattern, topic_problem

        problem = topic_problem(topic, subscribing=True)
        if problem is None and is_pattern(topic):
            problem = "history is kept per topic: name one, not a pattern"
        if problem is not None:
            suffix = ": GET /history/{topic}?last=N" if not topic else ""
            return _json(request, http.BAD_REQUEST, {"error": printable(problem) + suffix})
        gate = self.gate
        if gate is not None:
            what = f"read the history of {excerpt(topic)}"
            refused = _refusal(request, gate, "subscribe", lambda g: g.may_subscribe(topic), what)
            if refused is not None:
                return refused
        args: dict[bytes, list[bytes]] = request.args or {}
        raw = args.get(b"last", [str(DEFAULT_HISTORY_LAST).encode()])[-1]
        if not (raw.isdigit() and len(raw) <= 9):
            shown = printable(raw.decode("utf-8", "replace"), 40)
            return _json(request, http.BAD_REQUEST, {"error": f"last must be a whole number >= 0, not {shown!r}"})
        last = min(int(raw), MAX_HISTORY_LAST)
        history = self.broker.history if self.broker is not None else None
        if history is None:
            return _json(
                request, http.NOT_FOUND, {"error": "this broker keeps no history (twistd pulsyflux --history N)"}
            )
        top = history.top(topic)
        texts = history.latest(topic, last)
        return _json(
            request,
            http.OK,
            {
                "topic": topic,
                "position": str(top) if top is not None else None,
                "messages": [json.loads(text) for text in texts],
            },
        )


def _topic_problem(topic: str) -> Optional[str]:
    """The broker's topic rule (:func:`messages.topic_problem`), with how to name a topic in a URL."""
    from ..wire.messages import topic_problem

    problem = topic_problem(topic)
    if problem is not None and not topic:
        return problem + ": POST /publish/{topic}"
    return problem


def _publish_error(error: BaseException) -> tuple[int, str]:
    text = printable(str(error))  # may repeat what a client sent: bounded
    if isinstance(error, (ValueError, TypeError)):
        return http.BAD_REQUEST, text
    if isinstance(error, TimeoutError):
        return http.GATEWAY_TIMEOUT, f"broker did not accept the message in time: {text}"
    return http.SERVICE_UNAVAILABLE, f"broker did not accept the message: {text}"


class Root(Resource):
    def render_GET(self, request: Request) -> bytes:
        return _json(
            request,
            http.OK,
            {
                "endpoints": [
                    "GET /healthz",
                    "GET /stats",
                    "GET /metrics",
                    "POST /publish/{topic}",
                    "GET /history/{topic}?last=N",
                ]
            },
        )

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self
        return _NotFound()


def _not_found(request: Request) -> bytes:
    path = printable(request.path.decode("utf-8", "replace"), TOPIC_TEXT_LIMIT)
    return _json(request, http.NOT_FOUND, {"error": f"no such endpoint: {path}"})


class _NotFound(_Leaf):
    def render(self, request: Request) -> bytes:
        return _not_found(request)
