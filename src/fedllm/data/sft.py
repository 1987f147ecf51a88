"""Instruction-tuning sets → {"input", "output"} jsonl for SFT (and LoRA), as the seeds' scripts write.

- Alpaca (parquet: instruction, input, output)
- Dolly (jsonl: instruction, context, response, category)
- OASST1 (parquet message trees: message_id, parent_id, role, text, lang, rank): as the seed's
  preprocess_oasst1.py, only the top-ranked (rank 0) English assistant reply of each prompter message,
  with that prompter message as the input

Instruction and context are joined by "\\n\\n" in a seeded random order (the seeds' preprocessing
does the same, so the model sees both orders). Output: training.jsonl, validation.jsonl, testing.jsonl
(the seeds' names; with --name N: N_training.jsonl ...). A second file of the same format (the seed's
OASST1 validation parquet) is appended to the first before the shuffle and split, as the seed does.

Nothing is dropped without a word: an example without an instruction or an answer (null, missing or
blank), and an OASST1 reply the seed's rule leaves out, is counted under its reason in the file's
`SourceReport`, which the CLI prints; a file that gives no example at all is refused. A field of the
wrong type (a number where text belongs) is an error: the file is not what --format says.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedllm.data.fpb import split_fractions
from fedllm.data.io import (
    DataError,
    Prepared,
    SourceReport,
    read_jsonl_records,
    refuse_overwriting_inputs,
    refuse_repeated_inputs,
    require_file,
    require_output_file,
    require_output_folder,
    write_jsonl_files,
)

FORMATS = ("alpaca", "dolly", "oasst1")
Pair = dict[str, str]

# Parquet column kinds: what pyarrow type each column may have, in words for the error message.
TEXT, IDENTIFIER, NUMBER = "text", "text or integer", "a number"


def _kind_of(column_type) -> set[str]:
    import pyarrow as pa

    if pa.types.is_dictionary(column_type):
        column_type = column_type.value_type
    if pa.types.is_null(column_type):  # a column with only nulls
        return {TEXT, IDENTIFIER, NUMBER}
    if pa.types.is_string(column_type) or pa.types.is_large_string(column_type):
        return {TEXT, IDENTIFIER}
    if hasattr(pa.types, "is_string_view") and pa.types.is_string_view(column_type):
        return {TEXT, IDENTIFIER}
    if pa.types.is_integer(column_type):
        return {IDENTIFIER, NUMBER}
    if pa.types.is_floating(column_type):
        return {NUMBER}
    return set()


def _read_parquet(path: Path, columns: dict[str, str], fmt: str) -> list[dict[str, Any]]:
    """The rows of `columns` (name → kind); a column of another type is an error naming it."""
    require_file(path, "parquet file")
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - the hf extra installs pyarrow
        raise DataError("reading parquet needs pyarrow: pip install 'fedllm[hf]'") from exc
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several kinds (ArrowInvalid, OSError, ...) for damaged files
        first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"{path} is not a readable parquet file ({first_line}); --format {fmt} reads the dataset's parquet file"
        ) from exc
    names = table.column_names
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(columns)}")
    repeated = [c for c in columns if names.count(c) > 1]
    if repeated:
        raise DataError(f"{path}: column(s) {', '.join(repeated)} appear more than once; keep one of each")
    for column, kind in columns.items():
        column_type = table.schema.field(column).type
        if kind not in _kind_of(column_type):
            raise DataError(
                f"{path}: column {column!r} holds {column_type}, not {kind}; is this the {fmt} dataset's file?"
            )
    return table.select(list(columns)).to_pylist()


def _text(value: Any) -> str:
    """A text field's content; null counts as empty."""
    return (value or "").strip()


def _join(instruction: str, context: str, rng: random.Random) -> str:
    instruction, context = _text(instruction), _text(context)
    if not context:
        return instruction
    return f"{instruction}\n\n{context}" if rng.random() < 0.5 else f"{context}\n\n{instruction}"


