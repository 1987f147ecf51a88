"""Inference with a tuned model: the global prompt encoder of a p-tuning job on its base model."""

from __future__ import annotations

from pathlib import Path

from fedllm.errors import FedllmError


class InferenceError(FedllmError):
    """The tuned weights cannot be found or do not fit the model."""


def _checkpoint(path: Path) -> Path:
    if path.is_dir():
        candidate = path / "workspace" / "app_server" / "FL_global_model.pt"
        if candidate.is_file():
            return candidate
        raise InferenceError(f"{path} holds no workspace/app_server/FL_global_model.pt; pass a job result folder")
    if not path.is_file():
        raise InferenceError(f"{path} not found; pass FL_global_model.pt or the job's downloaded result folder")
    return path


def predict_sentiment(
    model: str, prompt_encoder: Path | None, sentences: list[str], num_virtual_tokens: int = 10
) -> list[tuple[str, str]]:
    """(sentence, generated label) pairs; without a prompt encoder, the untuned (random) one is used."""
    import torch

    from fedllm.training.ptuning import PTuningTask

    task = PTuningTask(
        model, [], [{"sentence": "x", "label": label} for label in ("positive", "neutral", "negative")],
        num_virtual_tokens=num_virtual_tokens,
    )  # fmt: skip
    if prompt_encoder is not None:
        ckpt = torch.load(_checkpoint(prompt_encoder), map_location="cpu", weights_only=True)
        try:
            task.load_exchanged_state(ckpt.get("model", ckpt))
        except ValueError as exc:
            raise InferenceError(f"{prompt_encoder}: {exc}") from exc
    return list(zip(sentences, task.predict(sentences), strict=True))
