"""jsonl in and out: every line checked as it is read, files written all-or-nothing, every drop accounted.

Reading: each line must be UTF-8 and one JSON object (with the `required` fields, no field twice); the
first line that is not stops the tool with the file, the line number as an editor shows it and the fix.
Writing: all files of a command appear together or none does (fedllm.fileio's temp files, then
renames), with the mode the umask gives any new file, so a container running as another user reads
them. Accounting: a tool that skips part of its input says so in a `SourceReport` (read = kept +
context + skipped, per reason); the CLI prints it, and a file that yields nothing is refused.
"""

from __future__ import annotations

import codecs
import contextlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedllm.errors import FedllmError
from fedllm.fileio import atomic_path

PARQUET_MAGIC = b"PAR1"


class DataError(FedllmError):
    """Input data is missing or malformed; the message names the file and the fix."""


@dataclass
class SourceReport:
    """What a tool made of one input file: each unit read was kept, used as context, or skipped for a reason."""

    path: Path
    unit: str  # what one read item is: "records", "rows", "messages", "sentences"
    read: int = 0
    kept: int = 0
    context: int = 0  # items used to build others without being one (OASST1's prompter messages)
    context_note: str = ""
    skipped: Counter[str] = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    @property
    def dropped(self) -> int:
        return sum(self.skipped.values())

    def reasons(self) -> str:
        """'6 with empty output, 4 with empty instruction': most frequent first."""
        ordered = sorted(self.skipped.items(), key=lambda item: (-item[1], item[0]))
        return ", ".join(f"{count} {reason}" for reason, count in ordered)


@dataclass(frozen=True)
class Prepared:
    """A data command's outcome: records written per file, and what became of each input."""

    written: dict[Path, int]
    sources: list[SourceReport]
    stale: list[Path] = field(default_factory=list)  # files in the output folder this run did not write


@dataclass(frozen=True)
class JsonlRecords:
    """The records of one jsonl file with the line each came from (blank lines are not records)."""

    path: Path
    records: list[dict[str, Any]]
    lines: list[int]

    def numbered(self) -> Iterator[tuple[int, dict[str, Any]]]:
        return zip(self.lines, self.records, strict=True)

    def report(self) -> SourceReport:
        n = len(self.records)
        return SourceReport(self.path, "records", read=n, kept=n)


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what} {path} not found; check the path (it must be a file)")
    return path


def require_output_folder(path: Path, option: str = "--out") -> Path:
    """An output folder that is not a file (checked before any input is read)."""
    if path.exists() and not path.is_dir():
        raise DataError(f"{option} {path} is a file; give a folder for the output files (it is created if missing)")
    return path


def require_output_file(path: Path, option: str = "--out") -> Path:
    """An output file path that is not a folder (checked before any input is read)."""
    if path.is_dir():
        raise DataError(f"{option} {path} is a folder; give the output file's path (e.g. {path / 'training.jsonl'})")
    return path


def refuse_overwriting_inputs(outputs: Iterable[Path], inputs: Iterable[Path]) -> None:
    """An output that is one of the inputs would replace data the user still needs."""
    sources = {_identity(p): p for p in inputs}
    for output in outputs:
        source = sources.get(_identity(output))
        if source is not None:
            raise DataError(
                f"the output {output} is the input {source}: writing it would replace the input; choose another --out"
            )


def refuse_repeated_inputs(inputs: Iterable[Path]) -> None:
    """The same file given twice would put each of its records in the output twice."""
    seen: dict[Path, Path] = {}
    for path in inputs:
        key = _identity(path)
        if key in seen:
            also = f" (also as {seen[key]})" if str(seen[key]) != str(path) else ""
            raise DataError(f"{path} is given twice{also}; give each file once")
        seen[key] = path


def _identity(path: Path) -> Path:
    return Path(path).resolve()


class _DuplicateField(ValueError):
    pass


