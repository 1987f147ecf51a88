"""Which tensors of NeMo's prompt encoder leave a site, and how the global ones are loaded back."""

from __future__ import annotations

import pytest
import torch

from fedllm.flare.server_models import PromptEncoderWeights
from fedllm.training.nemo.errors import NemoStateError
from fedllm.training.nemo.prompt_encoder import load_prompt_encoder_state, prompt_encoder_state


def test_only_the_trained_prompt_encoder_leaves_a_site():
    server = PromptEncoderWeights(total_virtual_tokens=10, token_dim=1024, encoder_hidden=2048)
    state = prompt_encoder_state(server)
    assert set(state) == {
        "embedding.weight",
        "mlp_head.0.weight",
        "mlp_head.0.bias",
        "mlp_head.2.weight",
        "mlp_head.2.bias",
    }
    assert state["embedding.weight"].shape == (10, 1024) and state["mlp_head.2.weight"].shape == (1024, 2048)
    # 10·1024 + 1024·2048 + 2048 + 2048·1024 + 1024 ≈ 4.2 M floats: 17 MB per round, not the 345M LLM.
    assert sum(t.numel() for t in state.values()) == 10 * 1024 + 2 * 1024 * 2048 + 2048 + 1024


def test_loading_the_global_state_copies_and_rejects_mismatches():
    a, b = PromptEncoderWeights(token_dim=32, encoder_hidden=16), PromptEncoderWeights(token_dim=32, encoder_hidden=16)
    load_prompt_encoder_state(b, prompt_encoder_state(a))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    with pytest.raises(NemoStateError, match=r"shape mismatches.*mlp_head\.0\.weight"):
        load_prompt_encoder_state(b, prompt_encoder_state(PromptEncoderWeights(token_dim=32, encoder_hidden=8)))
    with pytest.raises(NemoStateError, match=r"missing \[.embedding\.weight.\]"):
        load_prompt_encoder_state(b, {k: v for k, v in prompt_encoder_state(a).items() if k != "embedding.weight"})
