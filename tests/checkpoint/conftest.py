"""Tiny Megatron-GPT .nemo files, written the way NeMo's save_to writes them."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch
import yaml

from fedllm.checkpoint.synthetic import TinyGPT


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


@pytest.fixture
def gpt2_vocab_model() -> TinyGPT:
    """GPT-2's vocabulary (50257) so padding differs per TP: 50688 at TP4, 50432 at TP2 (×128·TP)."""
    return TinyGPT(
        hidden_size=8, ffn_hidden_size=16, num_attention_heads=4, vocab_size=50257, make_vocab_size_divisible_by=128
    )
