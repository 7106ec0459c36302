"""How stages tell the outside world what they are doing: an injected
reporter. The CLI passes one that draws progress bars; tests pass nothing."""

from __future__ import annotations

from typing import Protocol


class Reporter(Protocol):
    def message(self, text: str) -> None: ...

    def start(self, task: str, total: int, done: int = 0) -> None: ...

    def advance(self, task: str, done: int, info: str = "") -> None: ...

    def finish(self, task: str) -> None: ...


class SilentReporter:
    def message(self, text: str) -> None:
        pass

    def start(self, task: str, total: int, done: int = 0) -> None:
        pass

    def advance(self, task: str, done: int, info: str = "") -> None:
        pass

    def finish(self, task: str) -> None:
        pass
