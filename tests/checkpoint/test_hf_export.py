"""Export to Hugging Face (GPT-2, GPT-NeoX): transformers loads it and gives the tensor-parallel forward's logits."""

from __future__ import annotations

import json

import pytest
import torch

from fedllm.checkpoint import CheckpointError
from fedllm.checkpoint.hf_export import export_hf
from fedllm.cli.main import main
from tests.support.nemo_files import load_ranks
from tests.support.synthetic_checkpoint import TinyGPT
from tests.support.tp_forward import tp_logits

transformers = pytest.importorskip("transformers")

TOKENS = torch.tensor([3, 17, 250, 299, 0, 42, 8, 123, 5, 6])


@pytest.mark.parametrize(
    ("model", "tp"),
    [
        (TinyGPT(layout="legacy", seed=11), 2),
        (TinyGPT(layout="legacy", megatron_legacy=True, tied=False, seed=12), 4),
        (TinyGPT(layout="mcore", num_attention_heads=8, seed=13), 2),
    ],
    ids=["legacy-tied-tp2", "legacy-qkv-untied-tp4", "mcore-tp2"],
)
def test_exported_gpt2_matches_tensor_parallel_logits(tmp_path, model, tp):
    src = model.write(tmp_path / "m.nemo", tp)
    cfg, ranks = load_ranks(src)
    want = tp_logits(ranks, cfg, TOKENS, model.vocab_size)
    out = export_hf(src, tmp_path / "hf", max_shard_bytes=20_000)  # small shards: exercises the index
    assert (out / "model.safetensors.index.json").exists()
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        got = hf(TOKENS[None]).logits[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert hf.config.vocab_size == model.vocab_size


@pytest.mark.parametrize(
    ("model", "tp"),
    [
        (TinyGPT(layout="mcore", position_embedding_type="rope", rotary_percentage=0.5, seed=21), 2),
        (TinyGPT(layout="legacy", position_embedding_type="rope", megatron_legacy=True, tied=False, seed=22), 4),
    ],
    ids=["mcore-rope-half-tp2", "legacy-qkv-rope-untied-tp4"],
)
def test_exported_gpt_neox_matches_tensor_parallel_logits(tmp_path, model, tp):
    src = model.write(tmp_path / "m.nemo", tp)
    cfg, ranks = load_ranks(src)
    want = tp_logits(ranks, cfg, TOKENS, model.vocab_size)
    out = export_hf(src, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "GPTNeoXForCausalLM" and hf.config.use_parallel_residual is False
    with torch.no_grad():
        got = hf(TOKENS[None]).logits[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_rope_changes_logits():
    """The rotary path of the reference forward is live (guards the NeoX comparison against a no-op)."""
    model = TinyGPT(layout="mcore", position_embedding_type="rope", seed=21)
    ranks = model.split(model.full_weights(), 1)
    cfg = model.config(1)
    with_rope = tp_logits(ranks, cfg, TOKENS, model.vocab_size)
    without = tp_logits(ranks, {**cfg, "position_embedding_type": "none"}, TOKENS, model.vocab_size)
    assert not torch.allclose(with_rope, without)


def test_unsupported_settings_are_named(tmp_path):
    src = TinyGPT(layout="mcore", activation="swiglu", num_attention_heads=8, num_query_groups=4).write(
        tmp_path / "m.nemo", 2
    )
    with pytest.raises(CheckpointError, match=r"GPT-2: activation=swiglu.*num_query_groups=4"):
        export_hf(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and [p.name for p in tmp_path.iterdir()] == ["m.nemo"]


def test_cli_export(tmp_path, capsys):
    src = TinyGPT().write(tmp_path / "m.nemo", 1)
    assert main(["ckpt", "export-hf", str(src), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").exists()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (
        config["model_type"] == "gpt2" and "dtype" in config and "torch_dtype" not in config
    )  # not the deprecated key
    assert "GPT-2" in capsys.readouterr().out
