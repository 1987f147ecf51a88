"""Supervised fine-tuning on {"input", "output"} pairs, full weights or LoRA: TRL's SFTTrainer on the sites.

TRL does what the seeds' SFT did by hand: prompt-completion records get a completion-only loss (the
prompt's tokens carry no loss, as in NeMo's SFT), an EOS after the answer, long prompts cut from the
left (`truncation_mode="keep_end"`) so the answer survives; `--packing` packs short examples into
full sequences and `--chat-template` formats each pair as a user/assistant turn with the tokenizer's
chat template. transformers' Trainer brings mixed precision, accumulation, clipping, gradient
checkpointing, the LR schedule and DDP (fedllm.training.hf.trainer_options has the settings).

Full SFT exchanges every weight, LoRA only PEFT's adapter state dict. The federated round loop is
NVFlare's Hugging Face integration (fedllm.training.hf.federated). Job templates: jobs/hf-sft.yaml,
jobs/hf-lora.yaml.

    fedllm job create hf-lora --mode fedavg --model /models/Llama-3.2-1B --devices 2 --out runs/jobs

`--without-nvflare DIR` runs the same Trainer once on the site's data (num_train_epochs = --epochs) and
saves the model in DIR, with trainer_metrics.json (runtime, tokens): the reference a 1-round, 1-site
federated job must reproduce, and the baseline of the FL overhead benchmark (benchmarks/hf_sft.py).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedllm.flare.server_models import lora_config
from fedllm.training.core import resolve_path
from fedllm.training.hf.common import base_parser, load_records, quiet_transformers
from fedllm.training.hf.trainer_options import (
    add_trainer_arguments,
    check_distribution,
    quantization_config,
    resolve_precision,
    trainer_kwargs,
    warmup_steps,
)

METHODS = ("full", "lora")


def sft_records(records: list[Mapping[str, Any]], chat: bool = False) -> list[dict[str, Any]]:
    """{"input", "output"} → TRL's prompt-completion format (conversational with --chat-template).

    Without a chat template the answer follows the input after one space: NeMo's SFT prompt
    template "{input} {output}".
    """
    if chat:
        return [
            {
                "prompt": [{"role": "user", "content": str(r["input"])}],
                "completion": [{"role": "assistant", "content": str(r["output"])}],
            }
            for r in records
        ]
    return [{"prompt": str(r["input"]), "completion": " " + str(r["output"])} for r in records]


def load_model(
    model_path: str,
    method: str,
    *,
    lora_r: int = 8,
    lora_alpha: float = 16,
    target_modules: str = "",
    quantize: str = "none",
    precision: str = "fp32",
    gradient_checkpointing: bool = False,
):
    """(model, tokenizer): fp32 master weights (the Trainer autocasts), or a 4-bit base for QLoRA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if method not in METHODS:
        raise ValueError(f"method {method!r} unknown; use one of {', '.join(METHODS)}")
    if quantize != "none" and method != "lora":
        raise ValueError("--quantize 4bit trains LoRA adapters on a frozen 4-bit base: use the hf-lora template")
    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    bnb = quantization_config(quantize, precision)
    kwargs: dict[str, Any] = {"quantization_config": bnb} if bnb is not None else {"dtype": torch.float32}
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if method == "lora":
        from peft import get_peft_model, prepare_model_for_kbit_training

        if bnb is not None:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        elif gradient_checkpointing:
            model.enable_input_require_grads()  # the frozen embeddings' output must carry grad for recomputation
        model = get_peft_model(model, lora_config(lora_r, lora_alpha, target_modules))
    return model, tokenizer


def _trainer_class():
    from trl import SFTTrainer

    class FedllmSFTTrainer(SFTTrainer):
        """SFTTrainer whose evaluations are named val_* (global_val_* for the received model) with perplexity."""

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "val"):
            return super().evaluate(
                eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
            )

        def evaluation_loop(
            self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
        ):
            before_training = self.model_wrapped is self.model
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
            if before_training and getattr(self.model, "_is_accelerate_prepared", False):
                # An evaluation before the first train() (NVFlare's loop evaluates the received model first)
                # prepares the bare model with accelerate's evaluation_mode, which marks it prepared; since
                # accelerate's double-wrap guard (huggingface/accelerate#3977) the next train() then skips
                # the DDP wrapper and every rank trains alone. Unmarked, train() wraps it as usual.
                self.model._is_accelerate_prepared = False
            loss = output.metrics.get(f"{metric_key_prefix}_loss")
            if loss is not None:
                output.metrics[f"{metric_key_prefix}_perplexity"] = math.exp(min(float(loss), 50.0))
            return output

    return FedllmSFTTrainer


