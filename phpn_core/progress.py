"""A rich progress bar over a known number of steps that does nothing when disabled (the training loops' bar)."""

from __future__ import annotations

__all__ = ["StepProgress"]


class StepProgress:
    """``with StepProgress(enabled=..., total=n, description=...) as bar: ... bar.advance(status)``; rich is
    imported only when enabled."""

    def __init__(self, *, enabled: bool, total: int, description: str) -> None:
        self.enabled, self.total, self.description = enabled, total, description
        self._p = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._p = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"), transient=False,
            )
            self._p.__enter__()
            self._task = self._p.add_task(self.description, total=self.total, status="")
        return self

    def advance(self, status: str) -> None:
        if self._p is not None:
            self._p.update(self._task, advance=1, status=status)

    def __exit__(self, *exc) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)
