"""Configuration problems that name the file, the line, the field and the fix.

Every validator in fedllm reports through these types so that a user who runs
`fedllm validate` sees *all* problems at once, each one actionable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedllm.errors import FedllmError


class FixableError(ValueError):
    """A validation error that knows how to be fixed.

    Raised inside pydantic validators; the loader unwraps it so the fix text
    survives pydantic's error wrapping.
    """

    def __init__(self, message: str, fix: str):
        super().__init__(message)
        self.message = message
        self.fix = fix


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config file."""

    file: str
    field: str
    message: str
    fix: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        field = f" {self.field}:" if self.field else ""
        return f"{where}:{field} {self.message}. Fix: {self.fix}"


class ConfigError(FedllmError):
    """Raised when a config file has one or more problems; str() lists them all."""

    def __init__(self, problems: list[Problem], kind: str = "site config"):
        self.problems = problems
        self.kind = kind
        super().__init__(self.render())

    def render(self) -> str:
        files = sorted({p.file for p in self.problems})
        head = f"{len(self.problems)} problem(s) in {self.kind} {', '.join(files)}:"
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


def clip(text: str, limit: int = 60) -> str:
    """`text` shortened to `limit` characters: a problem quotes what it found, not megabytes of it."""
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def display_path(path: Path | str) -> str:
    """Show paths relative to the working directory when they are below it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)
