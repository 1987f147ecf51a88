"""LoRA and full SFT on {"input", "output"} pairs with a tiny GPT: what is exchanged and that the loss falls."""

from __future__ import annotations

import pytest
import torch

from fedllm.data.synthetic import sentiment_records
from fedllm.flare.server_models import CausalLMWeights, LoraAdapterWeights, ParameterTree
from fedllm.training.core import run_round, state_bytes
from fedllm.training.hf.sft import SFTTask


def _pairs(n: int, seed: int) -> list[dict[str, str]]:
    return [
        {"input": f"Classify the sentiment: {r['sentence']}", "output": r["label"]}
        for r in sentiment_records(n, seed=seed)
    ]


def test_lora_exchanges_only_the_adapter_and_learns(tiny_gpt) -> None:
    task = SFTTask(str(tiny_gpt), _pairs(200, 1), _pairs(40, 2), method="lora", lr=3e-3, batch_size=16)
    server = LoraAdapterWeights(str(tiny_gpt)).state_dict()
    state, metrics, _ = run_round(task, server, epochs=3, seed=0)
    assert set(state) == set(server) and state and all(".lora_A." in k or ".lora_B." in k for k in state)
    assert all(state[k].shape == server[k].shape for k in state)
    base_bytes = sum(p.numel() * p.element_size() for p in task.model.get_base_model().parameters())
    assert metrics["bytes_sent"] == state_bytes(state) < base_bytes / 10
    assert metrics["val_loss"] < metrics["global_val_loss"] * 0.8


def test_full_sft_exchanges_every_weight_and_learns(tiny_gpt) -> None:
    task = SFTTask(str(tiny_gpt), _pairs(200, 1), _pairs(40, 2), method="full", lr=1e-3, batch_size=16)
    server = CausalLMWeights(str(tiny_gpt)).state_dict()
    state, metrics, _ = run_round(task, server, epochs=2, seed=0)
    assert set(state) == set(server)
    assert metrics["bytes_sent"] >= sum(p.numel() * 4 for p in task.model.parameters())
    assert metrics["val_loss"] < metrics["global_val_loss"] * 0.8
    assert task.generate(_pairs(1, 9)[0]["input"], max_new_tokens=3).split()[0] in {"positive", "neutral", "negative"}


def test_wrong_global_state_is_refused(tiny_gpt) -> None:
    task = SFTTask(str(tiny_gpt), _pairs(8, 1), _pairs(4, 2), method="lora")
    with pytest.raises(ValueError, match="initial_model must be built from the same --model"):
        task.load_exchanged_state({"foo.weight": torch.zeros(2)})


def test_parameter_tree_keeps_dotted_names() -> None:
    tree = ParameterTree({"a.b.weight": torch.ones(2, 3), "a.bias": torch.zeros(2), "top": torch.ones(1)})
    assert {k: tuple(v.shape) for k, v in tree.state_dict().items()} == {
        "a.b.weight": (2, 3),
        "a.bias": (2,),
        "top": (1,),
    }
