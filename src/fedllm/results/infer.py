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

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedllm.results.metrics import ResultError, global_model_path, load_global_state

KINDS = ("sft", "lora")


class InferenceError(ResultError):
    """The tuned weights cannot be found or do not fit the model."""


@dataclass(frozen=True)
class KindFlags:
    """How the running command is told a result is SFT or LoRA: its errors name that command's own flags."""

    to_sft: str  # the fix for LoRA-less weights given as a LoRA result
    to_lora: str  # the fix for a LoRA adapter given as full weights


INFER_FLAGS = KindFlags(
    to_sft="pass it with --sft instead of --adapter", to_lora="pass it with --adapter instead of --sft"
)
EXPORT_FLAGS = KindFlags(to_sft="export it without --lora", to_lora="export it with --lora")


def is_nemo(model: str | Path) -> bool:
    return str(model).endswith(".nemo")


def check_base_model(model: str) -> None:
    """--model names an existing .nemo file or Hugging Face folder (never a hub name: fedllm downloads nothing)."""
    path = Path(model)
    if is_nemo(model):
        if not path.is_file():
            raise InferenceError(f"--model {model}: no such .nemo file; pass the base model the job was created with")
        return
    if not path.is_dir():
        raise InferenceError(
            f"--model {model}: no such folder; pass the Hugging Face model folder the job was created with "
            "(config.json, weights, tokenizer files) or its .nemo file"
        )
    if not (path / "config.json").is_file():
        raise InferenceError(
            f"--model {model} holds no config.json, so it is not a Hugging Face model folder; pass the folder "
            "the job was created with (`save_pretrained` writes it)"
        )


@contextlib.contextmanager
def loading_base(model: str) -> Iterator[None]:
    """transformers' errors about a base model folder (missing or damaged files) as fedllm's, naming the folder."""
    try:
        yield
    except InferenceError:
        raise
    except Exception as exc:  # from_pretrained raises OSError, ValueError, safetensors' and tokenizers' own types
        raise InferenceError(
            f"--model {model} cannot be loaded ({type(exc).__name__}: {str(exc)[:300]}); pass the complete Hugging "
            "Face model folder the job was created with"
        ) from exc


def check_tokenizer(model: str, tokenizer, lm) -> None:
    """The folder's tokenizer has a vocabulary that fits the model (transformers makes an empty one without files)."""
    if tokenizer.vocab_size == 0:
        raise InferenceError(
            f"--model {model} has no tokenizer files (tokenizer.json, or vocab and merges), so every text would "
            "encode to nothing; pass the folder with the tokenizer the job trained with (`save_pretrained` it there)"
        )
    rows = lm.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise InferenceError(
            f"--model {model}: its tokenizer has {len(tokenizer)} tokens but the model embeds {rows}; pass the "
            "folder whose tokenizer belongs to the model"
        )


def predict_sentiment(
    model: str,
    prompt_encoder: Path | None,
    sentences: list[str],
    num_virtual_tokens: int = 10,
    encoder_hidden: int | None = None,
    *,
    best: bool = False,
) -> list[tuple[str, str]]:
    """(sentence, generated label) pairs; without a prompt encoder, the untuned (random) one is used."""
    check_base_model(model)
    if is_nemo(model):
        from fedllm.flare.server_models import PromptEncoderWeights
        from fedllm.training.nemo.infer import generate_sentiment

        hidden = encoder_hidden or 2048
        if prompt_encoder is not None:
            state = load_global_state(prompt_encoder, best=best)
        else:
            from fedllm.checkpoint.model_spec import read_model_spec

            token_dim = read_model_spec(model).hidden_size
            state = PromptEncoderWeights(num_virtual_tokens, token_dim, hidden).state_dict()
        labels = generate_sentiment(
            Path(model), state, sentences, virtual_tokens=num_virtual_tokens, encoder_hidden=hidden
        )
        return list(zip(sentences, labels, strict=True))

    from fedllm.training.hf.ptuning import PTuningTask

    # The weights before the model: a damaged result fails fast.
    state = load_global_state(prompt_encoder, best=best) if prompt_encoder is not None else None
    with loading_base(model):
        task = PTuningTask(
            model, [], [{"sentence": "x", "label": label} for label in ("positive", "neutral", "negative")],
            num_virtual_tokens=num_virtual_tokens, encoder_hidden_size=encoder_hidden,
        )  # fmt: skip
    check_tokenizer(model, task.tokenizer, task.model)
    if state is not None:
        try:
            task.load_exchanged_state(state)
        except ValueError as exc:
            raise InferenceError(f"{global_model_path(prompt_encoder, best=best)}: {exc}") from exc
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

    check_base_model(model)
    answers = nemo_answers(Path(model), load_global_state(weights, best=best), prompts, max_tokens=max_tokens)
    return list(zip(prompts, answers, strict=True))


