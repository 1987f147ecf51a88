"""Fuzzing the commands that read user files: a malformed input ends in success or in fedllm's own error.

The rule every `tests/**/test_fuzz_*.py` checks with these helpers, whatever the input (truncated,
bit-flipped, wrong types, wrong encodings, empty, huge fields):

- the command ends with exit 0 (having reported every record it dropped), 1 (fedllm's own error: one
  `error: ...` message that says what, where and the fix) or 2 (a usage error), never with a traceback;
- a command that fails leaves no partial output: the files under the output folder are as they were,
  and no temp file is left behind.

The commands run in this process (`fedllm.cli.main.main`), so an exception fedllm does not turn into its
own error escapes into the test with its traceback. Hypothesis runs derandomized (the same examples on
every run, so CI is reproducible) and time-boxed by `FEDLLM_FUZZ_EXAMPLES` (examples per test);
`FEDLLM_FUZZ_EXPLORE=1` draws new examples each run, for hunting locally.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from fedllm.cli.main import main

FUZZ_SETTINGS = settings(
    max_examples=int(os.environ.get("FEDLLM_FUZZ_EXAMPLES", "40")),
    deadline=None,
    derandomize=os.environ.get("FEDLLM_FUZZ_EXPLORE") != "1",
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Files a writer leaves while it works (fedllm.fileio's atomic writers and staging folders).
TEMP_MARKERS = (".tmp", ".part", ".old")


@dataclass(frozen=True)
class Outcome:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def run_cli(args: list[str]) -> Outcome:
    """`fedllm ARGS` in this process, with what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return Outcome(code, out.getvalue(), err.getvalue())


def assert_clean(outcome: Outcome, *, allowed: tuple[int, ...] = (0, 1, 2)) -> None:
    """Success, fedllm's own error or a usage error; never a traceback or an error without its message."""
    context = f"exit {outcome.code}\nstdout:\n{outcome.out}\nstderr:\n{outcome.err}"
    assert "Traceback (most recent call last)" not in outcome.text, context
    assert outcome.code in allowed, context
    if outcome.code == 1:
        assert outcome.err.lstrip().startswith("error: "), context
        message = outcome.err.lstrip().removeprefix("error: ").strip()
        assert message and message not in {"Aborted.", "None", "''"}, context
        assert not any(line.lstrip().startswith('File "') for line in outcome.err.splitlines()), context
    elif outcome.code == 2:
        assert "Usage:" in outcome.err or "Error" in outcome.err, context


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path → content): what a failed command must leave as it was."""
    if not folder.exists():
        return {}
    if folder.is_file():
        return {folder.name: folder.read_bytes()}
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def temp_leftovers(folder: Path) -> list[str]:
    """Temp files or staging folders a writer left under `folder`."""
    if not folder.is_dir():
        return []
    return [
        p.relative_to(folder).as_posix()
        for p in folder.rglob(".*")
        if p.name.startswith(".") and (p.suffix in TEMP_MARKERS or ".tmp" in p.name or ".comb." in p.name)
    ]


def assert_no_partial_output(outcome: Outcome, folder: Path, before: dict[str, bytes]) -> None:
    """A failed command left `folder` as `before`; any command left no temp file in it."""
    assert not temp_leftovers(folder), f"temp files left in {folder}: {temp_leftovers(folder)}\n{outcome.text}"
    if outcome.code != 0:
        after = snapshot(folder)
        assert after == before, (
            f"a failed command changed {folder}: added {sorted(set(after) - set(before))}, "
            f"changed {sorted(k for k in before if k in after and after[k] != before[k])}\n{outcome.text}"
        )


@st.composite
def corrupted(draw, data: bytes) -> bytes:
    """`data` damaged one way: truncated, bit-flipped, bytes inserted or overwritten, emptied, or noise."""
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "overwrite", "empty", "noise"]))
    if kind == "empty" or not data:
        return b""
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(out)
    if kind == "insert":
        i = draw(st.integers(0, len(data)))
        return data[:i] + draw(st.binary(min_size=1, max_size=64)) + data[i:]
    if kind == "overwrite":
        i = draw(st.integers(0, len(data) - 1))
        chunk = draw(st.binary(min_size=1, max_size=64))
        return data[:i] + chunk + data[i + len(chunk) :]
    return draw(st.binary(max_size=512))


def json_values(max_leaves: int = 8) -> st.SearchStrategy:
    """Any JSON value: what a field of the wrong type may hold."""
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
        max_leaves=max_leaves,
    )
