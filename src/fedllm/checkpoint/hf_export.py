"""Export a Megatron-GPT .nemo to a Hugging Face folder (config.json + sharded safetensors).

GPT-2 architecture for learned-absolute positions, (exact-erf or tanh) gelu, layernorm with biases and one
K/V head per query head: the state maps one to one (QKV reordered from Megatron's per-head [q k v] groups to
GPT-2's [Q; K; V], Linear weights transposed for GPT-2's Conv1D, vocabulary padding dropped). Anything GPT-2
cannot express (rotary positions, GLU MLPs, RMSNorm, grouped-query attention) is refused with the setting named.
Tensors are merged from the TP shards one at a time and written in shards, so memory stays at one shard.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from fedllm.checkpoint.archive import NemoArchive
from fedllm.checkpoint.errors import CheckpointError
from fedllm.checkpoint.layout import is_mcore, rule_for
from fedllm.checkpoint.model_spec import ModelSpec
from fedllm.checkpoint.reshard import merged_tensor
from fedllm.checkpoint.vocab import resolve_vocab_size

_LEGACY = {
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
}
_MCORE = {
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
}


def _refuse(spec: ModelSpec, cfg: dict) -> None:
    problems = []
    if spec.position_embedding_type != "learned_absolute":
        problems.append(
            f"position_embedding_type={spec.position_embedding_type} (GPT-2 has learned absolute positions; a "
            "GPT-NeoX export for rotary models is not implemented yet)"
        )
    if spec.glu:
        problems.append(f"activation={spec.activation} (GPT-2's MLP has no gate)")
    elif spec.activation not in ("gelu", "fast-gelu", "approx-gelu"):
        problems.append(f"activation={spec.activation} (GPT-2 supports gelu)")
    if str(cfg.get("normalization", "layernorm")) not in ("layernorm", "layernorm1p"):
        problems.append(f"normalization={cfg.get('normalization')} (GPT-2 uses LayerNorm)")
    if str(cfg.get("normalization")) == "layernorm1p":
        problems.append("normalization=layernorm1p (weights are stored minus one; not converted)")
    if spec.num_query_groups != spec.num_attention_heads:
        problems.append(f"num_query_groups={spec.num_query_groups} (GPT-2 has one K/V head per query head)")
    if spec.kv_channels * spec.num_attention_heads != spec.hidden_size:
        problems.append(f"kv_channels={spec.kv_channels} (GPT-2 needs kv_channels × heads = hidden_size)")
    if cfg.get("transformer_block_type", "pre_ln") != "pre_ln":
        problems.append(f"transformer_block_type={cfg.get('transformer_block_type')} (GPT-2 is pre-LN)")
    if problems:
        raise CheckpointError(
            f"{spec.source}: cannot export to Hugging Face GPT-2: " + "; ".join(problems) + ". Keep using the .nemo "
            "with the NeMo backend"
        )


def _qkv_to_gpt2(t: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Megatron's rows are [q_h; k_h; v_h] per head (or [Q; K; V] for megatron_legacy); GPT-2 wants [Q; K; V]."""
    if spec.megatron_legacy:
        return t
    heads, kv = spec.num_attention_heads, spec.kv_channels
    return t.reshape(heads, 3, kv, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def export_hf(
    source: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, vocab_size: int | None = None,
    max_shard_bytes: int = 2 << 30, overwrite: bool = False,
) -> Path:  # fmt: skip
    """Write config.json + model(-0000N-of-0000M).safetensors (+ index) that transformers loads as GPT-2."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir}: exists and is not empty; choose a new folder or pass --overwrite")
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with NemoArchive(source, scratch_dir=out_dir.parent) as archive:
            spec = ModelSpec.from_config(archive.config, str(archive.path))
            if archive.pp != 1:
                raise CheckpointError(f"{archive.path}: pipeline_model_parallel_size={archive.pp}; export needs PP=1")
            cfg = archive.config
            _refuse(spec, cfg)
            ranks = [archive.open_rank(r) for r in range(archive.tp)]
            try:
                keys = ranks[0].keys()
                names = _MCORE if is_mcore(keys) else _LEGACY
                padded = ranks[0].state[names["emb"]].shape[0] * archive.tp
                vocab = resolve_vocab_size(archive, vocab_size, padded)
                tied = names["out"] not in ranks[0].state
                dtype = ranks[0].state[names["emb"]].dtype

                def merged(key: str) -> torch.Tensor:
                    rule = rule_for(key, spec)
                    t = merged_tensor(key, rule, [sd.state[key] for sd in ranks])
                    return t[:vocab] if rule.vocab else t

                def zeros_or(key: str, n: int) -> torch.Tensor:
                    return merged(key) if key in ranks[0].state else torch.zeros(n, dtype=dtype)

                def tensors() -> Iterator[tuple[str, torch.Tensor]]:
                    h = spec.hidden_size
                    yield "transformer.wte.weight", merged(names["emb"])
                    yield "transformer.wpe.weight", merged(names["pos"])
                    for i in range(spec.num_layers):
                        p, q = names["layer"].format(i=i), f"transformer.h.{i}."
                        yield q + "ln_1.weight", merged(p + names["ln1"] + "weight")
                        yield q + "ln_1.bias", zeros_or(p + names["ln1"] + "bias", h)
                        yield (
                            q + "attn.c_attn.weight",
                            _qkv_to_gpt2(merged(p + names["qkv"] + "weight"), spec).T.contiguous(),
                        )
                        yield q + "attn.c_attn.bias", _qkv_to_gpt2(zeros_or(p + names["qkv"] + "bias", 3 * h), spec)
                        yield q + "attn.c_proj.weight", merged(p + names["proj"] + "weight").T.contiguous()
                        yield q + "attn.c_proj.bias", zeros_or(p + names["proj"] + "bias", h)
                        yield q + "ln_2.weight", merged(p + names["ln2"] + "weight")
                        yield q + "ln_2.bias", zeros_or(p + names["ln2"] + "bias", h)
                        yield q + "mlp.c_fc.weight", merged(p + names["fc1"] + "weight").T.contiguous()
                        yield q + "mlp.c_fc.bias", zeros_or(p + names["fc1"] + "bias", spec.ffn_hidden_size)
                        yield q + "mlp.c_proj.weight", merged(p + names["fc2"] + "weight").T.contiguous()
                        yield q + "mlp.c_proj.bias", zeros_or(p + names["fc2"] + "bias", h)
                    yield "transformer.ln_f.weight", merged(names["final"] + "weight")
                    yield "transformer.ln_f.bias", zeros_or(names["final"] + "bias", h)
                    if not tied:
                        yield "lm_head.weight", merged(names["out"])

                shards: list[dict[str, torch.Tensor]] = [{}]
                files: list[Path] = []
                weight_map: dict[str, int] = {}
                size = total = 0
                for name, t in tensors():
                    if size and size + t.numel() * t.element_size() > max_shard_bytes:
                        files.append(tmp / f"part-{len(files)}.safetensors")
                        save_file(shards[-1], files[-1], metadata={"format": "pt"})
                        shards[-1], size = {}, 0
                    shards[-1][name] = t
                    weight_map[name] = len(files)
                    size += t.numel() * t.element_size()
                    total += t.numel() * t.element_size()
                files.append(tmp / f"part-{len(files)}.safetensors")
                save_file(shards[-1], files[-1], metadata={"format": "pt"})
            finally:
                for sd in ranks:
                    sd.close()
            _name_shards(tmp, files, weight_map, total)
            act = "gelu_new" if cfg.get("openai_gelu") or spec.activation == "approx-gelu" else "gelu"
            config = {
                "architectures": ["GPT2LMHeadModel"],
                "model_type": "gpt2",
                "vocab_size": vocab,
                "n_positions": int(cfg.get("max_position_embeddings") or cfg.get("encoder_seq_length")),
                "n_embd": spec.hidden_size,
                "n_layer": spec.num_layers,
                "n_head": spec.num_attention_heads,
                "n_inner": spec.ffn_hidden_size,
                "activation_function": act,
                "layer_norm_epsilon": float(cfg.get("layernorm_epsilon", 1e-5)),
                "resid_pdrop": 0.0,
                "embd_pdrop": 0.0,
                "attn_pdrop": 0.0,
                "tie_word_embeddings": tied,
                "scale_attn_weights": True,
                "torch_dtype": str(dtype).removeprefix("torch."),
                "bos_token_id": 50256 if vocab == 50257 else 0,
                "eos_token_id": 50256 if vocab == 50257 else 0,
            }
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            for name in archive.artifact_names():  # tokenizer files, byte for byte, for the user to wire up
                (tmp / "nemo_artifacts").mkdir(exist_ok=True)
                (tmp / "nemo_artifacts" / name.replace("/", "_")).write_bytes(archive.read_member(name))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _name_shards(folder: Path, files: list[Path], weight_map: dict[str, int], total: int) -> None:
    """Give the shards transformers' names; several shards get a model.safetensors.index.json."""
    if len(files) == 1:
        files[0].rename(folder / "model.safetensors")
        return
    n = len(files)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for f, name in zip(files, names, strict=True):
        f.rename(folder / name)
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[v] for k, v in weight_map.items()}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