def _job_lora_args(result: Path) -> dict[str, Any]:
    """The LoraAdapterWeights arguments the job's server was given ({} when the result has no config)."""
    root = result if result.is_dir() else result.parent.parent.parent
    for config in sorted(root.glob("workspace/app_server/config/config_fed_server.json")):
        try:
            components = json.loads(config.read_bytes().decode("utf-8")).get("components", [])
            for component in components:
                args = component.get("args", {})
                if str(args.get("model_class", "")).endswith("LoraAdapterWeights"):
                    return dict(args.get("model_args", {}))
        except (ValueError, RecursionError, AttributeError, TypeError) as exc:
            raise InferenceError(
                f"{config} is damaged ({type(exc).__name__}: {exc}): the LoRA settings cannot be read from it. Fix: "
                "download the job's result again, or pass the .pt file itself with --lora-alpha"
            ) from exc
    return {}


def _lora_settings(state: dict[str, torch.Tensor], job_args: dict[str, Any], lora_alpha: int | None):
    """(r, alpha, target modules) of an adapter state dict (it holds *.lora_A.* tensors), with the job's alpha."""
    a_keys = [k for k in state if ".lora_A." in k]
    if state[a_keys[0]].dim() != 2:
        raise InferenceError(f"the global model's {a_keys[0]} has shape {tuple(state[a_keys[0]].shape)}, not (r, in)")
    r = int(state[a_keys[0]].shape[0])
    modules = sorted({k.split(".lora_A.")[0].rsplit(".", 1)[-1] for k in a_keys})
    job_alpha = job_args.get("alpha", 0)
    if lora_alpha is None and not _is_alpha(job_alpha):
        raise InferenceError(f"the job's server config gives LoRA alpha {job_alpha!r}, not a number; pass --lora-alpha")
    alpha = lora_alpha or job_alpha or None  # a float where --lora-ranks scaled it (fedllm.jobs.lora_ranks)
    if alpha is None:
        raise InferenceError(
            "the result does not say the adapter's lora_alpha (no server config in it); pass --lora-alpha "
            "(the job's train_args lora_alpha, hf-lora's default is 16)"
        )
    return r, alpha, ",".join(modules)


def _is_alpha(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and 0 <= value < 1e9


def load_tuned_causal_lm(
    base: str,
    result: Path,
    kind: str,
    *,
    best: bool = False,
    lora_alpha: int | None = None,
    flags: KindFlags = INFER_FLAGS,
):
    """(model, tokenizer): the base model with the job's global weights (sft) or global adapter (lora)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind not in KINDS:
        raise InferenceError(f"kind {kind!r} unknown; use one of {', '.join(KINDS)}")
    check_base_model(base)
    if is_nemo(base):
        raise InferenceError(
            f"--model {base} is a .nemo file; this needs a Hugging Face model folder (NeMo results: "
            "`fedllm infer --sft`, or `fedllm ckpt export-hf` to convert the .nemo first)"
        )
    state = load_global_state(result, best=best)  # before the model: a damaged result fails fast
    source = global_model_path(result, best=best)
    lora_keys = [k for k in state if ".lora_A." in k]
    if kind == "sft" and lora_keys:
        raise InferenceError(f"{source} holds a LoRA adapter ({lora_keys[0]}, ...), not full weights; {flags.to_lora}")
    if kind == "lora" and not lora_keys:
        raise InferenceError(f"{source} holds no LoRA tensors (*.lora_A.*): it is full weights; {flags.to_sft}")
    with loading_base(base):
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    check_tokenizer(base, tokenizer, model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if kind == "sft":
        own = model.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or wrong_shape:
            raise InferenceError(
                f"{source} does not fit {base}: missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes "
                f"{wrong_shape[:3]}; pass the base model the job was created with (--model)"
            )
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
        return model.eval(), tokenizer
    from peft import get_peft_model, set_peft_model_state_dict

    from fedllm.flare.server_models import lora_config

    r, alpha, modules = _lora_settings(state, _job_lora_args(result), lora_alpha)
    try:
        peft_model = get_peft_model(model, lora_config(r, alpha, modules))
        outcome = set_peft_model_state_dict(peft_model, state)
    except (ValueError, RuntimeError, KeyError) as exc:  # target modules the base lacks, tensors of other shapes
        raise InferenceError(
            f"{source}: the adapter does not fit {base} ({type(exc).__name__}: {str(exc)[:300]}); pass the base "
            "model the job was created with (--model)"
        ) from exc
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

    model, tokenizer = load_tuned_causal_lm(base, result, kind, best=best, lora_alpha=lora_alpha, flags=EXPORT_FLAGS)
    if kind == "lora":
        model = model.merge_and_unload()
    with atomic_directory(out, replace=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return out
