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


def test_dp_lora_round_on_gpu(tiny_gpt, tmp_path) -> None:
    """DP-SGD for LoRA on the GPU (bf16 autocast where the GPU has it): the hooks see the adapter on its device
    (opacus#820: LoRA must change), every step has per-sample gradients (mostly-ai/mostlyai-engine#274), and ε
    is the ledger's."""
    from peft import get_peft_model_state_dict

    from fedllm.training.hf.sft import steps_per_round

    pairs = [{"input": f"{r['sentence']} sentiment:", "output": r["label"]} for r in sentiment_records(300, 3)]
    argv = ["--model", str(tiny_gpt), "--train", "-", "--val", "-", "--lr", "0.01"]
    args = parser("lora").parse_args([*argv, "--dp", "noise=1.0,clip=1.0,sample_rate=0.05,delta=1e-5"])
    args.model_path = str(tiny_gpt)
    trainer = build_trainer(args, "lora", pairs, pairs[:50], tmp_path)
    assert not trainer.args.fp16, "DP never trains in fp16"
    before = {k: v.clone() for k, v in get_peft_model_state_dict(trainer.model).items()}
    trainer.args.max_steps = steps_per_round(trainer, 1)
    torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    trainer.train()
    torch.cuda.synchronize()
    steps = trainer.dp_steps_taken
    peak = torch.cuda.max_memory_allocated() / 2**20
    precision = "bf16" if trainer.args.bf16 else "fp32"
    print(
        f"DP LoRA ({precision}): {steps} steps, {(time.monotonic() - started) / steps * 1000:.1f} ms/step, peak {peak:.0f} MiB"
    )
    assert steps == 20 and next(trainer.model.parameters()).is_cuda
    after = get_peft_model_state_dict(trainer.model)
    assert max((after[k].float() - before[k].float()).abs().max().item() for k in after) > 0
    assert trainer.dp_settle_round()["dp_steps_total"] == 20
