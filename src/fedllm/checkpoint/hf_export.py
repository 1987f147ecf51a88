"""Export a Megatron-GPT .nemo to a Hugging Face folder (config.json + sharded safetensors).

GPT-2 for learned-absolute positions, GPT-NeoX (sequential residual, rotary_pct from the config) for rotary
models; both with gelu, LayerNorm and one K/V head per query head. The state maps one to one: QKV rows
reordered where the layouts differ (GPT-2 wants [Q; K; V], NeoX per-head [q k v] like Megatron), Linear
weights transposed for GPT-2's Conv1D, vocabulary padding dropped. What neither can express (GLU MLPs,
RMSNorm, grouped-query attention, other position encodings) is refused with the setting named.
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
from fedllm.checkpoint.layout import KEY_NAMES, is_mcore, rule_for
from fedllm.checkpoint.model_spec import ModelSpec
from fedllm.checkpoint.reshard import merged_tensor
from fedllm.checkpoint.vocab import resolve_vocab_size


def _architecture(spec: ModelSpec, cfg: dict) -> str:
    """gpt2 or gpt_neox; refuse, naming each setting, what neither can express."""
    problems = []
    arch = {"learned_absolute": "gpt2", "rope": "gpt_neox"}.get(spec.position_embedding_type)
    if arch is None:
        problems.append(
            f"position_embedding_type={spec.position_embedding_type} (GPT-2 takes learned_absolute, GPT-NeoX rope)"
        )
    name = {"gpt2": "GPT-2", "gpt_neox": "GPT-NeoX"}.get(arch or "", "GPT-2/GPT-NeoX")
    if spec.glu:
        problems.append(f"activation={spec.activation} ({name}'s MLP has no gate)")
    elif spec.activation not in ("gelu", "fast-gelu", "approx-gelu"):
        problems.append(f"activation={spec.activation} ({name} supports gelu)")
    if str(cfg.get("normalization", "layernorm")) != "layernorm":
        problems.append(f"normalization={cfg.get('normalization')} ({name} uses LayerNorm)")
    if spec.num_query_groups != spec.num_attention_heads:
        problems.append(f"num_query_groups={spec.num_query_groups} ({name} has one K/V head per query head)")
    if spec.kv_channels * spec.num_attention_heads != spec.hidden_size:
        problems.append(f"kv_channels={spec.kv_channels} ({name} needs kv_channels × heads = hidden_size)")
    if cfg.get("transformer_block_type", "pre_ln") != "pre_ln":
        problems.append(f"transformer_block_type={cfg.get('transformer_block_type')} ({name} is pre-LN)")
    if problems:
        raise CheckpointError(
            f"{spec.source}: cannot export to Hugging Face {name}: " + "; ".join(problems) + ". Keep using the "
            ".nemo with the NeMo backend"
        )
    assert arch is not None
    return arch


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


def export_hf(
    source: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, vocab_size: int | None = None,
    max_shard_bytes: int = 2 << 30, overwrite: bool = False,
) -> Path:  # fmt: skip
    """Write config.json + model(-0000N-of-0000M).safetensors (+ index) that transformers loads."""
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
            arch = _architecture(spec, cfg)
            ranks = [archive.open_rank(r) for r in range(archive.tp)]
            try:
                keys = ranks[0].keys()
                names = KEY_NAMES["mcore" if is_mcore(keys) else "legacy"]
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

                def neox_tensors() -> Iterator[tuple[str, torch.Tensor]]:
                    h = spec.hidden_size
                    yield "gpt_neox.embed_in.weight", merged(names["emb"])
                    for i in range(spec.num_layers):
                        p, q = names["layer"].format(i=i), f"gpt_neox.layers.{i}."
                        yield q + "input_layernorm.weight", merged(p + names["ln1"] + "weight")
                        yield q + "input_layernorm.bias", zeros_or(p + names["ln1"] + "bias", h)
                        yield (
                            q + "attention.query_key_value.weight",
                            _qkv_to_neox(merged(p + names["qkv"] + "weight"), spec),
                        )
                        yield (
                            q + "attention.query_key_value.bias",
                            _qkv_to_neox(zeros_or(p + names["qkv"] + "bias", 3 * h), spec),
                        )
                        yield q + "attention.dense.weight", merged(p + names["proj"] + "weight")
                        yield q + "attention.dense.bias", zeros_or(p + names["proj"] + "bias", h)
                        yield q + "post_attention_layernorm.weight", merged(p + names["ln2"] + "weight")
                        yield q + "post_attention_layernorm.bias", zeros_or(p + names["ln2"] + "bias", h)
                        yield q + "mlp.dense_h_to_4h.weight", merged(p + names["fc1"] + "weight")
                        yield q + "mlp.dense_h_to_4h.bias", zeros_or(p + names["fc1"] + "bias", spec.ffn_hidden_size)
                        yield q + "mlp.dense_4h_to_h.weight", merged(p + names["fc2"] + "weight")
                        yield q + "mlp.dense_4h_to_h.bias", zeros_or(p + names["fc2"] + "bias", h)
                    yield "gpt_neox.final_layer_norm.weight", merged(names["final"] + "weight")
                    yield "gpt_neox.final_layer_norm.bias", zeros_or(names["final"] + "bias", h)
                    # written out even when tied: "embed_out" is the name transformers 4 and 5 both load
                    yield "embed_out.weight", merged(names["emb"] if tied else names["out"])

                def gpt2_tensors() -> Iterator[tuple[str, torch.Tensor]]:
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
                for name, t in gpt2_tensors() if arch == "gpt2" else neox_tensors():
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
            positions = int(cfg.get("max_position_embeddings") or cfg.get("encoder_seq_length"))
            eps = float(cfg.get("layernorm_epsilon", 1e-5))
            eos = 50256 if vocab == 50257 else 0  # GPT-2 BPE's <|endoftext|>
            if arch == "gpt2":
                config = {
                    "architectures": ["GPT2LMHeadModel"],
                    "model_type": "gpt2",
                    "vocab_size": vocab,
                    "n_positions": positions,
                    "n_embd": spec.hidden_size,
                    "n_layer": spec.num_layers,
                    "n_head": spec.num_attention_heads,
                    "n_inner": spec.ffn_hidden_size,
                    "activation_function": act,
                    "layer_norm_epsilon": eps,
                    "resid_pdrop": 0.0,
                    "embd_pdrop": 0.0,
                    "attn_pdrop": 0.0,
                    "tie_word_embeddings": tied,
                    "scale_attn_weights": True,
                }
            else:
                config = {
                    "architectures": ["GPTNeoXForCausalLM"],
                    "model_type": "gpt_neox",
                    "vocab_size": vocab,
                    "hidden_size": spec.hidden_size,
                    "num_hidden_layers": spec.num_layers,
                    "num_attention_heads": spec.num_attention_heads,
                    "intermediate_size": spec.ffn_hidden_size,
                    "hidden_act": "gelu_new" if act == "gelu_new" else "gelu",
                    "max_position_embeddings": positions,
                    "rotary_pct": float(cfg.get("rotary_percentage", 1.0)),
                    "rotary_emb_base": float(cfg.get("rotary_base", 10000)),
                    "layer_norm_eps": eps,
                    "use_parallel_residual": False,  # Megatron-GPT is sequential: attention, then MLP
                    "attention_bias": True,
                    "hidden_dropout": 0.0,
                    "attention_dropout": 0.0,
                    "tie_word_embeddings": False,
                }
            config |= {"torch_dtype": str(dtype).removeprefix("torch."), "bos_token_id": eos, "eos_token_id": eos}
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
