"""One progress bar for every long-running command: count, rate, ETA and a status line."""

from __future__ import annotations

from types import TracebackType


class ProgressBar:
    """A rich progress bar, or nothing at all when `enabled` is false."""

    def __init__(self, label: str, total: int, enabled: bool = True, completed: int = 0) -> None:
        self.label, self.total, self.completed = label, total, completed
        self.enabled = enabled and total > 0

    def __enter__(self) -> ProgressBar:
        if self.enabled:
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
        fields: dict = {} if status is None else {"description": status}
        if completed is not None:
            fields["completed"] = completed
        if advance:
            fields["advance"] = advance
        self._bar.update(self._task, **fields)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.enabled:
            self._bar.__exit__(exc_type, exc, tb)
