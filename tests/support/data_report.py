"""Reading back what a `fedllm data ...` command printed: items read, skipped and written per file.

The data commands account for every item they read (`read F: N rows[, C of them ...]`, `skipped K of the
N rows of F: reasons`, `wrote G (W records)`); tests check from this output alone that nothing was
dropped unsaid: for each command, read = context + skipped + written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

READ = re.compile(r"^read (?P<path>.+): (?P<n>\d+) (?P<unit>\w+)(?:, (?P<context>\d+) of them .+)?$")
SKIPPED = re.compile(r"^skipped (?P<n>\d+) of the (?P<of>\d+) (?P<unit>\w+) of (?P<path>.+?): (?P<reasons>.+)$")
WROTE = re.compile(r"^wrote (?P<path>.+) \((?P<n>\d+) records\)$")
REASON = re.compile(r"(\d+) ([^,]+)")


@dataclass
class Accounting:
    read: dict[str, int] = field(default_factory=dict)
    context: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, dict[str, int]] = field(default_factory=dict)
    wrote: dict[str, int] = field(default_factory=dict)

    def balanced(self) -> bool:
        """Every item read is written, used as context or reported skipped."""
        total_read = sum(self.read.values())
        return total_read == sum(self.context.values()) + sum(self.skipped.values()) + sum(self.wrote.values())


def accounting(text: str) -> Accounting:
    """The read/skipped/wrote lines of a data command's output."""
    result = Accounting()
    for line in text.splitlines():
        if m := READ.match(line):
            result.read[m["path"]] = int(m["n"])
            result.context[m["path"]] = int(m["context"] or 0)
        elif m := SKIPPED.match(line):
            assert result.read.get(m["path"]) == int(m["of"]), line
            result.skipped[m["path"]] = int(m["n"])
            reasons = {reason: int(n) for n, reason in REASON.findall(m["reasons"])}
            assert sum(reasons.values()) == int(m["n"]), line
            result.reasons[m["path"]] = reasons
        elif m := WROTE.match(line):
            result.wrote[m["path"]] = int(m["n"])
    return result
