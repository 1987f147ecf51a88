"""Megatron-core's two names for a layer's norms map onto each other; legacy keys keep theirs."""

from __future__ import annotations

import pytest

from fedllm.checkpoint.layout import local_spec_key, te_spec_key

PAIRS = [
    (
        "model.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
        "model.decoder.layers.0.input_layernorm.weight",
    ),
    ("model.decoder.layers.11.mlp.linear_fc1.layer_norm_bias", "model.decoder.layers.11.pre_mlp_layernorm.bias"),
]


@pytest.mark.parametrize(("te", "local"), PAIRS)
def test_fused_and_separate_norm_names_map_both_ways(te: str, local: str) -> None:
    assert local_spec_key(te) == local and te_spec_key(local) == te


@pytest.mark.parametrize(
    "key",
    [
        "model.decoder.layers.0.self_attention.linear_qkv.weight",
        "model.decoder.final_layernorm.weight",
        "model.embedding.word_embeddings.weight",
        "model.language_model.encoder.layers.0.input_layernorm.weight",  # legacy: another model's name
    ],
)
def test_other_keys_keep_their_names(key: str) -> None:
    assert te_spec_key(key) == key and local_spec_key(key) == key
