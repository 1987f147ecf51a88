"""The unpadded vocabulary size, which decides the padded embedding rows at each TP size."""

from __future__ import annotations

import json
from typing import Any

from fedllm.checkpoint.archive import NemoArchive
from fedllm.checkpoint.errors import CheckpointError


def vocab_size_from_archive(archive: NemoArchive) -> int | None:
    """Count the tokenizer's entries from a vocab.json artifact (GPT-2 BPE); None when there is none."""
    tok: dict[str, Any] = archive.config.get("tokenizer") or {}
    candidates = []
    vocab_file = tok.get("vocab_file")
    if isinstance(vocab_file, str) and vocab_file:
        base = vocab_file.removeprefix("nemo:").rsplit("/", 1)[-1]
        candidates += [n for n in archive.artifact_names() if n.rsplit("/", 1)[-1] == base]
    candidates += [n for n in archive.artifact_names() if n.endswith("vocab.json") and n not in candidates]
    for name in candidates:
        try:
            vocab = json.loads(archive.read_member(name))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(vocab, dict) and vocab:
            return len(vocab)
    return None


def resolve_vocab_size(archive: NemoArchive, override: int | None, padded_rows: int) -> int:
    """The true vocabulary: --vocab-size, else the config's vocab_size, else the tokenizer's vocab.json."""
    found = override or archive.config.get("vocab_size") or vocab_size_from_archive(archive)
    if not found:
        raise CheckpointError(
            f"{archive.path}: cannot tell the unpadded vocabulary size (no vocab.json tokenizer artifact and no "
            f"vocab_size in model_config.yaml); the embedding has {padded_rows} padded rows — pass --vocab-size N "
            "(the tokenizer's vocabulary, e.g. 50257 for GPT-2 BPE)"
        )
    found = int(found)
    if found > padded_rows:
        raise CheckpointError(
            f"{archive.path}: vocabulary size {found} is larger than the embedding's {padded_rows} rows; "
            "pass the right --vocab-size"
        )
    return found
