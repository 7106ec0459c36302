"""Progress bars for the stages' injected reporter (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RichReporter:
    def __init__(self, enabled: bool = True, verbose: bool = False):
        self.console = Console(stderr=True)
        self.enabled = enabled
        self.verbose = verbose
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=self.console, disable=not enabled,
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> "RichReporter":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def message(self, text: str) -> None:
        """Details: shown with -v only."""
        if self.enabled and self.verbose:
            self.progress.console.print(text, highlight=False)

    def start(self, task: str, total: int, done: int = 0) -> None:
        self.tasks[task] = self.progress.add_task(task, total=total, completed=done, info="")

    def advance(self, task: str, done: int, info: str = "") -> None:
        self.progress.update(self.tasks[task], completed=done, info=info)
        if self.verbose and info:
            self.progress.console.print(f"{task} {done}: {info}", highlight=False)

    def finish(self, task: str) -> None:
        self.progress.update(self.tasks[task], completed=self.progress.tasks[self.tasks[task]].total)
