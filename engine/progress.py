"""One progress bar for every long-running command: count, rate, ETA and a status line.

On a terminal it is a live rich bar. When the output goes to a file or a pipe (nohup, CI
logs, `tee`), a live bar shows nothing until the end, so a plain line with the same
figures is printed every `PLAIN_EVERY` seconds instead, and once more at the end.
"""

from __future__ import annotations

import time
from types import TracebackType

PLAIN_EVERY = 10.0  # seconds between plain progress lines


class ProgressBar:
    """A rich progress bar, plain progress lines, or nothing at all when `enabled` is false."""

    def __init__(self, label: str, total: int, enabled: bool = True, completed: int = 0) -> None:
        self.label, self.total, self.completed = label, total, completed
        self.enabled = enabled and total > 0
        self.status = ""

    def __enter__(self) -> ProgressBar:
        if not self.enabled:
            return self
        from rich.console import Console

        console = Console()
        self._plain = not console.is_terminal
        if self._plain:
            self._file = console.file
            self._start_count = self.completed
            self._start = self._last = time.monotonic()
            return self
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn(self.label),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
            console=console,
        )
        self._bar.__enter__()
        self._task = self._bar.add_task("", total=self.total, completed=self.completed)
        return self

    def update(
        self, completed: int | None = None, advance: int = 0, status: str | None = None
    ) -> None:
        """Set the count (or advance it) and optionally replace the status text."""
        if not self.enabled:
            return
        if completed is not None:
            self.completed = completed
        self.completed += advance
        if status is not None:
            self.status = status
        if self._plain:
            now = time.monotonic()
            if now - self._last >= PLAIN_EVERY:
                self._last = now
                self._print_line(now)
            return
        fields: dict = {"completed": self.completed}
        if status is not None:
            fields["description"] = status
        self._bar.update(self._task, **fields)

    def plain_line(self, now: float) -> str:
        """The progress as one line of text: count, share, elapsed, rate, ETA and status."""
        elapsed = now - self._start
        done = self.completed - self._start_count
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.completed) / rate if rate > 0 else None
        parts = [
            f"{self.label}: {self.completed:,}/{self.total:,}",
            f"({self.completed / self.total:.0%})",
            f"{_clock(elapsed)} elapsed",
        ]
        if left is not None:
            parts.append(f"{rate:,.1f}/s, {_clock(left)} left")
        line = " ".join(parts)
        return f"{line}  {self.status}" if self.status else line

    def _print_line(self, now: float) -> None:
        print(self.plain_line(now), file=self._file, flush=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.enabled:
            return
        if self._plain:
            self._print_line(time.monotonic())
        else:
            self._bar.__exit__(exc_type, exc, tb)


def _clock(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
