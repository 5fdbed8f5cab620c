"""The progress line on stderr, and the library's warnings printed around it."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

import anyio

from ._cli_args import PROG

__all__ = ["Progress", "library_warnings_to"]


class Progress:
    """Progress on stderr: redrawn in place on a TTY, else a line every ``interval`` seconds."""

    def __init__(
        self, total: int, stream: TextIO, *, enabled: bool = True, interval: float | None = None
    ) -> None:
        self.total = total
        self.stream = stream
        self.enabled = enabled
        self.tty = enabled and _isatty(stream)
        self.interval = interval if interval is not None else (0.5 if self.tty else 10.0)
        self.started = time.monotonic()
        self.succeeded = 0
        self.failed = 0
        self.images = 0
        self._last_line = ""
        self._last_draw = -math.inf

    @property
    def done(self) -> int:
        return self.succeeded + self.failed

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _state(self) -> str:
        width = 24
        filled = width * self.done // self.total if self.total else width
        bar = "#" * filled + "." * (width - filled)
        failed = f", {self.failed} failed" if self.failed else ""
        return f"[{bar}] {self.done}/{self.total} done{failed}, {self.images} images saved"

    def line(self) -> str:
        return f"{self._state()}, {self.elapsed():.1f}s"

    def draw(self, *, force: bool = False) -> None:
        """Redraw (TTY, at most 20 times a second) or print a line (at most every ``interval``
        seconds, and only if something changed); ``force`` skips both limits."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force:
            if now - self._last_draw < (0.05 if self.tty else self.interval):
                return
            if not self.tty and self._state() == self._last_line.rpartition(", ")[0]:
                return
        line = self.line()
        if self.tty:
            self.stream.write("\r" + line.ljust(len(self._last_line)))
        else:
            self.stream.write(line + "\n")
        self._last_line = line
        self._last_draw = now
        self.stream.flush()

    def finish(self) -> None:
        if not self.enabled:
            return
        self.draw(force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def interject(self, text: str) -> None:
        """Print ``text`` on a line of its own, then redraw the progress line (on a TTY)."""
        if self.tty and self._last_line:
            self.stream.write("\r" + " " * len(self._last_line) + "\r")
        self.stream.write(text + "\n")
        if self.tty and self._last_line:
            self.stream.write(self._last_line)
        self.stream.flush()

    async def tick(self) -> None:
        """Redraw every ``interval`` seconds (the elapsed time moves) until cancelled."""
        while True:
            await anyio.sleep(self.interval)
            self.draw()


class _ProgressLogHandler(logging.Handler):
    """The library's warnings, each on its own line (never run into the progress line).

    The "submitted tasks not delivered" warning is dropped: the CLI says that itself,
    in CLI terms (what was paid, how to resume).
    """

    def __init__(self, progress: Progress) -> None:
        super().__init__(logging.WARNING)
        self.progress = progress
        self.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("txt2img_many stopped")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.progress.interject(self.format(record))
        except Exception:
            self.handleError(record)


@contextmanager
def library_warnings_to(progress: Progress) -> Iterator[None]:
    """Route ``novita_async`` warnings through ``progress`` while the run lasts."""
    logger = logging.getLogger("novita_async")
    handler = _ProgressLogHandler(progress)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
