"""Real NeMo runs for the tests in the NeMo environment (.venv-nemo): a tiny Megatron-GPT and site data.

The model is built and saved by NeMo itself (fedllm.apps.random_checkpoint --shape tiny, a subprocess: NeMo's
save_to starts processes that re-import their main module), once per test session and layout
(the `nemo_models` fixture in tests/conftest.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fedllm.data.io import write_jsonl_files
from fedllm.data.synthetic import sentiment_records, skewed_site_records

SEQ_LENGTH = 128
VOCAB = 400  # the SentencePiece model's pieces


def tiny_gpt(out: Path, text: Path, layout: str = "legacy") -> Path:
    """A random-weight tiny Megatron-GPT .nemo, built and saved by NeMo (legacy: per-rank; mcore: distributed)."""
    if not out.exists():
        subprocess.run(
            [
                sys.executable, "-m", "fedllm.apps.random_checkpoint", "--text", str(text), "--out", str(out),
                "--shape", "tiny", "--layout", layout, "--seq-length", str(SEQ_LENGTH), "--vocab-size", str(VOCAB),
            ],
            check=True, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    return out


def tiny_gpts(root: Path) -> dict[str, Path]:
    """The tiny GPT in both layouts, its tokenizer trained on the sentiment validation text."""
    text = sentiment_data(root / "data", ["site-1"])
    return {layout: tiny_gpt(root / f"{layout}.nemo", text, layout=layout) for layout in ("legacy", "mcore")}


def fedllm_cli(*args: str) -> subprocess.CompletedProcess:
    """The `fedllm` command as a user runs it (its own process: NeMo and its fixes stay out of the test's)."""
    return subprocess.run([sys.executable, "-m", "fedllm.cli.main", *args], capture_output=True, text=True, timeout=600)


def sentiment_data(root: Path, sites: list[str], per_site: int = 160, val: int = 48) -> Path:
    """Each site's label-skewed train.jsonl and the shared val.jsonl (FPB-like records); returns the val file."""
    parts = skewed_site_records(len(sites), per_site, 0.7, seed=0)
    val_records = sentiment_records(val, seed=99)
    files: dict[Path, list] = {root / "val.jsonl": val_records}
    for site, part in zip(sites, parts, strict=True):
        files[root / site / "train.jsonl"] = part
        files[root / site / "val.jsonl"] = val_records
    write_jsonl_files(files)
    return root / "val.jsonl"


def sft_data(root: Path, sites: list[str], per_site: int = 96, val: int = 32) -> None:
    """Each site's training.jsonl / validation.jsonl as {"input", "output"} (the sentiment task as SFT)."""

    def as_sft(records: list[dict]) -> list[dict]:
        return [{"input": f"{r['sentence']} sentiment:", "output": r["label"]} for r in records]

    val_records = as_sft(sentiment_records(val, seed=98))
    files: dict[Path, list] = {}
    for i, site in enumerate(sites):
        files[root / site / "training.jsonl"] = as_sft(sentiment_records(per_site, seed=10 + i))
        files[root / site / "validation.jsonl"] = val_records
    write_jsonl_files(files)
