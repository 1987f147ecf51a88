"""NeMo sources for the CPU tests: the pinned range's two ends, downloaded from PyPI as wheels.

Only their Python source is parsed (fedllm.nemo.nemo_source); nothing is imported, so no CUDA,
apex or megatron-core is needed. The wheels are cached under ~/.cache/fedllm (≈10 MB).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedllm.nemo.nemo_source import unpacked_wheel

CACHE = Path(os.environ.get("FEDLLM_CACHE", Path.home() / ".cache" / "fedllm")) / "wheels"


@dataclass(frozen=True)
class NemoRelease:
    """A NeMo release at an end of the supported range and the Lightning it runs on."""

    version: str
    root: Path  # unpacked nemo_toolkit
    lightning_root: Path
    trainer_file: str  # Lightning's Trainer module, relative to lightning_root


# nemo_toolkit 1.23 requires pytorch-lightning<=2.0.7; 2.4 requires lightning<=2.4.0 (their METADATA).
RELEASES = {
    "1.23.0": ("pytorch_lightning", "2.0.7", "pytorch_lightning/trainer/trainer.py"),
    "2.4.0": ("lightning", "2.4.0", "lightning/pytorch/trainer/trainer.py"),
}


@pytest.fixture(scope="session", params=sorted(RELEASES))
def nemo_release(request: pytest.FixtureRequest) -> NemoRelease:
    version = request.param
    lightning, lightning_version, trainer_file = RELEASES[version]
    root = unpacked_wheel("nemo_toolkit", version, CACHE, members=["nemo/core/", "nemo/collections/nlp/"])
    lroot = unpacked_wheel(lightning, lightning_version, CACHE, members=[trainer_file.split("/")[0] + "/"])
    return NemoRelease(version, root, lroot, trainer_file)


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
