"""Key layouts of Megatron-GPT state dicts (legacy NeMo and Megatron-core) and how each tensor is split.

Rules (Megatron's ColumnParallelLinear / RowParallelLinear / VocabParallelEmbedding):
- column-parallel, dim 0: QKV, fc1 (weight and bias), word embeddings, an untied output layer;
- row-parallel, dim 1: attention output projection and fc2 weights;
- replicated: layer norms, row-parallel biases, position embeddings, rotary buffers.
QKV rows are grouped per head ([q k v] per head or query group), so contiguous slices hold whole heads;
`megatron_legacy` checkpoints store [Q; K; V] per rank instead, and fused GLU fc1 stores [W; V] per rank:
those are split chunk by chunk ("strided").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from fedllm.checkpoint.errors import CheckpointError
from fedllm.checkpoint.model_spec import ModelSpec

# Where each tensor of a GPT layer lives in the two state-dict layouts ("layer" is formatted with i=layer).
KEY_NAMES: dict[str, dict[str, str]] = {
    "legacy": {
        "emb": "model.language_model.embedding.word_embeddings.weight",
        "pos": "model.language_model.embedding.position_embeddings.weight",
        "layer": "model.language_model.encoder.layers.{i}.",
        "ln1": "input_layernorm.",
        "qkv": "self_attention.query_key_value.",
        "proj": "self_attention.dense.",
        "ln2": "post_attention_layernorm.",
        "fc1": "mlp.dense_h_to_4h.",
        "fc2": "mlp.dense_4h_to_h.",
        "final": "model.language_model.encoder.final_layernorm.",
        "out": "model.language_model.output_layer.weight",
    },
    "mcore": {
        "emb": "model.embedding.word_embeddings.weight",
        "pos": "model.embedding.position_embeddings.weight",
        "layer": "model.decoder.layers.{i}.",
        "ln1": "self_attention.linear_qkv.layer_norm_",
        "qkv": "self_attention.linear_qkv.",
        "proj": "self_attention.linear_proj.",
        "ln2": "mlp.linear_fc1.layer_norm_",
        "fc1": "mlp.linear_fc1.",
        "fc2": "mlp.linear_fc2.",
        "final": "model.decoder.final_layernorm.",
        "out": "model.output_layer.weight",
    },
}


class Split(Enum):
    COLUMN = "column"  # dim 0
    ROW = "row"  # dim 1
    REPLICATED = "replicated"
    EXTRA_STATE = "extra_state"  # transformer-engine metadata: taken from the first source rank


@dataclass(frozen=True)
class Rule:
    split: Split
    chunks: int = 1  # column tensors stored per rank as `chunks` stacked parts ([Q;K;V] → 3, [W;V] → 2)
    vocab: bool = False  # rows are the padded vocabulary


_LAYER = re.compile(r"\.layers\.(\d+)\.")

_COLUMN = ("query_key_value", "linear_qkv", "dense_h_to_4h", "linear_fc1", "dense_h_to_4h_2")
_ROW = ("self_attention.dense", "linear_proj", "dense_4h_to_h", "linear_fc2")


def layer_index(key: str) -> int | None:
    """The transformer layer a key belongs to (None for embeddings and the final norm)."""
    m = _LAYER.search(key)
    return int(m.group(1)) if m else None


def is_mcore(keys: list[str]) -> bool:
    return any(k.startswith("model.decoder.") or k.startswith("model.embedding.") for k in keys)


def rule_for(key: str, spec: ModelSpec) -> Rule:
    """The split rule of one state-dict key; unknown tensors are an error rather than a guess."""
    if key.endswith("_extra_state"):
        return Rule(Split.EXTRA_STATE)
    leaf = key.rsplit(".", 1)[-1]
    module = key[: -len(leaf) - 1]
    if "word_embeddings" in module or module.endswith("output_layer"):
        return Rule(Split.COLUMN, vocab=True)
    if "position_embeddings" in module or leaf == "inv_freq":
        return Rule(Split.REPLICATED)
    if "norm" in leaf or "norm" in module.rsplit(".", 1)[-1]:
        return Rule(Split.REPLICATED)  # layernorms and TE-fused layer_norm_weight/bias
    module_tail = module.split(".layers.", 1)[-1]
    if any(module_tail.endswith(name) for name in _COLUMN) and leaf in ("weight", "bias"):
        name = module_tail.rsplit(".", 1)[-1]
        chunks = 1
        if name == "query_key_value" and spec.megatron_legacy:
            chunks = 3
        elif name in ("dense_h_to_4h", "linear_fc1") and spec.fused_glu_fc1:
            chunks = 2
        return Rule(Split.COLUMN, chunks=chunks)
    if any(module_tail.endswith(name) for name in _ROW):
        return Rule(Split.ROW) if leaf == "weight" else Rule(Split.REPLICATED)
    raise CheckpointError(
        f"{spec.source}: no tensor-parallel rule for '{key}'; fedllm knows the legacy NeMo and Megatron-core "
        "Megatron-GPT layouts (see docs/checkpoints.md) — is this another model family?"
    )


def full_shape(key: str, rule: Rule, shard_shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """The merged (TP1) shape of a tensor given one rank's shard."""
    if rule.split is Split.COLUMN:
        if not shard_shape:
            raise CheckpointError(f"column-parallel tensor {key} should have rows, found a scalar")
        return (shard_shape[0] * tp, *shard_shape[1:])
    if rule.split is Split.ROW:
        if len(shard_shape) != 2:
            raise CheckpointError(f"row-parallel tensor {key} should be 2-D, found shape {shard_shape}")
        return (shard_shape[0], shard_shape[1] * tp)
    return shard_shape