def _unique_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) != len(pairs):
        repeated = next(key for key, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise _DuplicateField(repeated)
    return record


def _parse_line(path: Path, number: int, raw: bytes) -> Any:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}:{number}: not UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line); "
            "jsonl files are UTF-8: convert it (e.g. iconv -f latin1 -t utf-8)"
        ) from exc
    try:
        return json.loads(line, object_pairs_hook=_unique_fields)
    except _DuplicateField as exc:
        raise DataError(
            f"{path}:{number}: field {str(exc)[:40]!r} appears twice in one record; keep one of them"
        ) from exc
    except RecursionError as exc:
        raise DataError(f"{path}:{number}: JSON nested too deeply to read; each line must be one record") from exc
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc).split(";")[0]
        raise DataError(f"{path}:{number}: not valid JSON ({reason}); each line must be one JSON object") from exc


def read_jsonl_records(path: Path, required: Iterable[str] = ()) -> JsonlRecords:
    """Every record of a jsonl file, with its line number; every record an object with the `required` fields."""
    require_file(path, "data file")
    required = tuple(required)
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    try:
        with path.open("rb") as handle:
            if handle.read(len(PARQUET_MAGIC)) == PARQUET_MAGIC:
                raise DataError(
                    f"{path} is a parquet file, not jsonl (one JSON object per line); "
                    "convert it first (Alpaca and OASST1 parquet: `fedllm data sft --format alpaca|oasst1`)"
                )
            handle.seek(0)
            for number, raw in enumerate(handle, start=1):
                if number == 1:
                    raw = raw.removeprefix(codecs.BOM_UTF8)
                if not raw.strip(b" \t\r\n"):
                    continue
                record = _parse_line(path, number, raw)
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{number}: expected a JSON object per line, got {type(record).__name__}")
                missing = [k for k in required if k not in record]
                if missing:
                    raise DataError(
                        f"{path}:{number}: missing field(s) {', '.join(missing)}; records need {', '.join(required)}"
                    )
                records.append(record)
                lines.append(number)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}; check its permissions") from exc
    if not records:
        raise DataError(f"{path} holds no records; give a non-empty jsonl file")
    return JsonlRecords(path, records, lines)


def read_jsonl(path: Path, required: Iterable[str] = ()) -> list[dict[str, Any]]:
    """All records of a jsonl file; every record must be an object with the `required` keys."""
    return read_jsonl_records(path, required).records


# Characters that str.splitlines() and some editors take for line ends; json.dumps leaves them raw.
LINE_SEPARATORS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def jsonl_line(record: Mapping[str, Any]) -> str:
    """One record as one line, whatever splits it: UTF-8 text as is, except characters some readers take
    for line ends (escaped); a string that is not valid Unicode (a lone surrogate, read from a `\\ud800`
    escape) keeps its escape, so the line holds the record read."""
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(record) + "\n"
    if any(c in line for c in LINE_SEPARATORS):
        line = line.translate(str.maketrans(LINE_SEPARATORS))
    return line + "\n"


def _check_target(path: Path) -> None:
    for folder in (path.parent, *path.parent.parents):
        if folder.exists():
            if not folder.is_dir():
                raise DataError(f"cannot write {path}: {folder} is a file, not a folder; choose another --out")
            break
    if path.is_dir():
        raise DataError(f"cannot write {path}: it is a folder; choose another --out")


def write_jsonl_files(files: Mapping[Path, Iterable[Mapping[str, Any]]]) -> dict[Path, int]:
    """Write several jsonl files so that either all of them appear or none (temp files, then renames).

    Returns the number of records written per file.
    """
    for path in files:
        _check_target(path)
    counts: dict[Path, int] = {}
    target = "the output files"
    try:
        with contextlib.ExitStack() as stack:  # on leaving it, every temp file is renamed (or, on error, removed)
            for path, records in files.items():
                target = str(path)
                temp = stack.enter_context(atomic_path(path))
                with temp.open("w", encoding="utf-8", newline="\n") as handle:
                    n = 0
                    for record in records:
                        handle.write(jsonl_line(record))
                        n += 1
                counts[path] = n
            target = "the output files"
    except OSError as exc:
        raise DataError(
            f"cannot write {target}: {exc.strerror or exc}; check that the folder is writable and has space"
        ) from exc
    return counts
