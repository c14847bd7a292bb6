"""What tests share: one ``eventually``, one ``later``, and ``clocked`` for the in-memory harness."""

from __future__ import annotations

import functools
import gc
import platform
from typing import Any, Callable

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred

# CPython frees an object the moment its last reference goes; PyPy only when it collects.
REFCOUNTED = platform.python_implementation() == "CPython"


def collect_unless_refcounted() -> None:
    """Run a collection where nothing is freed without one (PyPy), before checking that something was freed.

    On CPython the "freed without the garbage collector" tests prove that no
    reference cycle holds a closed connection; on PyPy they still prove that
    nothing at all holds it.
    """
    if not REFCOUNTED:
        gc.collect()


def later(seconds: float, value: Any = None, clock: Any = reactor) -> Deferred:
    """Fires with ``value`` after ``seconds`` on ``clock`` (the real reactor unless told)."""
    return task.deferLater(clock, seconds, lambda: value)


async def eventually(condition: Callable[[], Any], timeout: float = 5.0, step: float = 0.005) -> None:
    """Wait (bounded) until ``condition()`` is true, over real TCP, for states no Deferred announces.

    Prefer awaiting a Deferred where one exists; on the in-memory harness use
    ``memory.flush()`` / ``memory.advance()`` instead.
    """
    for _ in range(int(timeout / step)):
        if condition():
            return
        await later(step)
    raise AssertionError(f"condition not met within {timeout} s")


def clocked(test: Callable[..., Any]) -> Callable[..., Any]:
    """Run an ``async def`` test on the ``memory`` fixture (a MemoryServer) and its clock.

    The test asks for ``memory`` like any fixture; its awaits are driven by
    ``memory.run``, so a timer of ten seconds costs nothing and durations
    can be asserted exactly (``memory.now()``).
    """

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> Any:
        return kwargs["memory"].run(test(*args, **kwargs))

    return run


async def within_turns(d: Deferred, turns: int = 3) -> Any:
    """The result of ``d``, which must fire within a few reactor turns: "at once", without a wall-clock bound.

    For outcomes that need no network round trip and no timer (a request
    failing because its connection is gone): counting turns is as strict as
    a stopwatch and never flakes on a loaded machine.
    """
    for _ in range(turns):
        if d.called:
            break
        await later(0)
    assert d.called, f"not settled within {turns} reactor turns"
    return await d


async def json_subscriber(memory: Any, broker_channel: Any, topic: str, group: Any = None, announcer: Any = None):
    """A subscriber that reads JSON only, as a Go provider does: it announces itself on the broker's
    channel (through ``announcer`` if given) and answers the broker's probe with a plain ``ok``.
    Returns the provider and the announcing consumer."""
    import uuid

    from pulsyflux import Consumer, Provider
    from pulsyflux.wire import messages

    channel = uuid.uuid4()
    provider = await memory.connect(Provider, channel)
    if announcer is None:
        announcer = await memory.connect(Consumer, broker_channel)
    fields = {"group": group} if group is not None else {}
    answer = announcer.send(messages.control(messages.SUBSCRIBE, topic=topic, channel=str(channel), **fields).encode())
    probe = await provider.receive()
    provider.respond(probe, b"ok")
    assert await answer == b"ok"
    return provider, announcer