def seed_at_train_begin():
    """Reseed (args.seed) when training starts from step 0, whatever ran before it (evaluations, data loaders).

    transformers seeds once, in the Trainer's constructor; a federated site evaluates the received
    model before its first round, so without this its dropout and shuffling would draw other numbers
    than the same Trainer run without NVFlare. Resumed rounds restore the checkpoint's RNG instead.
    """
    from transformers import TrainerCallback
    from transformers.trainer_utils import set_seed

    class SeedAtTrainBegin(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                set_seed(args.seed)
            return control

    return SeedAtTrainBegin()


def build_trainer(
    args: argparse.Namespace,
    method: str,
    train: list[Mapping[str, Any]],
    val: list[Mapping[str, Any]],
    output_dir: Path,
    callbacks: list | None = None,
):
    """The site's SFTTrainer (the same with and without NVFlare), ready for `train()` / `evaluate()`."""
    from datasets import Dataset
    from trl import SFTConfig

    check_distribution(args)
    trainer_class, dp_kwargs = _trainer_class(), {}
    if getattr(args, "dp", ""):  # record-level DP-SGD (fedllm.training.hf.dp_trainer)
        from fedllm.training.hf.dp_trainer import check_dp_options, dp_trainer_class, dp_trainer_kwargs

        check_dp_options(args, method)
        dp_kwargs = dp_trainer_kwargs(args, output_dir)
        trainer_class = dp_trainer_class(trainer_class)
    precision = resolve_precision(args.precision)
    if dp_kwargs:
        from fedllm.training.hf.dp_trainer import dp_precision

        precision = dp_precision(precision)
    model, tokenizer = load_model(
        args.model_path,
        method,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        target_modules=args.target_modules,
        quantize=args.quantize,
        precision=precision,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    context = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    options = trainer_kwargs(args, str(output_dir), precision)
    if dp_kwargs:
        from fedllm.training.hf.dp_trainer import DP_TRAINER_OPTIONS

        options.update(DP_TRAINER_OPTIONS)
    config = SFTConfig(
        **options,
        max_length=min(args.max_length, context or args.max_length),
        truncation_mode="keep_end",  # long prompts lose their start, never the answer
        completion_only_loss=True,
        packing=args.packing,
        dataset_num_proc=None,
    )
    return trainer_class(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(sft_records(train, args.chat_template)),
        eval_dataset=Dataset.from_list(sft_records(val, args.chat_template)),
        processing_class=tokenizer,
        callbacks=[seed_at_train_begin(), *(callbacks or [])],
        **dp_kwargs,
    )


def steps_per_round(trainer, epochs: float) -> int:
    """Optimizer steps of `epochs` passes over this rank's shard (what NVFlare's budget counts too).

    Under DP a round is `ceil(epochs / q)` Poisson steps, the same at every site (fedllm.training.dp).
    """
    dp_steps = getattr(trainer, "dp_steps_per_round", None)
    if dp_steps is not None:
        return dp_steps
    batches = len(trainer.get_train_dataloader())
    return math.ceil(epochs * math.ceil(batches / trainer.args.gradient_accumulation_steps))


def parser(method: str) -> argparse.ArgumentParser:
    p = base_parser(__doc__.splitlines()[0])
    add_trainer_arguments(p)
    p.add_argument("--packing", action="store_true", help="pack short examples into full sequences (TRL)")
    p.add_argument("--chat-template", action="store_true", help="format pairs as chat turns (tokenizer's template)")
    p.add_argument("--lora-r", type=int, default=8)
    # A float: with --lora-ranks each site's alpha is the job's alpha/r times its own rank (fedllm.jobs.lora_ranks).
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--target-modules", default="", help="LoRA: comma-separated module names (empty: PEFT's default)")
    if method == "lora":  # full SFT has no DP-SGD (fedllm.training.hf.dp_trainer.check_dp_options says why)
        p.add_argument("--dp", default="", help="record-level DP-SGD settings (set by `fedllm job create --dp`)")
    p.add_argument("--without-nvflare", default="", help="train once without NVFlare and save the model here")
    p.set_defaults(method=method)
    return p


def argument_parser() -> argparse.ArgumentParser:
    """Full SFT's arguments (`fedllm job create` checks a job's against them)."""
    return parser("full")


def read_site_data(args: argparse.Namespace, site: str) -> tuple[list[dict], list[dict]]:
    args.model_path = str(resolve_path(args.model, site)) if "{" in args.model else args.model
    train = load_records(resolve_path(args.train, site), ("input", "output"))
    val = load_records(resolve_path(args.val, site), ("input", "output"), args.max_val)
    return train, val


def train_without_nvflare(args: argparse.Namespace, method: str, site: str) -> None:
    """One Trainer run on this process's data, the model saved to --without-nvflare (rank 0 writes)."""
    from fedllm.fileio import atomic_directory
    from fedllm.training.hf.federated import init_ranks

    rank, _ = init_ranks()
    train, val = read_site_data(args, site)
    out = Path(args.without_nvflare)
    trainer = build_trainer(args, method, train, val, out.parent / f".{out.name}.trainer")
    trainer.args.warmup_steps = warmup_steps(args.warmup_ratio, steps_per_round(trainer, args.epochs))
    outcome = trainer.train()
    if rank == 0:
        logged = [h for h in trainer.state.log_history if "num_tokens" in h]
        metrics = {
            **outcome.metrics,
            "global_step": outcome.global_step,
            "num_tokens": logged[-1]["num_tokens"] if logged else 0,
        }
        with atomic_directory(out, replace=True) as staging:
            trainer.save_model(str(staging))
            (staging / "trainer_metrics.json").write_text(json.dumps(metrics, indent=2))


def main_for(method: str, argv: list[str] | None = None) -> None:
    from fedllm.training.distributed import site_name
    from fedllm.training.hf.federated import run_federated

    args = parser(method).parse_args(argv)
    if args.without_nvflare:
        train_without_nvflare(args, method, site_name())
        return
    run_federated(
        args,
        lambda site: read_site_data(args, site),
        lambda a, tr, va, out, cbs: build_trainer(a, method, tr, va, out, cbs),
        lora_rank=args.lora_r if method == "lora" else None,
    )


def main(argv: list[str] | None = None) -> None:
    """Full SFT: every weight trains and crosses the wire."""
    main_for("full", argv)