def _empty(fields: dict[str, Any]) -> str | None:
    """The skip reason for an example whose required text fields are empty, or None."""
    empty = [name for name, value in fields.items() if not _text(value)]
    return f"with empty {' and '.join(empty)}" if empty else None


def _refuse_if_nothing(report: SourceReport, hint: str) -> None:
    """A file that yields no example is not what the user meant to convert."""
    if report.read == 0:
        raise DataError(f"{report.path} holds no {report.unit}; give the dataset's file")
    if report.kept == 0:
        raise DataError(
            f"{report.path}: none of its {report.read} {report.unit} gives an example ({report.reasons()}); {hint}"
        )


def convert_alpaca(path: Path, rng: random.Random) -> tuple[list[Pair], SourceReport]:
    rows = _read_parquet(path, {"instruction": TEXT, "input": TEXT, "output": TEXT}, "alpaca")
    report = SourceReport(path, "rows", read=len(rows))
    pairs = []
    for row in rows:
        reason = _empty({"instruction": row["instruction"], "output": row["output"]})
        if reason:
            report.skip(reason)
            continue
        pairs.append({"input": _join(row["instruction"], row["input"], rng), "output": _text(row["output"])})
    report.kept = len(pairs)
    _refuse_if_nothing(report, "Alpaca rows need an instruction and an output")
    return pairs, report


def convert_dolly(path: Path, rng: random.Random) -> tuple[list[Pair], SourceReport]:
    source = read_jsonl_records(path, required=("instruction", "context", "response"))
    report = SourceReport(path, "records", read=len(source.records))
    pairs = []
    for number, record in source.numbered():
        for name in ("instruction", "context", "response"):
            if record[name] is not None and not isinstance(record[name], str):
                raise DataError(
                    f"{path}:{number}: field {name!r} is {type(record[name]).__name__}, not text; "
                    "Dolly's instruction, context and response are strings"
                )
        reason = _empty({"instruction": record["instruction"], "response": record["response"]})
        if reason:
            report.skip(reason)
            continue
        pairs.append(
            {"input": _join(record["instruction"], record["context"], rng), "output": _text(record["response"])}
        )
    report.kept = len(pairs)
    _refuse_if_nothing(report, "Dolly records need an instruction and a response")
    return pairs, report


OASST1_COLUMNS = {"message_id": IDENTIFIER, "parent_id": IDENTIFIER, "role": TEXT, "text": TEXT, "lang": TEXT,
                  "rank": NUMBER}  # fmt: skip


def _reply_skip_reason(row: dict[str, Any], parent: dict[str, Any] | None, lang: str | None) -> str | None:
    """Why an assistant reply gives no pair (the seed's rule, then empty texts), or None."""
    if parent is None:
        return "replying to a message not in the file"
    if parent["role"] != "prompter":
        return "replying to a message that is not a prompter's"
    rank = row["rank"]
    if rank is None or (isinstance(rank, float) and math.isnan(rank)):
        return "unranked (rank null)"
    if rank != 0:
        return "ranked below the best reply (rank > 0)"
    if lang and row["lang"] != lang:
        return f"not in lang {lang}"
    if not _text(row["text"]):
        return "with empty text"
    if not _text(parent["text"]):
        return "replying to a prompt with empty text"
    return None


