"""LoRA (PEFT) on {"input", "output"} sets: only the adapter trains and crosses the wire (see sft.py)."""

from __future__ import annotations

from fedllm.training.hf.sft import main_for


def main(argv: list[str] | None = None) -> None:
    main_for("lora", argv)
