"""One p-tuning and one LoRA round on a GPU: step time and peak GPU memory (skipped without a GPU).

Run on a GPU machine: pytest tests/training/test_gpu.py -s  (prints the measurements).
"""

from __future__ import annotations

import time

import pytest
import torch

from fedllm.data.synthetic import sentiment_records
from fedllm.flare.server_models import LoraAdapterWeights, PeftPromptEncoderWeights
from fedllm.training.core import run_round
from fedllm.training.hf.ptuning import PTuningTask
from fedllm.training.hf.sft import SFTTask

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


def test_ptuning_and_lora_rounds_on_gpu(tiny_gpt) -> None:
    device = torch.device("cuda:0")
    task = PTuningTask(str(tiny_gpt), sentiment_records(600, 1), sentiment_records(100, 2), lr=1e-2, device=device)
    metrics = _measure("p-tuning", task, PeftPromptEncoderWeights(96).state_dict())
    assert metrics["val_loss"] < metrics["global_val_loss"]
    pairs = [{"input": r["sentence"], "output": r["label"]} for r in sentiment_records(300, 3)]
    lora = SFTTask(str(tiny_gpt), pairs, pairs[:50], method="lora", lr=3e-3, device=device)
    metrics = _measure("LoRA", lora, LoraAdapterWeights(str(tiny_gpt)).state_dict())
    assert metrics["val_loss"] < metrics["global_val_loss"]
