"""A Megatron-GPT's full weights as SFT exchanges them: the same names on every site and on the server.

Megatron-core names a layer's norms after the transformer-engine linear layer they are fused into; the
local spec (sites without transformer-engine, CPU) keeps them as separate modules. Both exchange the
transformer-engine names, which are also the names of the distributed base checkpoint the server reads,
so a CPU site and a GPU site average the same tensors. Legacy checkpoints have one naming and pass through.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedllm.checkpoint.layout import te_spec_key
from fedllm.training.nemo.errors import NemoStateError


def _is_weight(key: str, value: Any) -> bool:
    # Transformer-engine metadata (_extra_state) is not a weight: never averaged, never sent.
    return isinstance(value, torch.Tensor) and not key.endswith("_extra_state")


def exchange_names(state: Mapping[str, Any]) -> dict[str, str]:
    """Exchanged name → the model's own name, for every weight in a model's state dict."""
    return {te_spec_key(k): k for k, v in state.items() if _is_weight(k, v)}


def model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under their exchanged names (float32, on the CPU)."""
    state = model.state_dict()
    return {name: state[own].detach().to("cpu", torch.float32) for name, own in exchange_names(state).items()}


def load_weights(model: torch.nn.Module, weights: Mapping[str, Any], fits: str, fix: str) -> None:
    """Load exchanged weights into `model`; refuse a set of names that is not exactly the model's own."""
    names = exchange_names(model.state_dict())
    missing, unexpected = sorted(set(names) - set(weights)), sorted(set(weights) - set(names))
    if missing or unexpected:
        raise NemoStateError(
            f"{fits}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            f"{f' ({len(missing)} missing, {len(unexpected)} unexpected)' if len(missing + unexpected) > 5 else ''}"
            f". Fix: {fix}"
        )
    # The names were checked above; non-strict only lets transformer-engine's extra states (not
    # exchanged) stay as they are. NeMo's load_state_dict returns nothing to check afterwards.
    model.load_state_dict({names[k]: torch.as_tensor(v) for k, v in weights.items()}, strict=False)
