"""The stages' injected reporter, as the CLI shows it: progress bars on a
terminal; plain log lines (``logging``, logger "apdkit") when stderr is a pipe
or a file, so logs hold no bar redraws. User text is never read as markup."""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

log = logging.getLogger("apdkit")
WARNING = "warning:"  # stage messages with this prefix are shown without -v


class RichReporter:
    """Progress bars; details (``message``) only when verbose, warnings always."""

    def __init__(self, enabled: bool = True, verbose: bool = False, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.verbose = verbose
        self.progress = Progress(
            TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}", markup=False),
            console=self.console, disable=not enabled,
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> "RichReporter":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def message(self, text: str) -> None:
        if self.enabled and (self.verbose or text.startswith(WARNING)):
            self.progress.console.print(Text(text), highlight=False)

    def start(self, task: str, total: int, done: int = 0) -> None:
        self.tasks[task] = self.progress.add_task(task, total=total, completed=done, info="")

    def advance(self, task: str, done: int, info: str = "") -> None:
        self.progress.update(self.tasks[task], completed=done, info=info)
        if self.verbose and info:
            self.progress.console.print(Text(f"{task} {done}: {info}"), highlight=False)

    def finish(self, task: str) -> None:
        self.progress.update(self.tasks[task], completed=self.progress.tasks[self.tasks[task]].total)


class LogReporter:
    """Plain lines: one per tenth of a task (every report with --verbose),
    INFO for progress, DEBUG for details; --quiet shows warnings only."""

    def __init__(self, quiet: bool = False, verbose: bool = False, stream=None):
        self.handler = logging.StreamHandler(stream or sys.stderr)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        self.level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
        self.totals: dict[str, int] = {}
        self.shown: dict[str, int] = {}  # tenths of each task already logged

    def __enter__(self) -> "LogReporter":
        log.addHandler(self.handler)
        log.setLevel(self.level)
        log.propagate = False
        return self

    def __exit__(self, *exc) -> None:
        log.removeHandler(self.handler)

    def message(self, text: str) -> None:
        (log.warning if text.startswith(WARNING) else log.debug)(text)

    def start(self, task: str, total: int, done: int = 0) -> None:
        self.totals[task] = total
        log.info(f"{task}: start at {done}/{total}")

    def advance(self, task: str, done: int, info: str = "") -> None:
        total = self.totals.get(task, 0)
        tenth = 10 * done // total if total else 0
        if tenth > self.shown.get(task, 0) or self.level <= logging.DEBUG:
            self.shown[task] = tenth
            log.info(f"{task}: {done}/{total}" + (f" {info}" if info else ""))

    def finish(self, task: str) -> None:
        log.info(f"{task}: done")


def make_reporter(quiet: bool, verbose: bool):
    if Console(stderr=True).is_terminal:
        return RichReporter(enabled=not quiet, verbose=verbose)
    return LogReporter(quiet=quiet, verbose=verbose)
