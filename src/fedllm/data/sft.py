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
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from fedllm.data.fpb import split_fractions
from fedllm.data.io import DataError, read_jsonl, require_file, write_jsonl_files

FORMATS = ("alpaca", "dolly", "oasst1")


def _read_parquet(path: Path, columns: tuple[str, ...]) -> list[dict[str, Any]]:
    require_file(path, "parquet file")
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except ImportError as exc:  # pragma: no cover - the hf extra installs pyarrow
        raise DataError("reading parquet needs pyarrow: pip install 'fedllm[hf]'") from exc
    except Exception as exc:
        raise DataError(f"{path} is not a readable parquet file ({exc})") from exc
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(columns)}")
    return table.select(list(columns)).to_pylist()


def _join(instruction: str, context: str, rng: random.Random) -> str:
    instruction, context = (instruction or "").strip(), (context or "").strip()
    if not context:
        return instruction
    return f"{instruction}\n\n{context}" if rng.random() < 0.5 else f"{context}\n\n{instruction}"


def convert_alpaca(path: Path, rng: random.Random) -> list[dict[str, str]]:
    rows = _read_parquet(path, ("instruction", "input", "output"))
    return [{"input": _join(r["instruction"], r["input"], rng), "output": (r["output"] or "").strip()} for r in rows]


def convert_dolly(path: Path, rng: random.Random) -> list[dict[str, str]]:
    rows = read_jsonl(path, required=("instruction", "context", "response"))
    return [{"input": _join(r["instruction"], r["context"], rng), "output": r["response"].strip()} for r in rows]


def convert_oasst1(path: Path, rng: random.Random, lang: str | None = "en") -> list[dict[str, str]]:
    """The top-ranked (rank 0) assistant reply to each prompter message becomes one pair; lower-ranked replies are dropped."""
    rows = _read_parquet(path, ("message_id", "parent_id", "role", "text", "lang", "rank"))
    by_id = {r["message_id"]: r for r in rows}
    pairs = []
    for row in rows:
        parent = by_id.get(row["parent_id"]) if row["parent_id"] else None
        if row["role"] != "assistant" or parent is None or parent["role"] != "prompter":
            continue
        if row["rank"] is None or int(row["rank"]) != 0:  # the seed keeps the best-ranked reply only
            continue
        if lang and row["lang"] != lang:
            continue
        pairs.append({"input": _join(parent["text"], "", rng), "output": row["text"].strip()})
    if not pairs:
        raise DataError(
            f"{path}: no prompter → rank-0 assistant pairs (lang={lang}); is this the OASST1 messages table "
            "(columns message_id, parent_id, role, text, lang, rank)?"
        )
    return pairs


def prepare_sft(
    fmt: str,
    input_path: Path,
    out_dir: Path,
    *,
    name: str | None = None,
    seed: int = 0,
    fractions=(0.8, 0.1, 0.1),
    extra_input: Path | None = None,
) -> dict[Path, int]:
    """Convert (input_path, then extra_input), shuffle (seeded), split and write {training,validation,testing}.jsonl."""
    converters = {"alpaca": convert_alpaca, "dolly": convert_dolly, "oasst1": convert_oasst1}
    if fmt not in converters:
        raise DataError(f"format {fmt!r} unknown; use one of {', '.join(FORMATS)}")
    rng = random.Random(seed)
    converted = converters[fmt](input_path, rng)
    if extra_input is not None:
        converted += converters[fmt](extra_input, rng)
    pairs = [p for p in converted if p["input"] and p["output"]]
    if len(pairs) < 3:
        raise DataError(f"{input_path}: {len(pairs)} usable example(s); need at least 3 for train/val/test")
    rng.shuffle(pairs)
    train_end, val_end = split_fractions(len(pairs), fractions)
    prefix = f"{name}_" if name else ""
    return write_jsonl_files(
        {
            out_dir / f"{prefix}training.jsonl": pairs[:train_end],
            out_dir / f"{prefix}validation.jsonl": pairs[train_end:val_end],
            out_dir / f"{prefix}testing.jsonl": pairs[val_end:],
        }
    )


def combine(inputs: list[Path], output: Path, seed: int = 0) -> int:
    """Concatenate (and shuffle) several sites' jsonl files: the centralized baseline's training set."""
    if not inputs:
        raise DataError("give at least one input file to combine")
    records = [r for path in inputs for r in read_jsonl(path)]
    random.Random(seed).shuffle(records)
    return write_jsonl_files({output: records})[output]
