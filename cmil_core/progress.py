"""Progress reporting shared by the command line and the dashboard.

Long work (the demo, ingest, training, scoring) takes a ``progress`` callback
and calls it with :class:`Progress` events: which stage of how many, how far
through that stage, and a short message. The command line passes a
:class:`TerminalProgress` (a bar on stderr); the dashboard passes a function
that moves ``st.progress``; tests pass a list's ``append``.

>>> events = []
>>> report = stage_reporter(events.append, stage="slides", index=2, stages=3)
>>> report(1, 4, "P001")
>>> events[0].overall
0.4166666666666667
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

__all__ = ["Progress", "ProgressCallback", "TerminalProgress", "no_progress", "stage_reporter"]


@dataclass(frozen=True)
class Progress:
    """Where a long job is: ``done`` of ``total`` items of stage ``index`` (1-based) of
    ``stages``."""

    stage: str
    index: int
    stages: int
    done: int
    total: int
    message: str = ""

    @property
    def fraction(self) -> float:
        """How far through the current stage, in [0, 1]."""
        return 1.0 if self.total <= 0 else min(1.0, max(0.0, self.done / self.total))

    @property
    def overall(self) -> float:
        """How far through the whole job, in [0, 1], counting stages as equal."""
        return min(1.0, ((self.index - 1) + self.fraction) / max(self.stages, 1))

    def describe(self) -> str:
        text = f"[{self.index}/{self.stages}] {self.stage}: {self.done}/{self.total}"
        return f"{text} {self.message}" if self.message else text


ProgressCallback = Callable[[Progress], None]


def no_progress(event: Progress) -> None:
    """A callback that ignores progress."""


def stage_reporter(
    callback: ProgressCallback, *, stage: str, index: int, stages: int
) -> Callable[[int, int, str], None]:
    """A ``report(done, total, message)`` function for one stage."""

    def report(done: int, total: int, message: str = "") -> None:
        callback(Progress(stage, index, stages, done, total, message))

    return report


class TerminalProgress:
    """A progress bar on a terminal; lines when not a terminal (a log, a pipe).

    On a terminal: one bar per stage, redrawn at most every ``interval``
    seconds and always at the end of a stage. Not on a terminal: one line
    when a stage ends (once, however often the work reports it finished), and,
    with ``heartbeat`` seconds, a line whenever that long has passed since the
    last one (call :meth:`tick` from a timer to get it even while the work
    reports nothing), so that a log shows the job is alive.

    Thread-safe: events and ticks may come from different threads.
    """

    def __init__(self, stream: TextIO | None = None, width: int = 30, interval: float = 0.1,
                 heartbeat: float | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.interval = interval
        self.heartbeat = heartbeat
        self._last = 0.0
        self._stage: tuple[int, str] | None = None
        self._stage_done = False
        self._event: Progress | None = None
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._started = time.monotonic()
        self._written = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self, event: Progress) -> None:
        with self._lock:
            self._handle(event)

    def tick(self) -> None:
        """Write the current stage again if ``heartbeat`` seconds passed without a line."""
        with self._lock:
            event = self._event
            if (self._tty or self.heartbeat is None or event is None or self._stage_done
                    or time.monotonic() - self._written < self.heartbeat):
                return
            self._line(f"{event.describe()} ({self._elapsed()})")

    def _elapsed(self) -> str:
        seconds = int(time.monotonic() - self._started)
        return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60:02d} s"

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
        self._written = time.monotonic()

    def _handle(self, event: Progress) -> None:
        now = time.monotonic()
        key = (event.index, event.stage)
        new_stage = key != self._stage
        finished = event.done >= event.total
        self._event = event
        if new_stage:
            if self._stage is not None and self._tty:
                self.stream.write("\n")
            self._stage = key
            self._stage_done = False
            self._started = now
        if not self._tty:
            if finished and not self._stage_done:
                # A stage's end is written once: a job may report 100 % twice (the last
                # fold of a cross-validation ends the stage, then the stage says "done").
                self._stage_done = True
                self._line(f"{event.describe()} ({now - self._started:.1f} s)")
            elif (not finished and self.heartbeat is not None
                  and now - self._written >= self.heartbeat):
                self._line(f"{event.describe()} ({self._elapsed()})")
            return
        if not (new_stage or finished or now - self._last >= self.interval):
            return
        self._last = now
        filled = round(self.width * event.fraction)
        bar = "#" * filled + "-" * (self.width - filled)
        line = (
            f"\r[{event.index}/{event.stages}] {event.stage:<16} |{bar}| "
            f"{event.done}/{event.total} {event.message[:30]:<30}"
        )
        self.stream.write(line)
        if finished and event.index == event.stages:
            self.stream.write("\n")
        self.stream.flush()
