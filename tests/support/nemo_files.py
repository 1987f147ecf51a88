"""Tiny `.nemo` archives laid out as NeMo lays them out, for tests that need a checkpoint file but no NeMo."""

from __future__ import annotations

import copy
import io
import tarfile
from pathlib import Path

import torch
import yaml


def write_nemo(path: Path, config: dict, shards: list[dict] | None = None) -> Path:
    """A .nemo archive as NeMo lays it out: model_config.yaml + weights (top level at TP=1, mp_rank_XX/ else)."""
    import io
    import tarfile

    import torch
    import yaml

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:") as tar:
        add(tar, "./model_config.yaml", yaml.safe_dump(config).encode())
        for rank, state in enumerate(shards or []):
            buf = io.BytesIO()
            torch.save(state, buf)
            name = "./model_weights.ckpt" if len(shards or []) == 1 else f"./mp_rank_{rank:02d}/model_weights.ckpt"
            add(tar, name, buf.getvalue())
    return path


def gpt_config(tp: int = 1, hidden: int = 64, layers: int = 2) -> dict:
    """The model_config.yaml fields of a (tiny) Megatron-GPT that fedllm reads."""
    return {
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": 1,
        "hidden_size": hidden,
        "num_layers": layers,
        "num_attention_heads": 4,
        "ffn_hidden_size": 4 * hidden,
        "encoder_seq_length": 128,
        "max_position_embeddings": 128,
        "precision": "bf16",
        "target": "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel",
    }


def gpt_shard(hidden: int, vocab: int, tp: int) -> dict:
    """One TP rank's legacy Megatron-GPT tensors (column-parallel ones split on dim 0)."""
    import torch

    return {
        "model.language_model.embedding.word_embeddings.weight": torch.randn(vocab // tp, hidden),
        "model.language_model.encoder.layers.0.self_attention.query_key_value.weight": torch.randn(
            3 * hidden // tp, hidden
        ),
        "model.language_model.encoder.final_layernorm.weight": torch.ones(hidden),
    }


def load_ranks(path) -> tuple[dict, list[dict]]:
    """Config and every rank's state dict of a .nemo, read with tarfile + torch.load (not fedllm's reader)."""
    with tarfile.open(path, "r:*") as tar:
        files = {m.name.removeprefix("./"): tar.extractfile(m).read() for m in tar if m.isfile()}
    cfg = yaml.safe_load(files["model_config.yaml"])
    tp = cfg["tensor_model_parallel_size"]
    names = ["model_weights.ckpt"] if tp == 1 else [f"mp_rank_{r:02d}/model_weights.ckpt" for r in range(tp)]
    return cfg, [torch.load(io.BytesIO(files[n]), weights_only=False) for n in names]


def tar_members(path) -> dict[str, bytes]:
    with tarfile.open(path, "r:*") as tar:
        return {m.name.removeprefix("./"): tar.extractfile(m).read() for m in tar if m.isfile()}


def write_members(path: Path, members: dict[str, bytes], *, gzip: bool = False) -> Path:
    """A tar of `members` (name → bytes) in that order, replacing `path`: a .nemo rebuilt around changed members."""
    path.unlink(missing_ok=True)
    with tarfile.open(path, "w:gz" if gzip else "w:") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def replace_member(source: Path, target: Path, name: str, data: bytes) -> Path:
    """`source` copied to `target` entry by entry (headers, order, directories, compression) with member `name`'s
    bytes replaced: damage inside one member, the tar around it intact."""
    gzip = source.read_bytes()[:2] == b"\x1f\x8b"
    with tarfile.open(source, "r:*") as src, tarfile.open(target, "w:gz" if gzip else "w:", format=src.format) as dst:
        for info in src:
            if info.isfile() and info.name.removeprefix("./") == name:
                info = copy.copy(info)
                info.size = len(data)
                dst.addfile(info, io.BytesIO(data))
            else:
                dst.addfile(info, src.extractfile(info) if info.isfile() else None)
    return target
