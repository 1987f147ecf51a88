"""One p-tuning round and one LoRA epoch (SFTTrainer, bf16/fp16 autocast) on a GPU: step time and peak memory.

Skipped without a GPU.

Run on a GPU machine: pytest tests/training/test_gpu.py -s  (prints the measurements).
"""

from __future__ import annotations

import time

import pytest
import torch

from fedllm.data.synthetic import sentiment_records
from fedllm.flare.server_models import PeftPromptEncoderWeights
from fedllm.training.core import run_round
from fedllm.training.hf.ptuning import PTuningTask
from fedllm.training.hf.sft import build_trainer, parser

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


def _measure(label: str, task, state) -> dict:
    torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    _, metrics, steps = run_round(task, state, epochs=1, seed=0)
    torch.cuda.synchronize()
    seconds = time.monotonic() - started
    peak = torch.cuda.max_memory_allocated() / 2**20
    print(f"{label}: {steps} steps, {seconds / max(1, steps) * 1000:.1f} ms/step (incl. eval), peak {peak:.0f} MiB")
    return metrics


def test_ptuning_and_lora_rounds_on_gpu(tiny_gpt, tmp_path) -> None:
    device = torch.device("cuda:0")
    task = PTuningTask(str(tiny_gpt), sentiment_records(600, 1), sentiment_records(100, 2), lr=1e-2, device=device)
    metrics = _measure("p-tuning", task, PeftPromptEncoderWeights(96).state_dict())
    assert metrics["val_loss"] < metrics["global_val_loss"]
    pairs = [{"input": f"{r['sentence']} sentiment:", "output": r["label"]} for r in sentiment_records(300, 3)]
    args = parser("lora").parse_args(["--model", str(tiny_gpt), "--train", "-", "--val", "-", "--lr", "0.01"])
    args.model_path = str(tiny_gpt)
    trainer = build_trainer(args, "lora", pairs, pairs[:50], tmp_path)
    assert trainer.args.bf16 or trainer.args.fp16  # mixed precision on a GPU
    before = trainer.evaluate(metric_key_prefix="global_val")["global_val_loss"]
    torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    trainer.train()
    torch.cuda.synchronize()
    steps = trainer.state.global_step
    peak = torch.cuda.max_memory_allocated() / 2**20
    print(
        f"LoRA (SFTTrainer): {steps} steps, {(time.monotonic() - started) / steps * 1000:.1f} ms/step, peak {peak:.0f} MiB"
    )
    assert trainer.evaluate()["val_loss"] < before
