"""jsonl in and out: records read with clear errors, files written all-or-nothing."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedllm.errors import FedllmError


class DataError(FedllmError):
    """Input data is missing or malformed; the message names the file and the fix."""


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what} {path} not found; check the path (it must be a file)")
    return path


def read_jsonl(path: Path, required: Iterable[str] = ()) -> list[dict[str, Any]]:
    """All records of a jsonl file; every record must be an object with the `required` keys."""
    require_file(path, "data file")
    required = tuple(required)
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{number}: not valid JSON ({exc.msg}); each line must be one JSON object"
                ) from exc
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object per line, got {type(record).__name__}")
            missing = [k for k in required if k not in record]
            if missing:
                raise DataError(
                    f"{path}:{number}: missing field(s) {', '.join(missing)}; records need {', '.join(required)}"
                )
            records.append(record)
    if not records:
        raise DataError(f"{path} holds no records; give a non-empty jsonl file")
    return records


def write_jsonl_files(files: Mapping[Path, Iterable[Mapping[str, Any]]]) -> dict[Path, int]:
    """Write several jsonl files so that either all of them appear or none (temp files, then renames).

    Returns the number of records written per file.
    """
    staged: list[tuple[Path, Path]] = []
    counts: dict[Path, int] = {}
    try:
        for path, records in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            staged.append((Path(tmp), path))
            n = 0
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                for record in records:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                    n += 1
            counts[path] = n
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in staged:
        tmp.replace(path)
    return counts