def expected_full_shape(key: str, spec: ModelSpec, padded_vocab: int) -> tuple[int, ...] | None:
    """The TP1 shape the config implies for a key, or None where the config does not pin it."""
    h, ffn = spec.hidden_size, spec.ffn_hidden_size
    qkv = (spec.num_attention_heads + 2 * spec.num_query_groups) * spec.kv_channels
    proj_in = spec.num_attention_heads * spec.kv_channels
    fc1 = 2 * ffn if spec.fused_glu_fc1 else ffn
    leaf = key.rsplit(".", 1)[-1]
    rule = rule_for(key, spec)
    if rule.split is Split.EXTRA_STATE:
        return None
    if rule.vocab:
        return (padded_vocab, h)
    if "norm" in key:
        return (h,)
    table = {
        "query_key_value": (qkv, h),
        "linear_qkv": (qkv, h),
        "dense_h_to_4h": (fc1, h),
        "linear_fc1": (fc1, h),
        "dense_h_to_4h_2": (ffn, h),
        "self_attention.dense": (h, proj_in),
        "linear_proj": (h, proj_in),
        "dense_4h_to_h": (h, ffn),
        "linear_fc2": (h, ffn),
    }
    module = key[: -len(leaf) - 1]
    for name, shape in table.items():
        if module.endswith(name):
            return shape if leaf == "weight" else (shape[0],)
    return None


# Megatron-core names a layer's norms in two ways: transformer-engine fuses them into the next linear layer
# (what GPU sites and every distributed checkpoint use), the local spec (no transformer-engine) keeps them apart.
# Legacy keys (language_model.encoder.layers.N.input_layernorm) are another model and keep their names.
_MCORE_LAYER = ".decoder.layers."
_TE_TO_LOCAL = (
    (".self_attention.linear_qkv.layer_norm_", ".input_layernorm."),
    (".mlp.linear_fc1.layer_norm_", ".pre_mlp_layernorm."),
)


def local_spec_key(key: str) -> str:
    """The local-spec name of a Megatron-core key written with transformer-engine's fused norm names."""
    for te, local in _TE_TO_LOCAL if _MCORE_LAYER in key else ():
        if te in key:
            return key.replace(te, local)
    return key


def te_spec_key(key: str) -> str:
    """The transformer-engine (and distributed-checkpoint) name of a local-spec Megatron-core key."""
    for te, local in _TE_TO_LOCAL if _MCORE_LAYER in key else ():
        if local in key:
            return key.replace(local, te)
    return key
