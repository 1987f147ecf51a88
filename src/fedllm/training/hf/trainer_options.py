"""transformers.Trainer settings from a job template's arguments: precision, schedule, accumulation, memory.

The defaults are the template's (jobs/hf-sft.yaml, jobs/hf-lora.yaml) and are sized for a 1B model
(Llama-3.2-1B) on one 24 GB GPU per rank; every one is a plain `--key value` a template or
`fedllm job create -a key=value` can change.

What happens between FedAvg rounds (NVFlare's HF integration, `restore_state=True`): the Trainer's
`max_steps` is set once to steps-per-round × the job's rounds (`total_rounds`, which LeanFedAvg
sends as the job's first submission had it, continuations included), so warmup and the LR schedule
span the whole job instead of restarting every round; at the end of each round the Trainer writes a
checkpoint (weights, AdamW moments, scheduler, RNG, its step and log) under
<site workspace>/fedllm-state/<lineage>/ (fedllm.training.lineage), and the next round resumes from it
and then loads the server's global weights over the site's own. So the optimizer state a round starts
with is the site's own AdamW moments from its previous round, applied to the new global weights
(NVFlare's documented behaviour; FedAvg averages weights only), and the data order is what the
checkpoint's RNG state and step give. A full-SFT checkpoint is about 3× the fp32 model on disk
(weights + two moments); up to `KEEP_SNAPSHOTS` (3) are kept while the job runs, none after its last round.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

import torch

from fedllm.training.lineage import KEEP_SNAPSHOTS

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
QUANTIZE = ("none", "4bit")


class TrainerOptionError(ValueError):
    """A template argument asks for something this site cannot do; the message says what to change."""


def add_trainer_arguments(parser: argparse.ArgumentParser) -> None:
    """The Trainer's knobs (the template's train_args render as these flags)."""
    p = parser.add_argument
    p("--grad-accum", type=int, default=1, help="gradient accumulation steps (effective batch = batch × accum × ranks)")
    p("--warmup-ratio", type=float, default=0.03, help="share of the job's optimizer steps spent warming up")
    p("--lr-scheduler", default="cosine", help="transformers' scheduler name: cosine, linear, constant, ...")
    p("--weight-decay", type=float, default=0.0)
    p("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    p(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: bf16 on GPUs with bf16, fp16 on others, fp32 on CPU",
    )
    p("--gradient-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    p(
        "--quantize",
        choices=QUANTIZE,
        default="none",
        help="4bit: QLoRA, the frozen base in 4-bit NF4 (bitsandbytes, GPU)",
    )
    p("--fsdp", action="store_true", help="shard the model over the site's GPUs (refused: see check_distribution)")
    p("--logging-steps", type=int, default=10, help="log (and stream to the server) every N optimizer steps")
    p(
        "--output-dir",
        default="",
        help="root of the Trainer checkpoints, one folder per job lineage (default: <site workspace>/fedllm-state)",
    )


def warmup_steps(ratio: float, total_steps: int) -> int:
    """--warmup-ratio as optimizer steps: ceil(ratio × the steps the schedule spans).

    An integer means the same to every transformers the hf extra allows: a warmup_steps below 1 is a
    share of max_steps to transformers 5 but 0.03 steps (no warmup at all) to transformers 4.
    """
    return math.ceil(ratio * total_steps)


def resolve_precision(requested: str, cuda: bool | None = None) -> str:
    """bf16 | fp16 | fp32 for this process: "auto" picks what the hardware does well."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if requested == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp16" and not cuda:
        raise TrainerOptionError(
            "--precision fp16 needs a CUDA GPU (fp16 mixed precision scales losses on the GPU); "
            "use --precision auto or fp32 on a CPU site"
        )
    if requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise TrainerOptionError(
            f"--precision bf16: GPU {torch.cuda.get_device_name(0)} has no bf16; use --precision auto (fp16 there)"
        )
    return requested


def check_distribution(args: argparse.Namespace) -> None:
    """FSDP and 4-bit bases are refused here, before any weight is loaded, with the reason and the way out."""
    if args.fsdp:
        raise TrainerOptionError(
            "--fsdp: NVFlare 2.9's Hugging Face integration (nvflare.app_opt.hf.patch) refuses FSDP "
            "('FSDP is not currently supported by the HuggingFace Client API'), so a site trains with DDP: "
            "one full replica per GPU. For a model that does not fit one GPU use hf-lora with --quantize 4bit "
            "(QLoRA), --gradient-checkpointing, or a NeMo template with tensor parallelism across the site's GPUs"
        )
    if args.quantize == "4bit" and not torch.cuda.is_available():
        raise TrainerOptionError(
            "--quantize 4bit (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit kernels do not run on CPU; "
            "drop quantize from the job (plain LoRA) on CPU sites"
        )


def quantization_config(quantize: str, precision: str) -> Any:
    """transformers' BitsAndBytesConfig for QLoRA (NF4, double quantization), or None."""
    if quantize == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise TrainerOptionError("--quantize 4bit needs bitsandbytes on the site: pip install 'fedllm[qlora]'") from exc
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
    )


def trainer_kwargs(args: argparse.Namespace, output_dir: str, precision: str) -> dict[str, Any]:
    """TrainingArguments (SFTConfig) fields for one site's Trainer, from the template's arguments."""
    cpu = not torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": args.batch_size,
        "per_device_eval_batch_size": args.batch_size * 2,
        "gradient_accumulation_steps": args.grad_accum,
        "num_train_epochs": args.epochs,
        "learning_rate": args.lr,
        "lr_scheduler_type": args.lr_scheduler,
        "warmup_steps": 0,  # set to warmup_steps(...) once the schedule's length is known
        "weight_decay": args.weight_decay,
        "max_grad_norm": args.max_grad_norm,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "gradient_checkpointing": args.gradient_checkpointing,
        "use_cpu": cpu,
        "ddp_backend": ("gloo" if cpu else "nccl") if distributed else None,
        "seed": args.seed,
        "logging_steps": args.logging_steps,
        "logging_first_step": True,
        "eval_strategy": "no",  # fedllm evaluates the received model before a round and the trained one after
        "save_strategy": "no",  # NVFlare's patch saves the end-of-round checkpoint it resumes from
        "save_total_limit": KEEP_SNAPSHOTS,  # fedllm.training.lineage prunes the same ones first
        "report_to": "none",  # site-local TensorBoard is fedllm's callback; the server's is NVFlare tracking
        "disable_tqdm": True,
        "ddp_find_unused_parameters": False,  # LoRA's frozen base has no grads by design, not by accident
        "dataloader_num_workers": 0,
    }
