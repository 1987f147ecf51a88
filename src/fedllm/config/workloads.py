"""What each workload needs from a site's GPUs: one table for the site config's rules and GPU preflight.

The site config refuses a workload its site cannot run whatever the machine (too few GPUs listed);
preflight (fedllm.runtime.preflight) checks the rest on the host: free memory, bf16 capability.
Numbers carry their source. Memory figures come from fedllm.config.memory's estimate at the seeds' settings
where it agrees with what the seeds ran; where it does not, the seed's own figure is kept and the
disagreement is in docs/workloads.md ("Memory estimate").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedllm.config.memory import ModelSize, Workload, estimate


@dataclass(frozen=True)
class Need:
    """Per-site GPU needs: free memory on every GPU, how many GPUs, and whether bf16 is required."""

    free_gib_per_gpu: float
    min_gpus: int
    bf16: bool
    why: str


# bf16 needs compute capability >= 8.0 (Ampere and later).
BF16_MIN_CC = (8, 0)


def megatron_gpt(
    layers: int, hidden: int, heads: int, tp: int = 1, vocab: int = 50257, positions: int = 2048
) -> ModelSize:
    """A NeMo Megatron-GPT of NVIDIA's public checkpoints: GPT-2 BPE vocabulary (padded to 128 × TP), learned
    positions, 4h GELU MLP with biases, LayerNorm, tied output layer; legacy attention (the s×s scores stored)."""
    padded = math.ceil(vocab / (128 * tp)) * 128 * tp
    embedding = padded * hidden + positions * hidden
    per_layer = 12 * hidden * hidden + 13 * hidden  # QKV, dense, fc1, fc2 with biases; two LayerNorms
    return ModelSize(
        parameters=layers * per_layer + embedding + 2 * hidden,
        layers=layers,
        hidden=hidden,
        vocab=padded,
        heads=heads,
        embedding_parameters=embedding,
        tensor_parallel=tp,
        source="nemo-megatron-gpt",
        fused_attention=False,
    )


# The seeds' models (NVIDIA's nemo-megatron-gpt model cards) and their jobs' settings (jobs/nemo-*.yaml:
# bf16, micro-batch, max_seq_length, the TP of the checkpoint the seed uses).
SEED_ESTIMATES = {
    "gpt-345m-ptuning": (
        megatron_gpt(24, 1024, 16),
        Workload("ptuning", micro_batch=4, seq_len=1024, encoder_hidden=2048, backend="nemo"),
    ),
    "gpt-1.3b-sft": (megatron_gpt(24, 2048, 16), Workload("full", micro_batch=1, seq_len=2048, backend="nemo")),
    "gpt-5b-sft": (
        megatron_gpt(24, 4096, 32, tp=2),
        Workload("full", micro_batch=1, seq_len=2048, tensor_parallel=2, processes=2, backend="nemo"),
    ),
    "gpt-20b-ptuning-tp2": (
        megatron_gpt(44, 6144, 48, tp=2),
        Workload(
            "ptuning", micro_batch=4, seq_len=1024, encoder_hidden=2048, tensor_parallel=2, processes=2, backend="nemo"
        ),
    ),
}


def estimated_gib(workload: str) -> float:
    """The memory estimate of a seed workload at its job's settings, GiB per GPU rounded up to 0.1."""
    size, settings = SEED_ESTIMATES[workload]
    return math.ceil(estimate(size, settings).total * 10) / 10


NEEDS: dict[str, Need] = {
    "none": Need(0, 0, False, "no workload named in the site config: only presence checks"),
    "demo-mlp": Need(0, 0, False, "the CPU smoke job"),
    # NeMo prompt-learning notebook: three 345M sites fit on one 16 GB GPU → ~5 GiB each, fp16 is fine. The
    # estimate at max_seq_length 1024 (~13 GiB) would refuse that: the seed's short sentences are padded to the
    # batch's longest, not to 1024. The seed's figure stays.
    "gpt-345m-ptuning": Need(5, 1, False, "345M p-tuning (seed: 3 sites share a 16 GB GPU)"),
    # Seed SFT README: 1.3B SFT needs ~25 GB, Ampere or later; 3 sites on one A100-80GB. The estimate at
    # max_seq_length 2048 (~32 GiB) would refuse three on an 80 GB GPU (examples are padded to the batch's
    # longest, mostly far below 2048). The seed's figure stays.
    "gpt-1.3b-sft": Need(25, 1, True, "1.3B SFT (seed: ~25 GB, Ampere+)"),
    # Seed SFT README: 5B SFT needs ~100 GB, tested on 2 A100-80GB per site; the estimate at TP 2, micro-batch 1,
    # seq 2048 agrees (~50 GiB on each of 2 GPUs).
    "gpt-5b-sft": Need(
        estimated_gib("gpt-5b-sft"), 2, True, "5B SFT, TP 2 (estimate; seed: ~100 GB over 2 A100-80GB per site)"
    ),
    # Seed 20B p-tuning README: TP2 per site, "GPUs with 64 GB memory or more each (Ampere or later)"; the estimate
    # at TP 2, micro-batch 4, seq 1024 agrees (~64 GiB).
    "gpt-20b-ptuning-tp2": Need(
        estimated_gib("gpt-20b-ptuning-tp2"),
        2,
        True,
        "20B p-tuning, tensor parallel 2 (estimate; seed: 2 GPUs >= 64 GB, Ampere+)",
    ),
}


def gpu_shortfall(workload: str, gpus: int) -> str | None:
    """Why `gpus` GPUs cannot run `workload` at one site, or None if they are enough in number."""
    need = NEEDS[workload]
    if gpus >= need.min_gpus:
        return None
    return f"{workload} needs {need.min_gpus} GPU(s) per site ({need.why}); the site has {gpus}"
