"""Config errors: every problem found in one pass, each with its file, line and dotted path."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a deployment config."""

    file: str
    """The file name as given to the loader (``<string>`` for text without a file)."""
    line: int
    """1-based line of the offending node; 0 when the problem has no single place."""
    path: str
    """Dotted path to the value, e.g. ``services[2].traffic_policy.retries.attempts``; '' for
    the whole document."""
    message: str
    """What is wrong, naming the offending value."""
    hint: str = ""
    """How to fix it; '' when the message already says so."""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        text = f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"
        return f"{text} ({self.hint})" if self.hint else text


class ConfigError(ValueError):
    """A config was refused; ``issues`` holds every problem found, in document order."""

    def __init__(self, issues: Iterable[ConfigIssue]) -> None:
        self.issues: tuple[ConfigIssue, ...] = tuple(
            sorted(issues, key=lambda i: (i.file, i.line, i.path))
        )
        if not self.issues:
            raise ValueError("ConfigError needs at least one issue")
        count = len(self.issues)
        head = f"{count} problem{'s' if count != 1 else ''} in config"
        super().__init__(head + ":\n" + "\n".join(str(i) for i in self.issues))
