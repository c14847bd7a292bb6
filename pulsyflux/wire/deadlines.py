"""Many deadlines on one reactor timer: cheap to set, nothing to cancel.

A consumer with thousands of requests in flight would otherwise schedule and
cancel a ``DelayedCall`` per request, which costs more than the request's
own bookkeeping. Here a deadline is a heap entry; a request that finishes is
just forgotten by its owner (its entry is skipped when it comes due), and one
``DelayedCall`` waits for the earliest deadline.

    deadlines = Deadlines(reactor, pending, expire)
    deadlines.add(request_id, entry, 5.0)  # expire(request_id, entry) in 5 s if pending[request_id] is still entry
"""

from __future__ import annotations

import heapq
import itertools
from typing import TYPE_CHECKING, Callable, Generic, Mapping, Optional, TypeVar

if TYPE_CHECKING:  # only for the annotations: this module runs without Twisted
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["Deadlines"]

K = TypeVar("K")  # what the owner keys its table by (a request id)
V = TypeVar("V")  # what it keeps there (the request's entry)


class Deadlines(Generic[K, V]):
    """Calls ``expire(key, value)`` once a deadline passes while ``live[key] is value``.

    ``clock`` is the reactor (or a ``task.Clock``); ``live`` is the owner's
    own table of what is still waiting, so forgetting needs no call here.
    """

    def __init__(self, clock: IReactorTime, live: Mapping[K, V], expire: Callable[[K, V], None]) -> None:
        self._clock = clock
        self._live = live
        self._expire = expire
        self._heap: list[tuple[float, int, K, V]] = []
        self._order = itertools.count()  # breaks ties so values are never compared
        self._timer: Optional[IDelayedCall] = None
        self._timer_at = float("inf")

    def add(self, key: K, value: V, seconds: float) -> None:
        when = self._clock.seconds() + seconds
        heap = self._heap  # push(), inline: a consumer adds one per request
        heapq.heappush(heap, (when, next(self._order), key, value))
        if len(heap) > 2 * len(self._live) + 64:  # also when it is the earliest: each may be, and each stays
            self._compact()
        if when < self._timer_at:
            self._schedule(when)

    def push(self, key: K, value: V, when: float) -> bool:
        """Add a deadline at clock time ``when`` without touching the timer; True if :meth:`arm` must follow.

        For an owner on a hot path that arms the timer after its more urgent
        work (the router: after it has sent what it routed).
        """
        heap = self._heap
        heapq.heappush(heap, (when, next(self._order), key, value))
        if len(heap) > 2 * len(self._live) + 64:  # as in add()
            self._compact()
        return when < self._timer_at

    def arm(self) -> None:
        """Have the timer fire at the earliest deadline held (after :meth:`push`)."""
        heap = self._heap
        if heap and heap[0][0] < self._timer_at:
            self._schedule(heap[0][0])

    def clear(self) -> None:
        """Drop every deadline and the timer (the owner is closing)."""
        self._heap = []
        self._cancel_timer()

    def _schedule(self, when: float) -> None:
        self._cancel_timer()
        self._timer_at = when
        self._timer = self._clock.callLater(max(0.0, when - self._clock.seconds()), self._fire)

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        self._timer_at = float("inf")
        if timer is not None and timer.active():
            timer.cancel()

    def _compact(self) -> None:
        """Forget the entries of finished keys, so the heap stays as small as ``live``."""
        live = self._live
        self._heap = [entry for entry in self._heap if live.get(entry[2]) is entry[3]]
        heapq.heapify(self._heap)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        now = self._clock.seconds()
        live = self._live
        while self._heap and self._heap[0][0] <= now:  # an expire() may add, and compact the heap
            _, _, key, value = heapq.heappop(self._heap)
            if live.get(key) is value:
                self._expire(key, value)
        if self._heap and self._heap[0][0] < self._timer_at:
            self._schedule(self._heap[0][0])
