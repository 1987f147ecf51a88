"""The p-tuning state that leaves a site: NeMo's prompt-encoder parameters, nothing of the LLM.

NeMo's PromptEncoder (encoder_type "mlp") holds `embedding` (one vector per virtual token), the
trained `mlp_head` and an `inference_table` that caches the encoder's output for generation. Only
the first two are trained, so only they are exchanged; the cache is cleared after loading (NeMo
recomputes it). The server keeps the global copy in fedllm.flare.server_models.PromptEncoderWeights,
a plain module with the same parameter names and shapes, so it never loads the LLM.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedllm.training.nemo.errors import NemoStateError

# NeMo's cached encoder output (prompt table for inference): derived from the weights, not trained.
NOT_EXCHANGED_PREFIXES = ("inference_table.",)


def _exchanged(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if not n.startswith(NOT_EXCHANGED_PREFIXES)}


def prompt_encoder_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a site sends: trained prompt-encoder parameters, float32 on CPU."""
    return {n: p.detach().to("cpu", torch.float32).clone() for n, p in _exchanged(encoder).items()}


def load_prompt_encoder_state(encoder: nn.Module, state: Mapping[str, Any]) -> None:
    """Copy the global state into the local encoder; any key or shape mismatch is an error, not a skip."""
    params = _exchanged(encoder)
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    wrong = sorted(
        f"{k}: server {tuple(torch.as_tensor(state[k]).shape)} vs local {tuple(params[k].shape)}"
        for k in set(params) & set(state)
        if tuple(torch.as_tensor(state[k]).shape) != tuple(params[k].shape)
    )
    if missing or unexpected or wrong:
        raise NemoStateError(
            "the server's prompt encoder does not match this site's: "
            f"missing {missing or 'none'}, unexpected {unexpected or 'none'}, shape mismatches {wrong or 'none'}. "
            "Fix: create the job with the template's initial_model args matching the checkpoint "
            "(token_dim = hidden_size in the .nemo's model_config.yaml, encoder_hidden = the job's --encoder-hidden)"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(torch.as_tensor(state[name]).to(param.device, param.dtype))
