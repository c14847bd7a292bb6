"""Bounded logging: a remote peer must not decide how many lines we write.

Every log line a peer can trigger (a malformed stream, a connection closed
for idling, a subscriber refusing a message) goes through a
:class:`LogLimiter`: the first ``burst`` lines of a kind in each ``interval``
are written, the rest are only counted, and once the interval is over one
summary line says how many were left out. Whatever the peers do, each kind
costs at most ``burst + 1`` lines per interval.

Sans-I/O: the clock is passed in (the reactor, or a ``task.Clock`` in
tests); nothing here imports Twisted.

    limiter = LogLimiter(reactor, summary=lambda kind, n, s: log.warn("... and {n} more {k} lines", n=n, k=kind))
    if limiter.allow("closing"):
        log.info("closing {peer}: {error}", peer=peer, error=error)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

from .printable import printable

if TYPE_CHECKING:  # only for the annotations: this module runs without Twisted
    from twisted.internet.interfaces import IReactorTime

__all__ = ["LogLimiter", "DEFAULT_BURST", "DEFAULT_INTERVAL", "shorten", "summary_to"]

DEFAULT_BURST = 10  # lines of one kind written per interval
DEFAULT_INTERVAL = 10.0  # seconds
DEFAULT_TEXT = 200  # characters of a peer's text a log line repeats


def shorten(text: object, limit: int = DEFAULT_TEXT) -> str:
    """``text`` as :func:`~pulsyflux.wire.printable.printable` shows it, cut to
    ``limit`` characters: for log lines that repeat what a peer sent (one
    owner for cutting and escaping peer text)."""
    return printable(str(text), limit)


def summary_to(logger: Any) -> Callable[[str, int, float], None]:
    """A ``summary`` for :class:`LogLimiter` that warns on ``logger`` (a ``twisted.logger.Logger``)."""

    def summary(kind: str, count: int, seconds: float) -> None:
        logger.warn("... and {count} more {kind!r} lines like it in the last {seconds:g} s", count=count, kind=kind,
                    seconds=seconds)  # fmt: skip

    return summary


class _Window:
    __slots__ = ("start", "count")

    def __init__(self, start: float) -> None:
        self.start = start
        self.count = 0


class LogLimiter:
    """Lets through ``burst`` lines per kind and ``interval``; summarises the rest.

    ``summary(kind, suppressed, interval)`` is called once per kind and
    interval in which lines were suppressed, from one timer on ``clock``
    (armed only while something is suppressed). Kinds are names chosen by
    the code, never text from a peer, so their number is bounded.
    """

    def __init__(
        self,
        clock: IReactorTime,
        summary: Callable[[str, int, float], None],
        burst: int = DEFAULT_BURST,
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        self.clock = clock
        self.summary = summary
        self.burst = burst
        self.interval = interval
        self._windows: dict[str, _Window] = {}
        self.suppressed: dict[str, int] = {}  # per kind, in the current interval
        self._timer: Optional[Any] = None

    def allow(self, kind: str) -> bool:
        """True if a line of ``kind`` may be written now; False counts it for the summary."""
        now = self.clock.seconds()
        window = self._windows.get(kind)
        if window is None or now - window.start >= self.interval:
            if window is not None and self.suppressed.get(kind):
                self._report(kind)  # the timer has not run yet: say it before the new interval's lines
            window = self._windows[kind] = _Window(now)
        window.count += 1
        if window.count <= self.burst:
            return True
        self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
        if self._timer is None:
            self._timer = self.clock.callLater(max(0.0, window.start + self.interval - now), self._fire)
        return False

    def _report(self, kind: str) -> None:
        count = self.suppressed.pop(kind, 0)
        if count:
            self.summary(kind, count, self.interval)

    def _fire(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        due = [kind for kind in self.suppressed if now - self._windows[kind].start >= self.interval]
        for kind in due:
            self._report(kind)
            del self._windows[kind]
        if self.suppressed:
            first = min(self._windows[kind].start for kind in self.suppressed)
            self._timer = self.clock.callLater(max(0.0, first + self.interval - now), self._fire)

    def stop(self) -> None:
        """Write the pending summaries now and drop the timer (the owner is closing)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for kind in list(self.suppressed):
            self._report(kind)
