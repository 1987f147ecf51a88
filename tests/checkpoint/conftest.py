"""Tiny Megatron-GPT .nemo files, written the way NeMo's save_to writes them."""

from __future__ import annotations

import pytest

from tests.support.synthetic_checkpoint import TinyGPT


@pytest.fixture
def gpt2_vocab_model() -> TinyGPT:
    """GPT-2's vocabulary (50257) so padding differs per TP: 50688 at TP4, 50432 at TP2 (×128·TP)."""
    return TinyGPT(
        hidden_size=8, ffn_hidden_size=16, num_attention_heads=4, vocab_size=50257, make_vocab_size_divisible_by=128
    )
