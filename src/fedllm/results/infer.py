"""Inference with a tuned model: the global prompt encoder of a p-tuning job on its base model."""

from __future__ import annotations

from pathlib import Path

from fedllm.results.metrics import ResultError, load_global_state


class InferenceError(ResultError):
    """The tuned weights cannot be found or do not fit the model."""


def predict_sentiment(
    model: str, prompt_encoder: Path | None, sentences: list[str], num_virtual_tokens: int = 10
) -> list[tuple[str, str]]:
    """(sentence, generated label) pairs; without a prompt encoder, the untuned (random) one is used."""
    from fedllm.training.hf.ptuning import PTuningTask

    task = PTuningTask(
        model, [], [{"sentence": "x", "label": label} for label in ("positive", "neutral", "negative")],
        num_virtual_tokens=num_virtual_tokens,
    )  # fmt: skip
    if prompt_encoder is not None:
        try:
            task.load_exchanged_state(load_global_state(prompt_encoder))
        except ValueError as exc:
            raise InferenceError(f"{prompt_encoder}: {exc}") from exc
    return list(zip(sentences, task.predict(sentences), strict=True))
