"""The unpadded vocabulary size, which decides the padded embedding rows at each TP size.

Megatron pads the embedding to a multiple of make_vocab_size_divisible_by × TP, so the real vocabulary
is not in the weights: it comes from --vocab-size, the config's vocab_size, or the tokenizer packed in
the archive, read as NeMo's tokenizers count it — a GPT-2 BPE vocab.json, a SentencePiece model (what
NeMo uses for Llama- and Nemotron-style models), or a Hugging Face tokenizer.json. A vocabulary whose
padding does not give the checkpoint's own row count cannot belong to it and is refused: trimming the
embedding to it would drop trained rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fedllm.checkpoint.archive import NemoArchive
from fedllm.checkpoint.config_fields import optional_positive_int, section
from fedllm.checkpoint.errors import CheckpointError
from fedllm.checkpoint.model_spec import ModelSpec


@dataclass(frozen=True)
class Vocabulary:
    size: int
    source: str  # where the size came from, for error messages


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def sentencepiece_size(model: bytes) -> int:
    """Pieces in a SentencePiece ModelProto (field 1, `repeated SentencePiece pieces`), read off the wire format.

    This is what sentencepiece's GetPieceSize() returns and NeMo's SentencePieceTokenizer reports as its
    vocabulary; reading the protobuf directly needs no sentencepiece install where checkpoints are converted.
    """
    pos = pieces = 0
    while pos < len(model):
        tag, pos = _varint(model, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _varint(model, pos)
        elif wire == 2:
            length, pos = _varint(model, pos)
            pos += length
            pieces += field == 1
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        if pos > len(model):
            raise ValueError("truncated field")
    if not pieces:
        raise ValueError("no pieces")
    return pieces


def _hf_tokenizer_size(data: dict[str, Any]) -> int:
    """len(tokenizer) of a tokenizer.json: the model's vocabulary plus added tokens beyond it."""
    ids = list((data.get("model") or {}).get("vocab", {}).values()) if isinstance(data.get("model"), dict) else []
    ids += [t["id"] for t in data.get("added_tokens") or [] if isinstance(t, dict) and "id" in t]
    if not ids or not all(isinstance(i, int) for i in ids):
        raise ValueError("no vocabulary")
    return max(ids) + 1


def _named_artifacts(names: list[str], reference: Any) -> list[str]:
    """The artifacts among `names` that a tokenizer config field names (e.g. "nemo:1a2b_tokenizer.model")."""
    if not isinstance(reference, str) or not reference:
        return []
    base = reference.removeprefix("nemo:").rsplit("/", 1)[-1]
    return [n for n in names if n.rsplit("/", 1)[-1] == base]


def vocabulary_from_archive(archive: NemoArchive) -> Vocabulary | None:
    """The tokenizer's vocabulary size from the archive's own tokenizer files; None when it has none."""
    tok: dict[str, Any] = section(archive.config, "tokenizer", str(archive.path))
    names = archive.artifact_names()
    readers = [
        (_named_artifacts(names, tok.get("vocab_file")) + [n for n in names if n.endswith("vocab.json")], "vocab"),
        (_named_artifacts(names, tok.get("model")) + [n for n in names if n.endswith(".model")], "spm"),
        ([n for n in names if n.endswith("tokenizer.json")], "hf"),
    ]
    for candidates, kind in readers:
        for name in dict.fromkeys(candidates):
            data = archive.read_member(name)
            try:
                if kind == "spm":
                    return Vocabulary(sentencepiece_size(data), f"the SentencePiece tokenizer {name}")
                parsed = json.loads(data)
                if kind == "vocab" and isinstance(parsed, dict) and parsed:
                    return Vocabulary(len(parsed), f"the tokenizer vocabulary {name}")
                if kind == "hf" and isinstance(parsed, dict):
                    return Vocabulary(_hf_tokenizer_size(parsed), f"the Hugging Face tokenizer {name}")
            except (ValueError, TypeError, AttributeError, KeyError, RecursionError):
                continue  # not a tokenizer file fedllm can count: try the next one
    return None


def resolve_vocab_size(archive: NemoArchive, override: int | None, padded_rows: int, spec: ModelSpec) -> int:
    """The true vocabulary (--vocab-size, else the config's vocab_size, else the archive's tokenizer).

    It must pad to exactly the checkpoint's `padded_rows` at the archive's TP: anything else means the
    tokenizer and the weights do not belong together.
    """
    configured = optional_positive_int(archive.config, "vocab_size", str(archive.path))
    if override:
        vocab: Vocabulary | None = Vocabulary(int(override), "--vocab-size")
    elif configured:
        vocab = Vocabulary(configured, "model_config.yaml field vocab_size")
    else:
        vocab = vocabulary_from_archive(archive)
    if vocab is None:
        tried = [n for n in archive.artifact_names() if n.endswith(("vocab.json", ".model", "tokenizer.json"))]
        found = f"{', '.join(tried)} cannot be read as a vocabulary" if tried else "no tokenizer artifact"
        raise CheckpointError(
            f"{archive.path}: cannot tell the unpadded vocabulary size ({found} — fedllm counts vocab.json, "
            f"SentencePiece .model, tokenizer.json — and no vocab_size in model_config.yaml); the "
            f"embedding has {padded_rows} padded rows. Fix: pass --vocab-size N (the tokenizer's vocabulary, e.g. "
            "50257 for GPT-2 BPE)"
        )
    multiple = spec.make_vocab_size_divisible_by * archive.tp
    expected = spec.padded_vocab_size(vocab.size, archive.tp)
    if expected != padded_rows:
        low = max(1, padded_rows - multiple + 1)
        raise CheckpointError(
            f"{archive.path}: {vocab.source} gives a vocabulary of {vocab.size}, which Megatron pads to {expected} "
            f"rows at tensor_model_parallel_size={archive.tp} (make_vocab_size_divisible_by="
            f"{spec.make_vocab_size_divisible_by}), but the checkpoint's embedding has {padded_rows} rows: this "
            "tokenizer does not belong to these weights, and fitting the embedding to it would drop trained rows. "
            f"Fix: use the checkpoint's own tokenizer, or pass --vocab-size N with N between {low} and {padded_rows}"
        )
    return vocab.size
