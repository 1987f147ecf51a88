"""Inference with what a job tuned, and (Hugging Face) its export as a plain transformers model folder.

- p-tuning: the global prompt encoder on its frozen base model (`predict_sentiment`); a `.nemo` base
  runs through NeMo (fedllm.training.nemo.infer, the seeds' notebook), a Hugging Face folder through PEFT;
- SFT: the global model's full weights (`load_tuned_causal_lm(kind="sft")`; NeMo: `generate_answers`);
- LoRA: the global adapter on its base model; exported merged into the base, so plain
  `AutoModelForCausalLM.from_pretrained(folder)` loads it without PEFT.

The LoRA settings come from the job itself (the server's `LoraAdapterWeights` arguments in the
downloaded result's config): r and the target modules must match the adapter's tensors, alpha
scales its output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedllm.results.metrics import ResultError, global_model_path, load_global_state

KINDS = ("sft", "lora")


class InferenceError(ResultError):
    """The tuned weights cannot be found or do not fit the model."""


def is_nemo(model: str | Path) -> bool:
    return str(model).endswith(".nemo")


def predict_sentiment(
    model: str,
    prompt_encoder: Path | None,
    sentences: list[str],
    num_virtual_tokens: int = 10,
    encoder_hidden: int | None = None,
) -> list[tuple[str, str]]:
    """(sentence, generated label) pairs; without a prompt encoder, the untuned (random) one is used."""
    if is_nemo(model):
        from fedllm.flare.server_models import PromptEncoderWeights
        from fedllm.training.nemo.infer import generate_sentiment

        hidden = encoder_hidden or 2048
        if prompt_encoder is not None:
            state = load_global_state(prompt_encoder)
        else:
            from fedllm.checkpoint.model_spec import read_model_spec

            token_dim = read_model_spec(model).hidden_size
            state = PromptEncoderWeights(num_virtual_tokens, token_dim, hidden).state_dict()
        labels = generate_sentiment(
            Path(model), state, sentences, virtual_tokens=num_virtual_tokens, encoder_hidden=hidden
        )
        return list(zip(sentences, labels, strict=True))

    from fedllm.training.hf.ptuning import PTuningTask

    task = PTuningTask(
        model, [], [{"sentence": "x", "label": label} for label in ("positive", "neutral", "negative")],
        num_virtual_tokens=num_virtual_tokens, encoder_hidden_size=encoder_hidden,
    )  # fmt: skip
    if prompt_encoder is not None:
        try:
            task.load_exchanged_state(load_global_state(prompt_encoder))
        except ValueError as exc:
            raise InferenceError(f"{prompt_encoder}: {exc}") from exc
    return list(zip(sentences, task.predict(sentences), strict=True))


def generate_answers(
    model: str, weights: Path, prompts: list[str], max_tokens: int = 8, *, best: bool = False
) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from the base model with an SFT job's global weights (NeMo .nemo base models)."""
    if not is_nemo(model):
        raise InferenceError(
            f"{model}: SFT generation from a job's global weights needs the base .nemo here. Fix: pass the .nemo "
            "the NeMo SFT job was created with"
        )
    from fedllm.training.nemo.infer import generate_answers as nemo_answers

    answers = nemo_answers(Path(model), load_global_state(weights, best=best), prompts, max_tokens=max_tokens)
    return list(zip(prompts, answers, strict=True))


def _job_lora_args(result: Path) -> dict[str, Any]:
    """The LoraAdapterWeights arguments the job's server was given ({} when the result has no config)."""
    root = result if result.is_dir() else result.parent.parent.parent
    for config in sorted(root.glob("workspace/app_server/config/config_fed_server.json")):
        for component in json.loads(config.read_text()).get("components", []):
            args = component.get("args", {})
            if str(args.get("model_class", "")).endswith("LoraAdapterWeights"):
                return dict(args.get("model_args", {}))
    return {}


def _lora_settings(state: dict[str, torch.Tensor], job_args: dict[str, Any], lora_alpha: int | None):
    """(r, alpha, target modules) of an adapter state dict, checked against the job's arguments."""
    a_keys = [k for k in state if ".lora_A." in k]
    if not a_keys:
        raise InferenceError("the global model holds no LoRA tensors (*.lora_A.*); pass it with --sft instead")
    r = int(state[a_keys[0]].shape[0])
    modules = sorted({k.split(".lora_A.")[0].rsplit(".", 1)[-1] for k in a_keys})
    alpha = lora_alpha or int(job_args.get("alpha", 0)) or None
    if alpha is None:
        raise InferenceError(
            "the result does not say the adapter's lora_alpha (no server config in it); pass --lora-alpha "
            "(the job's train_args lora_alpha, hf-lora's default is 16)"
        )
    return r, alpha, ",".join(modules)


def load_tuned_causal_lm(base: str, result: Path, kind: str, *, best: bool = False, lora_alpha: int | None = None):
    """(model, tokenizer): the base model with the job's global weights (sft) or global adapter (lora)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind not in KINDS:
        raise InferenceError(f"kind {kind!r} unknown; use one of {', '.join(KINDS)}")
    state = load_global_state(result, best=best)
    source = global_model_path(result, best=best)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if kind == "sft":
        own = model.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise InferenceError(
                f"{source} does not fit {base}: missing {missing[:3]}, unexpected {unexpected[:3]}; pass the base "
                "model the job was created with (--model), or --adapter for a LoRA job's result"
            )
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
        return model.eval(), tokenizer
    from peft import get_peft_model, set_peft_model_state_dict

    from fedllm.flare.server_models import lora_config

    r, alpha, modules = _lora_settings(state, _job_lora_args(result), lora_alpha)
    peft_model = get_peft_model(model, lora_config(r, alpha, modules))
    outcome = set_peft_model_state_dict(peft_model, state)
    if getattr(outcome, "unexpected_keys", None):
        raise InferenceError(f"{source}: adapter tensors {outcome.unexpected_keys[:3]} do not fit {base}")
    return peft_model.eval(), tokenizer


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy continuation of each prompt (the answer after "{input}", as the SFT jobs trained it)."""
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        outputs.append(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return outputs


def export_hf(
    base: str,
    result: Path,
    kind: str,
    out: Path,
    *,
    best: bool = False,
    lora_alpha: int | None = None,
    overwrite: bool = False,
):
    """A plain transformers folder (config, safetensors, tokenizer) of the job's global model; returns it.

    A LoRA adapter is merged into its base first, so loading needs neither PEFT nor the base model.
    """
    from fedllm.fileio import atomic_directory

    if out.exists() and not overwrite:
        raise InferenceError(f"{out} exists; pass --overwrite to replace it, or another --out")

    model, tokenizer = load_tuned_causal_lm(base, result, kind, best=best, lora_alpha=lora_alpha)
    if kind == "lora":
        model = model.merge_and_unload()
    with atomic_directory(out, replace=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return out