def convert_oasst1(path: Path, rng: random.Random, lang: str | None = "en") -> tuple[list[Pair], SourceReport]:
    """The top-ranked (rank 0) assistant reply to each prompter message becomes one pair; lower-ranked replies are dropped."""
    rows = _read_parquet(path, OASST1_COLUMNS, "oasst1")
    by_id: dict[Any, dict[str, Any]] = {}
    for row in rows:
        if row["message_id"] is None:
            continue
        if row["message_id"] in by_id:
            raise DataError(
                f"{path}: message_id {str(row['message_id'])[:60]!r} is on more than one row; "
                "OASST1 message ids are unique: is the file damaged or two files concatenated?"
            )
        by_id[row["message_id"]] = row
    report = SourceReport(
        path, "messages", read=len(rows), context_note="prompter messages (the inputs of the replies)"
    )
    pairs = []
    for row in rows:
        if row["role"] == "prompter":
            report.context += 1
            continue
        if row["role"] != "assistant":
            report.skip("with a role other than prompter or assistant")
            continue
        parent = by_id.get(row["parent_id"]) if row["parent_id"] is not None else None
        reason = _reply_skip_reason(row, parent, lang)
        if reason:
            report.skip(reason)
            continue
        pairs.append({"input": _join(parent["text"], "", rng), "output": _text(row["text"])})
    report.kept = len(pairs)
    if not rows:
        raise DataError(f"{path} holds no messages; give the OASST1 messages table")
    if not pairs:
        raise DataError(
            f"{path}: no prompter → rank-0 assistant pairs (lang={lang}) among its {report.read} messages"
            f"{' (' + report.reasons() + ')' if report.skipped else ''}; is this the OASST1 messages table "
            "(columns message_id, parent_id, role, text, lang, rank)?"
        )
    return pairs, report


CONVERTERS: dict[str, Callable[[Path, random.Random], tuple[list[Pair], SourceReport]]] = {
    "alpaca": convert_alpaca,
    "dolly": convert_dolly,
    "oasst1": convert_oasst1,
}


def prepare_sft(
    fmt: str,
    input_path: Path,
    out_dir: Path,
    *,
    name: str | None = None,
    seed: int = 0,
    fractions=(0.8, 0.1, 0.1),
    extra_input: Path | None = None,
) -> Prepared:
    """Convert (input_path, then extra_input), shuffle (seeded), split and write {training,validation,testing}.jsonl."""
    if fmt not in CONVERTERS:
        raise DataError(f"format {fmt!r} unknown; use one of {', '.join(FORMATS)}")
    require_output_folder(out_dir)
    prefix = f"{name}_" if name else ""
    outputs = [out_dir / f"{prefix}{part}.jsonl" for part in ("training", "validation", "testing")]
    inputs = [input_path] if extra_input is None else [input_path, extra_input]
    refuse_repeated_inputs(inputs)
    refuse_overwriting_inputs(outputs, inputs)
    rng = random.Random(seed)
    pairs: list[Pair] = []
    reports = []
    for path in inputs:
        converted, report = CONVERTERS[fmt](path, rng)
        pairs += converted
        reports.append(report)
    if len(pairs) < 3:
        raise DataError(f"{input_path}: {len(pairs)} usable example(s); need at least 3 for train/val/test")
    rng.shuffle(pairs)
    train_end, val_end = split_fractions(len(pairs), fractions)
    written = write_jsonl_files(
        dict(zip(outputs, (pairs[:train_end], pairs[train_end:val_end], pairs[val_end:]), strict=True))
    )
    return Prepared(written, reports)


def combine(inputs: list[Path], output: Path, seed: int = 0) -> Prepared:
    """Concatenate (and shuffle) several sites' jsonl files: the centralized baseline's training set.

    The files must hold one kind of record (the fields every record of a file has are the same in every
    file): mixing, say, p-tuning's {sentence, label} with SFT's {input, output} gives a file no trainer reads.
    """
    if not inputs:
        raise DataError("give at least one input file to combine")
    require_output_file(output)
    refuse_repeated_inputs(inputs)
    refuse_overwriting_inputs([output], inputs)
    sources = [read_jsonl_records(path) for path in inputs]
    fields = [set.intersection(*(set(r) for r in source.records)) for source in sources]
    for source, source_fields in zip(sources[1:], fields[1:], strict=True):
        if source_fields != fields[0]:
            raise DataError(
                f"{source.path}'s records have the fields {', '.join(sorted(source_fields)) or '(none in common)'}, "
                f"{sources[0].path}'s {', '.join(sorted(fields[0])) or '(none in common)'}: "
                "combine files of one format (e.g. every site's training.jsonl)"
            )
    records = [record for source in sources for record in source.records]
    random.Random(seed).shuffle(records)
    return Prepared(write_jsonl_files({output: records}), [source.report() for source in sources])
