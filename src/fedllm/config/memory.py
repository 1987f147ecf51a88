"""How much GPU memory one training process needs, before anything runs: the per-site "fit before running".

A pure formula over a model's shape and the job's settings (no torch): `job create` chooses each site's
micro-batch with it (`fit`), the site config's workload table (fedllm.config.workloads) and GPU preflight
take their figures from it. It lives beside the site config because both sides of the operator's tools
use it; `fedllm.jobs.memory` adds the reading of a model's shape from its files.

The formula (docs/workloads.md, "Memory estimate"), per GPU, in bytes:

- weights: full SFT keeps fp32 weights (fedllm's HF trainers load fp32 and autocast; its NeMo SFT sets
  megatron_amp_O2 false, the same): 4 B/param. LoRA and p-tuning freeze the base: fp32 in fedllm's HF
  trainers, the training precision in NeMo (MegatronGPTPromptLearningModel casts the frozen GPT to the
  autocast dtype); QLoRA's base is NF4 with double quantization (0.5 B/param + ~1/64 B of block
  constants) except the embeddings and output layer, which prepare_model_for_kbit_training keeps in fp32.
  Trainable parameters (all for full SFT, the adapter or prompt encoder otherwise) are fp32.
- gradients: 4 B per trainable param (+4 more for DDP's gradient buckets when an HF site runs several
  data-parallel processes: PyTorch's DDP copies gradients into buckets unless gradient_as_bucket_view).
- optimizer: AdamW's two fp32 moments, 8 B per trainable param. Weights, gradients and optimizer divide
  by the tensor-parallel size.
- activations, per layer at 16-bit (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", eq. 2 with tensor parallelism t and no sequence parallelism):
  s·b·h·(10 + 24/t) + 5·a·s²·b/t bytes; the s² term is the attention scores that fused (flash /
  memory-efficient) attention never stores (PyTorch's SDPA, transformers' default; Transformer Engine),
  so it counts only where the model's attention stores them (NeMo's legacy Megatron-GPT without flash). With activation checkpointing
  (full recomputation, one layer at a time): every layer's 16-bit input (2·s·b·h) plus one layer's
  activations while it is recomputed. fp32 training doubles them. The output layer's logits: 4·s·b·V/t
  bytes in Megatron (the paper's fp32 cross entropy); transformers keeps 16-bit logits, an fp32 copy for
  the loss and its gradient: 10·s·b·V.
- overhead: 1 GiB per process for the CUDA context, cuBLAS workspaces and the caching allocator's slack.

Not modelled: allocator fragmentation beyond that, NCCL buffers, GLU MLPs' larger intermediate
activations, the 16-bit working copies of the weights autocast makes, very long sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

GIB = 1024**3
Method = Literal["full", "lora", "qlora", "ptuning"]
Precision = Literal["bf16", "fp16", "fp32"]
Backend = Literal["hf", "nemo"]

# AdamW: fp32 weight (4) + fp32 gradient (4) + two fp32 moments (8) per trainable parameter.
ADAM_MOMENT_BYTES = 8
FP32 = 4
HALF = 2
# NF4 (4 bits) + double-quantized block constants (an 8-bit absmax per 64 weights, an fp32 one per 256 blocks).
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
OVERHEAD_GIB = 1.0
# Korthikanti et al. 2022, eq. 2: per-layer activation bytes = s·b·h·(10 + 24/t) + 5·a·s²·b/t.
ACT_REPLICATED, ACT_SPLIT, ACT_SCORES = 10, 24, 5
# Per-token bytes of the output layer per vocabulary entry: Megatron's fp32 cross entropy (the paper's 4·s·b·V);
# transformers' 16-bit logits + fp32 copy for the loss + fp32 gradient.
LOGIT_BYTES: dict[Backend, int] = {"nemo": 4, "hf": 10}


@dataclass(frozen=True)
class ModelSize:
    """What the estimate needs of a model: its parameter count and the shapes that size its activations."""

    parameters: int
    layers: int
    hidden: int
    vocab: int
    heads: int | None = None
    # Parameters of the token/position embeddings and an untied output layer: QLoRA leaves them unquantized.
    embedding_parameters: int = 0
    # The tensor-parallel size a .nemo checkpoint was saved with (1 for Hugging Face models).
    tensor_parallel: int = 1
    # Whether training never stores the s×s attention scores: transformers' SDPA and Megatron-core with Transformer
    # Engine do not; NeMo's legacy Megatron-GPT (the seeds' checkpoints) does unless use_flash_attention is set.
    fused_attention: bool = True
    source: str = ""

    @property
    def label(self) -> str:
        """'8B', '1.3B', '354M': how people name a model's size."""
        p = self.parameters
        return f"{p / 1e9:.2g}B" if p >= 1e9 else f"{p / 1e6:.3g}M"


