"""One rule for what fedllm prints: its own words may carry a style, user data is printed verbatim.

Rich reads `[...]` as markup and `:name:` as an emoji code, so a path like `o[red]` or a certificate
fingerprint holding `:AB:` would change on its way to the terminal (`…:11:AB:F4:…` printed as
`…:11🆎F4:…`). fedllm's consoles interpret neither; its own styling is given as spans (`styled`),
never parsed out of a string that may hold a path, a name or a value.
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text


def make_console(*, stderr: bool = False) -> Console:
    """A console that prints strings as they are (no markup, no emoji codes, no highlighting).

    soft_wrap: long paths stay on one line when output goes to a pipe or a CI log.
    """
    return Console(stderr=stderr, highlight=False, soft_wrap=True, markup=False, emoji=False)


def styled(head: str, style: str, rest: str = "") -> Text:
    """`head` in `style` (fedllm's own word: "ok", "error:", "6/6"), then `rest` verbatim."""
    text = Text(head, style=style)
    text.append(rest)
    return text
