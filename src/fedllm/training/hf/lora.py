"""LoRA (PEFT) on {"input", "output"} sets: only the adapter trains and crosses the wire (see sft.py)."""

from __future__ import annotations

import argparse

from fedllm.training.hf.sft import main_for, parser


def argument_parser() -> argparse.ArgumentParser:
    """LoRA's arguments (`fedllm job create` checks a job's against them)."""
    return parser("lora")


def main(argv: list[str] | None = None) -> None:
    main_for("lora", argv)
