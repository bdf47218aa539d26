"""Progress of long loops (training epochs, evaluation, calibration, statistics, export), with the time left.

On a terminal: a rich bar, erased when the loop ends. Anywhere else (a cluster job's log, a
pipe, a file) no bar at all: rich's live display prints an empty line each time it stops
when the console is not a terminal, which filled redirected logs with blank lines (one per
epoch and per evaluation). Instead, one plain line every ``interval`` seconds::

    [eval SNN T≤64] 120/400 batches (30 %), 2m00s elapsed, about 4m40s left

The same lines go to the run's log.txt, terminal or not (:func:`reporting` names where).
A loop shorter than ``interval`` prints no line.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

__all__ = ["Progress", "reporting", "track"]


@dataclass(frozen=True)
class _Settings:
    interval: float = 30.0  # seconds between plain lines
    # write(line, to_console): the run's log (log.txt, and the console unless a bar shows there); None: print
    write: Callable[..., None] | None = None
    enabled: bool = True  # False on every process but the main one


_settings = _Settings()


@contextlib.contextmanager
def reporting(interval: float, write: Callable[..., None] | None = None, enabled: bool = True) -> Iterator[None]:
    """Within this block, progress lines come every ``interval`` seconds and go to ``write(line, console=...)``."""
    global _settings
    before = _settings
    _settings = replace(before, interval=interval, write=write, enabled=enabled)
    try:
        yield
    finally:
        _settings = before


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _on_terminal() -> bool:
    from rich.console import Console

    return Console().is_terminal


class Progress:
    """``with Progress(label, total) as p: ... p.advance(loss=…)``: a bar on a terminal, else a line every interval.

    ``fields`` (numbers, e.g. the running loss) are shown next to the count; ``completed``
    starts the count part-way (a resumed epoch); ``unit`` names what is counted.
    """

    def __init__(self, label: str, total: int, *, enabled: bool = True, completed: int = 0, unit: str = "",
                 fields: dict[str, float] | None = None):
        self.label, self.total, self.unit = label, int(total), unit
        self.enabled = enabled and _settings.enabled
        self.done = self.first = int(completed)
        self.fields = dict(fields or {})
        self.terminal = self.enabled and _on_terminal()
        self._bar = self._task = None

    def __enter__(self) -> Progress:
        self.started = self.last = time.monotonic()
        if self.terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            columns = [TextColumn(f"[{self.label}]", markup=False), BarColumn(), MofNCompleteColumn()]
            columns += [TextColumn(f"{key} {{task.fields[{key}]:.4f}}", markup=False) for key in self.fields]
            self._bar = Bar(*columns, TimeRemainingColumn(), transient=True)
            self._task = self._bar.add_task("", total=self.total, completed=self.done, **self.fields)
            self._bar.start()
        return self

    def advance(self, n: int = 1, **fields: float) -> None:
        self.done += n
        self.fields.update(fields)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, advance=n, **fields)
        now = time.monotonic()
        if now - self.last >= _settings.interval:
            self.last = now
            self._emit(self.line(now))

    def line(self, now: float | None = None) -> str:
        """``[label] done/total unit (pct), fields, elapsed, about … left``."""
        elapsed = (time.monotonic() if now is None else now) - self.started
        rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        count = f"{self.done}/{self.total}{' ' + self.unit if self.unit else ''}"
        parts = [f"{count} ({100 * self.done / max(self.total, 1):.0f} %)"]
        parts += [f"{key} {float(value):.4f}" for key, value in self.fields.items()]
        parts.append(f"{_duration(elapsed)} elapsed")
        left = max(self.total - self.done, 0)
        parts.append(f"about {_duration(left / rate)} left" if rate > 0 else "time left unknown yet")
        return f"[{self.label}] " + ", ".join(parts)

    def _emit(self, line: str) -> None:
        # On a terminal the bar already shows it: the line goes to log.txt only.
        if _settings.write is not None:
            _settings.write(line, console=not self.terminal)
        elif not self.terminal:
            print(line, flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


def track(items, label: str, *, unit: str = "", enabled: bool = True) -> Iterator:
    """``for item in track(items, label): ...``: a :class:`Progress` over a sized iterable, one step per item."""
    items = list(items)
    with Progress(label, len(items), unit=unit, enabled=enabled) as progress:
        for item in items:
            yield item
            progress.advance()