@dataclass(frozen=True)
class Workload:
    """How one site process trains: the knobs that decide its memory."""

    method: Method
    precision: Precision = "bf16"
    micro_batch: int = 1
    seq_len: int = 2048
    checkpointing: bool = False
    lora_r: int = 8
    # Projections per layer that get an adapter: PEFT's default for Llama and GPT-2 is 2 (q_proj, v_proj; c_attn).
    lora_modules: int = 2
    # P-tuning's prompt encoder: virtual tokens and the MLP's hidden size (None: the model's hidden size, PEFT's default).
    virtual_tokens: int = 10
    encoder_hidden: int | None = None
    tensor_parallel: int = 1
    # Processes the site runs (one per GPU); more than tensor_parallel means data-parallel replicas.
    processes: int = 1
    backend: Backend = "hf"
    # None: the model's own (ModelSize.fused_attention).
    fused_attention: bool | None = None

    def __post_init__(self) -> None:
        for name in ("micro_batch", "seq_len", "lora_r", "lora_modules", "tensor_parallel", "processes"):
            if getattr(self, name) < 1:
                raise ValueError(f"Workload.{name} must be ≥ 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Estimate:
    """GiB per GPU, by part."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead

    def parts(self) -> str:
        """'weights 15.0 + gradients 15.0 + ... = 63.2 GiB', for messages and the docs."""
        named = ", ".join(
            f"{k} {getattr(self, k):.1f}" for k in ("weights", "gradients", "optimizer", "activations", "overhead")
        )
        return f"{named} = {self.total:.1f} GiB"


def trainable_parameters(size: ModelSize, w: Workload) -> int:
    """The parameters the optimizer updates: all (full SFT), the LoRA adapters, or the prompt encoder."""
    if w.method == "full":
        return size.parameters
    if w.method in ("lora", "qlora"):
        # Each adapted h→h projection gains A (r×h) and B (h×r).
        return size.layers * w.lora_modules * w.lora_r * 2 * size.hidden
    enc = w.encoder_hidden or size.hidden
    # Virtual-token embeddings and a 3-linear MLP (PEFT's MLP reparameterization; NeMo's 2-layer one is smaller).
    return w.virtual_tokens * size.hidden + 2 * size.hidden * enc + enc * enc


def _weight_bytes(size: ModelSize, w: Workload, trainable: int) -> float:
    if w.method == "full":
        return FP32 * size.parameters
    if w.method == "qlora":
        quantized = max(size.parameters - size.embedding_parameters, 0)
        return NF4_BYTES * quantized + FP32 * size.embedding_parameters + FP32 * trainable
    frozen = FP32 if (w.backend == "hf" or w.precision == "fp32") else HALF
    return frozen * size.parameters + FP32 * trainable


def _activation_bytes(size: ModelSize, w: Workload) -> float:
    s, b, h, t = w.seq_len, w.micro_batch, size.hidden, w.tensor_parallel
    layer = s * b * h * (ACT_REPLICATED + ACT_SPLIT / t)
    if not (size.fused_attention if w.fused_attention is None else w.fused_attention):
        layer += ACT_SCORES * (size.heads or h // 64) * s * s * b / t
    # Checkpointing keeps every layer's 16-bit input and one layer's activations while it is recomputed.
    stored = HALF * s * b * h * size.layers + layer if w.checkpointing else layer * size.layers
    if w.precision == "fp32":
        stored *= 2
    return stored + LOGIT_BYTES[w.backend] * s * b * size.vocab / t


def estimate(size: ModelSize, workload: Workload) -> Estimate:
    """GiB one GPU of a site needs to train `size` as `workload` says (the formula in this module's docstring)."""
    w, t = workload, workload.tensor_parallel
    trainable = trainable_parameters(size, w)
    grads = FP32 * trainable
    if w.backend == "hf" and w.processes > w.tensor_parallel:
        grads += FP32 * trainable  # DDP's gradient buckets
    return Estimate(
        weights=_weight_bytes(size, w, trainable) / t / GIB,
        gradients=grads / t / GIB,
        optimizer=ADAM_MOMENT_BYTES * trainable / t / GIB,
        activations=_activation_bytes(size, w) / GIB,
        overhead=OVERHEAD_GIB,
    )


@dataclass(frozen=True)
class Fit:
    """What `fit` chose for a site, or why nothing fits (`problem`, one line naming site, need, GPUs and fix)."""

    micro_batch: int
    checkpointing: bool
    quantize: Literal["none", "4bit"]
    workload: Workload
    estimate: Estimate
    problem: str | None = None

    @property
    def fits(self) -> bool:
        return self.problem is None


def _micro_batches(requested: int) -> list[int]:
    """requested, requested // 2, ..., 1: halving keeps a micro-batch that divides a power-of-two global batch."""
    out, mb = [], requested
    while mb >= 1:
        out.append(mb)
        mb //= 2
    return out


def _stages(w: Workload, auto: bool) -> list[Workload]:
    """The workloads `fit` tries, in order: as asked; with auto, then checkpointing on (HF trainers' switch), then
    (LoRA) a 4-bit base."""
    stages = [w]
    if auto and not w.checkpointing and w.backend == "hf":  # fedllm's NeMo trainers expose no recomputation setting
        stages.append(replace(stages[-1], checkpointing=True))
    if auto and w.method == "lora":
        stages.append(replace(stages[-1], method="qlora"))
    return stages


def fit(
    size: ModelSize,
    workload: Workload,
    gpu_gib: float,
    *,
    margin: float = 0.1,
    auto: bool = False,
    site: str = "site",
    gpus: int = 1,
    template: str | None = None,
) -> Fit:
    """The largest micro-batch ≤ the requested one (halving) whose estimate fits `gpu_gib` less `margin`.

    With `auto`, when none fits as asked, checkpointing is turned on, then (LoRA only) the base is quantized
    to 4 bits, each time from the requested micro-batch down. `site`, `gpus` (how many the site has) and
    `template` (the job's, e.g. "hf-sft") only word the problem when nothing fits.
    """
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    budget = gpu_gib * (1 - margin)
    for stage in _stages(workload, auto):
        for mb in _micro_batches(workload.micro_batch):
            w = replace(stage, micro_batch=mb)
            e = estimate(size, w)
            if e.total <= budget:
                return Fit(mb, w.checkpointing, "4bit" if w.method == "qlora" else "none", w, e)
    last = replace(_stages(workload, auto)[-1], micro_batch=1)
    e = estimate(size, last)
    problem = _problem(size, last, e, gpu_gib, margin, site, gpus, template)
    return Fit(1, last.checkpointing, "4bit" if last.method == "qlora" else "none", last, e, problem)


def _article(label: str) -> str:
    integer = label.split(".")[0].rstrip("BM")
    return "an" if label.startswith("8") or integer in ("11", "18") else "a"


def _problem(
    size: ModelSize,
    w: Workload,
    need: Estimate,
    gpu_gib: float,
    margin: float,
    site: str,
    gpus: int,
    template: str | None,
) -> str:
    budget = gpu_gib * (1 - margin)
    fixes = _fixes(size, w, budget)
    needed_gpu = need.total / (1 - margin)
    bigger = f"give it GPUs with ≥ {math.ceil(needed_gpu)} GiB each"
    if w.backend == "hf":
        bigger += " (each of a site's GPUs holds a whole replica: more GPUs do not help)"
    fixes.append(bigger)
    what = template or {"full": "full SFT", "lora": "LoRA", "qlora": "QLoRA", "ptuning": "p-tuning"}[w.method]
    settings = ", checkpointing on" if w.checkpointing else ""
    if w.tensor_parallel > 1:
        settings += f", tensor parallel {w.tensor_parallel}"
    return (
        f"{site}: {what} of {_article(size.label)} {size.label} model needs ~{need.total:.0f} GiB per GPU at micro-batch 1 "
        f"(seq {w.seq_len}{settings}: {need.parts()}); it has {gpus} × {gpu_gib:g} GiB "
        f"({budget:.1f} GiB usable with a {margin:.0%} margin): " + ", or ".join(fixes)
    )


def _fixes(size: ModelSize, w: Workload, budget: float) -> list[str]:
    """Changes that would fit the budget, cheapest first (each checked with the same estimate)."""

    def fits(**changes: object) -> bool:
        return estimate(size, replace(w, micro_batch=1, **changes)).total <= budget  # type: ignore[arg-type]

    out = []
    if w.backend == "hf":
        ckpt = "" if w.checkpointing else " with gradient_checkpointing=true"
        if not w.checkpointing and fits(checkpointing=True):
            out.append("set -a gradient_checkpointing=true")
        if w.method == "full" and fits(method="lora"):
            out.append("use hf-lora")
        elif w.method == "full" and fits(method="lora", checkpointing=True):
            out.append(f"use hf-lora{ckpt}")
        elif w.method in ("full", "lora") and fits(method="qlora", checkpointing=True):
            out.append(f"use hf-lora with quantize=4bit{ckpt}" if w.method == "full" else f"set quantize=4bit{ckpt}")
    if w.backend == "nemo":
        for tp in (2, 4, 8):
            if tp > w.tensor_parallel and fits(tensor_parallel=tp, processes=tp):
                out.append(
                    f"give it {tp} GPUs with the checkpoint converted to tensor parallel {tp} "
                    f"(fedllm ckpt convert --target-tp {tp})"
                )
                break
    return out
