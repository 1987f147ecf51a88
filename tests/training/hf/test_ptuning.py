"""P-tuning on a tiny GPT: what crosses the wire, that it learns, and that bad global state is refused."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from fedllm.data.synthetic import sentiment_records
from fedllm.flare.server_models import PeftPromptEncoderWeights
from fedllm.training.core import run_round, state_bytes
from fedllm.training.hf.ptuning import PTuningTask, prompt_encoder


@pytest.fixture
def task(tiny_gpt) -> PTuningTask:
    """A fresh site per test: tests train and load states into it, so none may see another's changes."""
    torch.manual_seed(0)
    return PTuningTask(str(tiny_gpt), sentiment_records(450, seed=5), sentiment_records(90, seed=6), lr=1e-2)


def test_site_sends_only_the_prompt_encoder(task: PTuningTask) -> None:
    token_dim = task.model.get_input_embeddings().embedding_dim
    server_side = PeftPromptEncoderWeights(token_dim, 10, token_dim).state_dict()
    state, metrics, steps = run_round(task, server_side, epochs=1, seed=0)
    # Same names and shapes as the server's module, so FedAvg can average them.
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in server_side.items()}
    assert set(state) == {
        "embedding.weight",
        "mlp_head.0.weight",
        "mlp_head.0.bias",
        "mlp_head.2.weight",
        "mlp_head.2.bias",
        "mlp_head.4.weight",
        "mlp_head.4.bias",
    }
    # Bytes: 10 virtual tokens × d + three d×d layers with biases, fp32 — a small fraction of the base model.
    d = token_dim
    expected = 4 * (10 * d + 3 * (d * d + d))
    assert state_bytes(state) == expected == metrics["bytes_sent"]
    base_bytes = sum(p.numel() * p.element_size() for p in task.model.base_model.parameters())
    assert expected < base_bytes / 3
    assert steps == len(range(0, 450, 16))
    # The base model is frozen: its parameters get no gradients and did not change.
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    assert trainable and all("prompt_encoder" in n for n in trainable)


def test_ptuning_learns_the_task(task: PTuningTask) -> None:
    token_dim = task.model.get_input_embeddings().embedding_dim
    untuned = PeftPromptEncoderWeights(token_dim, 10, token_dim).state_dict()
    state, metrics, _ = run_round(task, untuned, epochs=4, seed=1)
    majority = Counter(r["label"] for r in task.val_records).most_common(1)[0][1] / len(task.val_records)
    assert metrics["global_val_accuracy"] < majority + 0.05  # the untuned prompt does not solve the task
    assert metrics["val_accuracy"] > max(0.75, majority + 0.3)
    assert metrics["val_loss"] < metrics["global_val_loss"]
    # Predictions are label words, generated.
    assert set(task.predict([r["sentence"] for r in task.val_records[:10]])) <= {"positive", "neutral", "negative"}
    # Loading the sent state elsewhere reproduces the accuracy: the state is the whole adaptation.
    task.load_exchanged_state(state)
    assert task.evaluate()["val_accuracy"] == pytest.approx(metrics["val_accuracy"])


def test_mismatched_global_state_is_refused_with_the_fix(task: PTuningTask) -> None:
    wrong = PeftPromptEncoderWeights(token_dim=32, num_virtual_tokens=10).state_dict()
    with pytest.raises(ValueError, match="token_dim = the model's hidden size"):
        task.load_exchanged_state(wrong)
    assert prompt_encoder(task.model).embedding.weight.shape[1] != 32


def test_initial_global_prompt_encoder_is_seeded() -> None:
    # Every run of a job starts from the same global state, so runs (and the demo) are comparable.
    def state(seed: int) -> list[torch.Tensor]:
        return list(PeftPromptEncoderWeights(32, 4, 16, seed=seed).state_dict().values())

    assert all(torch.equal(a, b) for a, b in zip(state(0), state(0), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(state(0), state(1), strict=True))
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    state(0)
    assert torch.equal(torch.rand(1), expected)  # the caller's random stream is left alone


def test_a_dp_round_changes_the_prompt_encoder(tiny_gpt) -> None:
    from fedllm.training.dp import DPSettings

    torch.manual_seed(0)
    task = PTuningTask(str(tiny_gpt), sentiment_records(60, seed=5), sentiment_records(10, seed=6), lr=1e-2)
    before = {k: v.clone() for k, v in prompt_encoder(task.model).state_dict().items()}
    settings = DPSettings(delta=1e-5, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25)
    outcome = task.train_dp(settings, steps=3, seed=0)
    after = prompt_encoder(task.model).state_dict()
    assert outcome.steps == 3
    assert all((after[k] - before[k]).abs().max() > 0 for k in before)  # every tensor moved (opacus#820's symptom)
    assert all(p.grad_sample is None for p in prompt_encoder(task.model).parameters() if hasattr(p, "grad_sample"))


def test_dp_clips_each_record_not_the_batch(tiny_gpt) -> None:
    """PEFT runs the encoder once and repeats it (peft#2043): Opacus would see one "record" per batch, and clip that."""
    from opacus.grad_sample import GradSampleHooks

    task = PTuningTask(str(tiny_gpt), sentiment_records(8, seed=5), sentiment_records(4, seed=6))
    encoder = prompt_encoder(task.model)
    batch = task._batch(task.train_examples[:5])
    task.model.eval()  # no dropout in the base, so both forwards are comparable
    encoder.train()  # Opacus' hooks capture activations in train mode only
    expected = task.model(**batch).logits.detach()
    hooks = GradSampleHooks(encoder, batch_first=True, loss_reduction="sum")
    try:
        with task._per_record_prompts():
            logits = task.model(**batch).logits
            logits.sum().backward()
        samples = {name: p.grad_sample.detach().clone() for name, p in encoder.named_parameters() if p.requires_grad}
    finally:
        hooks.cleanup()
    assert torch.allclose(logits.detach(), expected, atol=1e-5)  # the same prompts as PEFT's own forward
    assert "get_prompt" not in vars(task.model)  # PEFT's own again after the round
    for name, p in encoder.named_parameters():
        if p.requires_grad:
            assert samples[name].shape[0] == 5  # one gradient per record
            assert torch.allclose(samples[name].sum(0), p.grad, atol=1e-4 * p.grad.abs().max().item())
