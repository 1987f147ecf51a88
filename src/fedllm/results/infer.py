"""Inference with a tuned model: a p-tuning job's global prompt encoder, or an SFT job's global weights.

A `.nemo` base model runs through NeMo (fedllm.training.nemo.infer, the seeds' notebook); a Hugging Face
model folder through transformers and PEFT (fedllm.training.hf).
"""

from __future__ import annotations

from pathlib import Path

from fedllm.results.metrics import ResultError, load_global_state


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

            token_dim = read_model_spec(model)[0].hidden_size
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


def generate_answers(model: str, weights: Path, prompts: list[str], max_tokens: int = 8) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from the base model with an SFT job's global weights (NeMo .nemo base models)."""
    if not is_nemo(model):
        raise InferenceError(
            f"{model}: SFT generation from a job's global weights needs the base .nemo here. Fix: pass the .nemo "
            "the NeMo SFT job was created with"
        )
    from fedllm.training.nemo.infer import generate_answers as nemo_answers

    answers = nemo_answers(Path(model), load_global_state(weights), prompts, max_tokens=max_tokens)
    return list(zip(prompts, answers, strict=True))
