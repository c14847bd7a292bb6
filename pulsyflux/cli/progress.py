"""The progress bar ``pulsyflux bench`` draws on a terminal."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

__all__ = ["ProgressBar"]


_BLOCK = 4  # cells of the moving block while a single run is measured


class ProgressBar:
    """One redrawn line on a terminal: a bar, the step, the elapsed time.

    The benchmarks report progress as messages; "run N/M" moves the bar.
    """

    _RUN = re.compile(r"\brun (\d+)/(\d+)\b")

    def __init__(self, stream: TextIO, reactor: IReactorTime) -> None:
        from twisted.internet.task import LoopingCall

        self.stream = stream
        self.clock = reactor
        self.started = reactor.seconds()
        self.fraction = 0.0
        self.run = self.runs = 0
        self.message = "starting"
        self.ticker = LoopingCall(self.draw)
        self.ticker.clock = reactor
        self.ticker.start(0.25)

    def __call__(self, message: str) -> None:
        match = self._RUN.search(message)
        if match:
            self.run, self.runs = int(match.group(1)), int(match.group(2))
            self.fraction = (self.run - 1) / self.runs if self.runs else 0.0
        elif self.runs:
            self.fraction = self.run / self.runs  # a run's result line: that run is done
        self.message = message
        self.draw()

    def draw(self) -> None:
        import shutil

        width = shutil.get_terminal_size((80, 24)).columns
        cells = 24
        elapsed = self.clock.seconds() - self.started
        if self.runs == 1 and self.fraction < 1:
            # One run: nothing to count until it ends, so show it is working (a block going to and fro).
            span = cells - _BLOCK
            step = int(elapsed * 8) % (2 * span)
            at = step if step < span else 2 * span - step
            bar = "." * at + "#" * _BLOCK + "." * (span - at)
        else:
            filled = int(self.fraction * cells)
            bar = "#" * filled + "." * (cells - filled)
        head = f"[{bar}] {elapsed:5.1f}s "
        line = (head + self.message)[: max(width - 1, 10)]
        try:
            self.stream.write("\r\x1b[K" + line)
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        if self.ticker.running:
            self.ticker.stop()
        try:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        except (OSError, ValueError):
            pass
