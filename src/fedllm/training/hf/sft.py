"""Supervised fine-tuning on {"input", "output"} sets: full weights or LoRA (PEFT), one plain training loop.

The loss scores only the output (answer-only), as NeMo's SFT and TRL's completion-only collator
do. Full SFT exchanges every weight (the exchange settings of large models come from the job);
LoRA exchanges only the adapter (PEFT's adapter state dict). Job templates: jobs/hf-sft.yaml,
jobs/hf-lora.yaml.

    fedllm job create hf-lora --mode fedavg --model /models/llama-3.2-1b --out runs/jobs
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from fedllm.flare.server_models import lora_config
from fedllm.training.core import resolve_path, run_site
from fedllm.training.hf.common import (
    CausalLMTask,
    base_parser,
    load_records,
    pick_device,
    prompt_answer_ids,
    quiet_transformers,
)

# NeMo's SFT prompt template "{input} {output}": the answer follows the input after one space.
PROMPT = "{input}"


def _load(model_path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), tokenizer


def lora_model(model_path: str, r: int = 8, alpha: int = 16, target_modules: str = ""):
    """(peft model, tokenizer) with a LoRA adapter made with the settings the server's adapter uses."""
    from peft import get_peft_model

    model, tokenizer = _load(model_path)
    return get_peft_model(model, lora_config(r, alpha, target_modules)), tokenizer


class SFTTask(CausalLMTask):
    """One site's SFT (method "full") or LoRA (method "lora"): the `SiteTask` the training core drives."""

    def __init__(
        self,
        model_path: str,
        train: list[dict[str, Any]],
        val: list[dict[str, Any]],
        *,
        method: str = "full",
        lr: float = 1e-4,
        batch_size: int = 8,
        max_length: int = 256,
        lora_r: int = 8,
        lora_alpha: int = 16,
        target_modules: str = "",
        device: torch.device | None = None,
    ):
        if method not in ("full", "lora"):
            raise ValueError(f"method {method!r} unknown; use full or lora")
        self.method = method
        self.device = device or torch.device("cpu")
        if method == "lora":
            self.model, self.tokenizer = lora_model(model_path, lora_r, lora_alpha, target_modules)
        else:
            self.model, self.tokenizer = _load(model_path)
        self.model.to(self.device)
        context = getattr(self.model.config, "n_positions", None) or self.model.config.max_position_embeddings
        self.lr, self.batch_size, self.max_length = lr, batch_size, min(max_length, context)
        self.train_examples = [self._encode(r) for r in train]
        self.val_examples = [self._encode(r) for r in val]

    def _encode(self, record: Mapping[str, Any]) -> tuple[list[int], list[int]]:
        return prompt_answer_ids(
            self.tokenizer, PROMPT.format(input=record["input"]), " " + str(record["output"]), self.max_length
        )

    def exchanged_state(self) -> dict[str, torch.Tensor]:
        if self.method == "lora":
            from peft import get_peft_model_state_dict

            return dict(get_peft_model_state_dict(self.model))
        return dict(self.model.state_dict())

    def load_exchanged_state(self, state: Mapping[str, Any]) -> None:
        own = self.exchanged_state()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"the global state does not fit this {self.method} model: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}; the job template's initial_model must be built from the same --model"
            )
        tensors = {k: torch.as_tensor(v).to(self.device, own[k].dtype) for k, v in state.items()}
        if self.method == "lora":
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, tensors)
        else:
            self.model.load_state_dict(tensors, strict=False)  # tied weights may appear under one name only

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        loss = self.val_loss()
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 32) -> str:
        self.model.eval()
        ids = self.tokenizer(PROMPT.format(input=prompt), return_tensors="pt").to(self.device)
        out = self.model.generate(
            **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
        )
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def parser(method: str):
    p = base_parser(__doc__.splitlines()[0])
    if method == "lora":
        p.add_argument("--lora-r", type=int, default=8)
        p.add_argument("--lora-alpha", type=int, default=16)
        p.add_argument("--target-modules", default="", help="comma-separated module names (empty: PEFT's default)")
    return p


def main_for(method: str, argv: list[str] | None = None) -> None:
    args = parser(method).parse_args(argv)

    def build(site: str) -> SFTTask:
        model = str(resolve_path(args.model, site)) if "{" in args.model else args.model
        return SFTTask(
            model,
            load_records(resolve_path(args.train, site), ("input", "output")),
            load_records(resolve_path(args.val, site), ("input", "output"), args.max_val),
            method=method,
            lr=args.lr,
            batch_size=args.batch_size,
            max_length=args.max_length,
            lora_r=getattr(args, "lora_r", 8),
            lora_alpha=getattr(args, "lora_alpha", 16),
            target_modules=getattr(args, "target_modules", ""),
            device=pick_device(args.devices, args.cpu_threads),
        )

    run_site(build, epochs=args.epochs, seed=args.seed, tb_dir=args.tb_dir)


def main(argv: list[str] | None = None) -> None:
    """Full SFT: every weight trains and crosses the wire."""
    main_for("full", argv)
