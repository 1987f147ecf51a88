"""Export a Megatron-GPT .nemo to a Hugging Face folder (config.json + sharded safetensors).

GPT-2 for learned-absolute positions, GPT-NeoX (sequential residual, rotary_pct from the config) for rotary
models; both with gelu, LayerNorm and one K/V head per query head. The state maps one to one: QKV rows
reordered where the layouts differ (GPT-2 wants [Q; K; V], NeoX per-head [q k v] like Megatron), Linear
weights transposed for GPT-2's Conv1D, vocabulary padding dropped. What neither can express (GLU MLPs,
RMSNorm, grouped-query attention, other position encodings) is refused with the setting named. The
config is built with transformers' own config classes, so it is what `from_pretrained` expects.
Tensors are merged from the TP shards one at a time and written in shards, so memory stays at one shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedllm.checkpoint.archive import NemoArchive
from fedllm.checkpoint.config_fields import flag, fraction, positive_float, positive_int
from fedllm.checkpoint.config_fields import name as name_field
from fedllm.checkpoint.errors import CheckpointError
from fedllm.checkpoint.layout import KEY_NAMES, is_mcore, rule_for
from fedllm.checkpoint.model_spec import ModelSpec
from fedllm.checkpoint.reshard import merged_tensor
from fedllm.checkpoint.structure import check_structure
from fedllm.checkpoint.torch_zip import LazyStateDict
from fedllm.checkpoint.vocab import resolve_vocab_size
from fedllm.fileio import atomic_directory

Tensors = Iterator[tuple[str, torch.Tensor]]


@dataclass
class MergedWeights:
    """The full (TP-merged) tensors of a checkpoint, one at a time, by Megatron key."""

    spec: ModelSpec
    ranks: list[LazyStateDict]
    names: dict[str, str]  # fedllm.checkpoint.layout.KEY_NAMES for the checkpoint's layout
    vocab: int

    @property
    def tied(self) -> bool:
        return self.names["out"] not in self.ranks[0].state

    @property
    def dtype(self) -> torch.dtype:
        return self.ranks[0].state[self.names["emb"]].dtype

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.ranks[0].state:
            raise CheckpointError(
                f"{self.ranks[0].name}: no tensor {key}, which the Hugging Face model needs (model_config.yaml "
                f"describes a {self.spec.position_embedding_type} {self.spec.activation} model); the config or the "
                "weights are wrong"
            )
        rule = rule_for(key, self.spec)
        t = merged_tensor(key, rule, [sd.state[key] for sd in self.ranks])
        return t[: self.vocab] if rule.vocab else t

    def or_zeros(self, key: str, n: int) -> torch.Tensor:
        """Biases a bias-free model lacks are zeros in the HF model (which always has them)."""
        return self(key) if key in self.ranks[0].state else torch.zeros(n, dtype=self.dtype)

    def layer(self, i: int, part: str) -> str:
        return self.names["layer"].format(i=i) + self.names[part]


def _qkv_to_neox(t: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """GPT-NeoX wants Megatron's per-head [q k v] rows; megatron_legacy's [Q; K; V] is regrouped per head."""
    if not spec.megatron_legacy:
        return t
    heads, kv = spec.num_attention_heads, spec.kv_channels
    return t.reshape(3, heads, kv, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _qkv_to_gpt2(t: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Megatron's rows are [q_h; k_h; v_h] per head (or [Q; K; V] for megatron_legacy); GPT-2 wants [Q; K; V]."""
    if spec.megatron_legacy:
        return t
    heads, kv = spec.num_attention_heads, spec.kv_channels
    return t.reshape(heads, 3, kv, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _gelu(spec: ModelSpec, cfg: dict[str, Any]) -> str:
    return "gelu_new" if flag(cfg, "openai_gelu", spec.source, False) or spec.activation == "approx-gelu" else "gelu"


def _positions(w: MergedWeights, cfg: dict[str, Any]) -> int:
    """The sequence length the model was built for; learned position embeddings must have that many rows."""
    source = w.spec.source
    default = positive_int(cfg, "encoder_seq_length", source) if cfg.get("max_position_embeddings") is None else 1
    positions = positive_int(cfg, "max_position_embeddings", source, default)
    table = w.ranks[0].state.get(w.names["pos"])
    if table is not None and table.shape[0] != positions:
        raise CheckpointError(
            f"{source}: model_config.yaml field max_position_embeddings is {positions} but the position embedding "
            f"{w.names['pos']} has {table.shape[0]} rows; the config or the weights are wrong — re-download or "
            "re-create the checkpoint"
        )
    return positions


def _eos(vocab: int) -> int:
    return 50256 if vocab == 50257 else 0  # GPT-2 BPE's <|endoftext|>


# ---- GPT-2 -------------------------------------------------------------------------------------------------


def gpt2_tensors(w: MergedWeights) -> Tensors:
    spec, h = w.spec, w.spec.hidden_size
    yield "transformer.wte.weight", w(w.names["emb"])
    yield "transformer.wpe.weight", w(w.names["pos"])
    for i in range(spec.num_layers):
        q = f"transformer.h.{i}."
        yield q + "ln_1.weight", w(w.layer(i, "ln1") + "weight")
        yield q + "ln_1.bias", w.or_zeros(w.layer(i, "ln1") + "bias", h)
        yield q + "attn.c_attn.weight", _qkv_to_gpt2(w(w.layer(i, "qkv") + "weight"), spec).T.contiguous()
        yield q + "attn.c_attn.bias", _qkv_to_gpt2(w.or_zeros(w.layer(i, "qkv") + "bias", 3 * h), spec)
        yield q + "attn.c_proj.weight", w(w.layer(i, "proj") + "weight").T.contiguous()
        yield q + "attn.c_proj.bias", w.or_zeros(w.layer(i, "proj") + "bias", h)
        yield q + "ln_2.weight", w(w.layer(i, "ln2") + "weight")
        yield q + "ln_2.bias", w.or_zeros(w.layer(i, "ln2") + "bias", h)
        yield q + "mlp.c_fc.weight", w(w.layer(i, "fc1") + "weight").T.contiguous()
        yield q + "mlp.c_fc.bias", w.or_zeros(w.layer(i, "fc1") + "bias", spec.ffn_hidden_size)
        yield q + "mlp.c_proj.weight", w(w.layer(i, "fc2") + "weight").T.contiguous()
        yield q + "mlp.c_proj.bias", w.or_zeros(w.layer(i, "fc2") + "bias", h)
    yield "transformer.ln_f.weight", w(w.names["final"] + "weight")
    yield "transformer.ln_f.bias", w.or_zeros(w.names["final"] + "bias", h)
    if not w.tied:
        yield "lm_head.weight", w(w.names["out"])


def gpt2_config(w: MergedWeights, cfg: dict[str, Any]):
    from transformers import GPT2Config

    spec = w.spec
    return GPT2Config(
        architectures=["GPT2LMHeadModel"],
        vocab_size=w.vocab,
        n_positions=_positions(w, cfg),
        n_embd=spec.hidden_size,
        n_layer=spec.num_layers,
        n_head=spec.num_attention_heads,
        n_inner=spec.ffn_hidden_size,
        activation_function=_gelu(spec, cfg),
        layer_norm_epsilon=positive_float(cfg, "layernorm_epsilon", spec.source, 1e-5),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=w.tied,
        scale_attn_weights=True,
        bos_token_id=_eos(w.vocab),
        eos_token_id=_eos(w.vocab),
        dtype=str(w.dtype).removeprefix("torch."),
    )


# ---- GPT-NeoX ----------------------------------------------------------------------------------------------


def neox_tensors(w: MergedWeights) -> Tensors:
    spec, h = w.spec, w.spec.hidden_size
    yield "gpt_neox.embed_in.weight", w(w.names["emb"])
    for i in range(spec.num_layers):
        q = f"gpt_neox.layers.{i}."
        yield q + "input_layernorm.weight", w(w.layer(i, "ln1") + "weight")
        yield q + "input_layernorm.bias", w.or_zeros(w.layer(i, "ln1") + "bias", h)
        yield q + "attention.query_key_value.weight", _qkv_to_neox(w(w.layer(i, "qkv") + "weight"), spec)
        yield q + "attention.query_key_value.bias", _qkv_to_neox(w.or_zeros(w.layer(i, "qkv") + "bias", 3 * h), spec)
        yield q + "attention.dense.weight", w(w.layer(i, "proj") + "weight")
        yield q + "attention.dense.bias", w.or_zeros(w.layer(i, "proj") + "bias", h)
        yield q + "post_attention_layernorm.weight", w(w.layer(i, "ln2") + "weight")
        yield q + "post_attention_layernorm.bias", w.or_zeros(w.layer(i, "ln2") + "bias", h)
        yield q + "mlp.dense_h_to_4h.weight", w(w.layer(i, "fc1") + "weight")
        yield q + "mlp.dense_h_to_4h.bias", w.or_zeros(w.layer(i, "fc1") + "bias", spec.ffn_hidden_size)
        yield q + "mlp.dense_4h_to_h.weight", w(w.layer(i, "fc2") + "weight")
        yield q + "mlp.dense_4h_to_h.bias", w.or_zeros(w.layer(i, "fc2") + "bias", h)
    yield "gpt_neox.final_layer_norm.weight", w(w.names["final"] + "weight")
    yield "gpt_neox.final_layer_norm.bias", w.or_zeros(w.names["final"] + "bias", h)
    # written out even when tied: "embed_out" is the name transformers 4 and 5 both load
    yield "embed_out.weight", w(w.names["emb"] if w.tied else w.names["out"])


def neox_config(w: MergedWeights, cfg: dict[str, Any]):
    from transformers import GPTNeoXConfig

    spec = w.spec
    return GPTNeoXConfig(
        architectures=["GPTNeoXForCausalLM"],
        vocab_size=w.vocab,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads,
        intermediate_size=spec.ffn_hidden_size,
        hidden_act=_gelu(spec, cfg),
        max_position_embeddings=_positions(w, cfg),
        rotary_pct=fraction(cfg, "rotary_percentage", spec.source, 1.0),
        rotary_emb_base=positive_float(cfg, "rotary_base", spec.source, 10000.0),
        layer_norm_eps=positive_float(cfg, "layernorm_epsilon", spec.source, 1e-5),
        use_parallel_residual=False,  # Megatron-GPT is sequential: attention, then MLP
        attention_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=_eos(w.vocab),
        eos_token_id=_eos(w.vocab),
        dtype=str(w.dtype).removeprefix("torch."),
    )


@dataclass(frozen=True)
class Architecture:
    name: str
    tensors: Callable[[MergedWeights], Tensors]
    config: Callable[[MergedWeights, dict[str, Any]], Any]


ARCHITECTURES = {
    "learned_absolute": Architecture("GPT-2", gpt2_tensors, gpt2_config),
    "rope": Architecture("GPT-NeoX", neox_tensors, neox_config),
}


def architecture_for(spec: ModelSpec, cfg: dict[str, Any]) -> Architecture:
    """GPT-2 or GPT-NeoX; refuse, naming each setting, what neither can express."""
    arch = ARCHITECTURES.get(spec.position_embedding_type)
    name = arch.name if arch else "GPT-2/GPT-NeoX"
    problems = []
    if arch is None:
        problems.append(
            f"position_embedding_type={spec.position_embedding_type} (GPT-2 takes learned_absolute, GPT-NeoX rope)"
        )
    if spec.glu:
        problems.append(f"activation={spec.activation} ({name}'s MLP has no gate)")
    elif spec.activation not in ("gelu", "fast-gelu", "approx-gelu"):
        problems.append(f"activation={spec.activation} ({name} supports gelu)")
    if name_field(cfg, "normalization", spec.source, "layernorm") != "layernorm":
        problems.append(f"normalization={cfg.get('normalization')} ({name} uses LayerNorm)")
    if spec.num_query_groups != spec.num_attention_heads:
        problems.append(f"num_query_groups={spec.num_query_groups} ({name} has one K/V head per query head)")
    if spec.kv_channels * spec.num_attention_heads != spec.hidden_size:
        problems.append(f"kv_channels={spec.kv_channels} ({name} needs kv_channels × heads = hidden_size)")
    if name_field(cfg, "transformer_block_type", spec.source, "pre_ln") != "pre_ln":
        problems.append(f"transformer_block_type={cfg.get('transformer_block_type')} ({name} is pre-LN)")
    if problems or arch is None:
        raise CheckpointError(
            f"{spec.source}: cannot export to Hugging Face {name}: " + "; ".join(problems) + ". Keep using the "
            ".nemo with the NeMo backend"
        )
    return arch


def export_hf(
    source: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, vocab_size: int | None = None,
    max_shard_bytes: int = 2 << 30, overwrite: bool = False,
) -> Path:  # fmt: skip
    """Write config.json + model(-0000N-of-0000M).safetensors (+ index) that transformers loads; returns out_dir."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(
            f"{out_dir}: exists and is a file, not a folder; export-hf writes a folder (config.json + safetensors). "
            "Fix: pass --out a new or existing folder's path"
        )
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir}: exists and is not empty; choose a new folder or pass --overwrite")
    if not out_dir.parent.is_dir():
        raise CheckpointError(f"{out_dir.parent}: the folder to export into does not exist; create it first")
    with atomic_directory(out_dir, replace=True) as tmp, NemoArchive(source, scratch_dir=out_dir.parent) as archive:
        spec = ModelSpec.from_config(archive.config, str(archive.path))
        if archive.pp != 1:
            raise CheckpointError(f"{archive.path}: pipeline_model_parallel_size={archive.pp}; export needs PP=1")
        arch = architecture_for(spec, archive.config)
        ranks: list = []
        try:
            for r in range(archive.shards):
                ranks.append(archive.open_rank(r))
            found = check_structure(archive, spec, ranks)
            names = KEY_NAMES["mcore" if is_mcore(ranks[0].keys()) else "legacy"]
            if names["emb"] not in ranks[0].state:
                raise CheckpointError(f"{ranks[0].name}: no word embedding {names['emb']}; nothing to export")
            weights = MergedWeights(
                spec, ranks, names, resolve_vocab_size(archive, vocab_size, found.padded_vocab, spec)
            )
            write_safetensors(tmp, arch.tensors(weights), max_shard_bytes)
            arch.config(weights, archive.config).save_pretrained(tmp)
            for sd in ranks:  # records read only in part are read to their end: their CRC-32 must hold
                sd.finish_checks()
        finally:
            for sd in ranks:
                sd.close()
        for name in archive.artifact_names():  # tokenizer files, byte for byte, for the user to wire up
            (tmp / "nemo_artifacts").mkdir(exist_ok=True)
            (tmp / "nemo_artifacts" / name.replace("/", "_")).write_bytes(archive.read_member(name))
    return out_dir


def write_safetensors(folder: Path, tensors: Tensors, max_shard_bytes: int) -> None:
    """Tensors into shards of at most `max_shard_bytes` with transformers' names (+ index when several)."""
    from safetensors.torch import save_file

    files: list[Path] = []
    weight_map: dict[str, int] = {}
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        files.append(folder / f"part-{len(files)}.safetensors")
        save_file(shard, files[-1], metadata={"format": "pt"})

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > max_shard_bytes:
            flush()
            shard, size = {}, 0
        shard[name] = t
        weight_map[name] = len(files)
        size += nbytes
        total += nbytes
    flush()
    if len(files) == 1:
        files[0].rename(folder / "model.safetensors")
        return
    n = len(files)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for f, name in zip(files, names, strict=True):
        f.rename(folder / name)
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[v] for k, v in weight_map.items()}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
