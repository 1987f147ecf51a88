"""What each workload needs from a site's GPUs: one table for the site config's rules and GPU preflight.

The site config refuses a workload its site cannot run whatever the machine (too few GPUs listed);
preflight (fedllm.runtime.preflight) checks the rest on the host: free memory, bf16 capability.
Numbers carry their source.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Need:
    """Per-site GPU needs: free memory on every GPU, how many GPUs, and whether bf16 is required."""

    free_gib_per_gpu: float
    min_gpus: int
    bf16: bool
    why: str


# bf16 needs compute capability >= 8.0 (Ampere and later).
BF16_MIN_CC = (8, 0)

NEEDS: dict[str, Need] = {
    "none": Need(0, 0, False, "no workload named in the site config: only presence checks"),
    "demo-mlp": Need(0, 0, False, "the CPU smoke job"),
    # NeMo prompt-learning notebook: three 345M sites fit on one 16 GB GPU → ~5 GiB each, fp16 is fine.
    "gpt-345m-ptuning": Need(5, 1, False, "345M p-tuning (seed: 3 sites share a 16 GB GPU)"),
    # Seed SFT README: 1.3B SFT needs ~25 GB of GPU memory, Ampere or later.
    "gpt-1.3b-sft": Need(25, 1, True, "1.3B SFT (seed: ~25 GB, Ampere+)"),
    # Seed SFT README: 5B SFT needs ~100 GB, tested on 2 A100-80GB per site → 50 GiB on each of 2 GPUs.
    "gpt-5b-sft": Need(50, 2, True, "5B SFT (seed: ~100 GB over 2 A100-80GB per site)"),
    # Seed 20B p-tuning README: TP2 per site, "GPUs with 64 GB memory or more each (Ampere or later)".
    "gpt-20b-ptuning-tp2": Need(64, 2, True, "20B p-tuning, tensor parallel 2 (seed: 2 GPUs >= 64 GB, Ampere+)"),
}


def gpu_shortfall(workload: str, gpus: int) -> str | None:
    """Why `gpus` GPUs cannot run `workload` at one site, or None if they are enough in number."""
    need = NEEDS[workload]
    if gpus >= need.min_gpus:
        return None
    return f"{workload} needs {need.min_gpus} GPU(s) per site ({need.why}); the site has {gpus}"
