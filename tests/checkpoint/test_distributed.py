"""NeMo 2's distributed checkpoints (model_weights/): read, verified, converted and exported like per-rank ones."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch

from fedllm.checkpoint import CheckpointError, compare_merged, convert, summarize
from fedllm.checkpoint.archive import NemoArchive
from fedllm.checkpoint.hf_export import export_hf
from tests.support.nemo_files import load_ranks
from tests.support.synthetic_checkpoint import TinyGPT, write_distributed
from tests.support.tp_forward import tp_logits

MODEL = TinyGPT(layout="mcore", num_attention_heads=4, seed=3)


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    return write_distributed(MODEL, tmp_path_factory.mktemp("dist") / "dist.nemo", saved_tp=2)


def test_the_merged_view_holds_every_weight_as_saved(dist):
    full = MODEL.full_weights()
    with NemoArchive(dist) as archive:
        assert (archive.distributed, archive.tp, archive.shards) == (True, 2, 1)
        weights = archive.open_rank(0)
        tensors = dict(weights.tensors())
        assert set(tensors) == set(full)
        for key, want in full.items():
            got = tensors[key].load()
            assert torch.equal(got[: want.shape[0]] if "word_embeddings" in key else got, want), key
        # Row reads touch only what they ask for, and agree with the whole tensor.
        qkv = tensors["model.decoder.layers.1.self_attention.linear_qkv.weight"]
        assert torch.equal(qkv.load_rows(5, 17), full["model.decoder.layers.1.self_attention.linear_qkv.weight"][5:17])
        assert isinstance(weights.state["model.decoder.layers.0.mlp.linear_fc1._extra_state"], io.BytesIO)


def test_info_verify_and_convert_to_per_rank_shards(dist, tmp_path):
    summary = summarize(dist, check_records=True)
    assert summary.layout == "mcore (distributed checkpoint)" and summary.tp == 2
    assert summary.padded_vocab == MODEL.padded_vocab(2) and summary.tensors == len(MODEL.full_weights())
    result = convert(dist, tmp_path / "tp2.nemo", 2, progress=False)
    assert (result.source_tp, result.target_tp, result.vocab_size) == (2, 2, MODEL.vocab_size)
    cfg, ranks = load_ranks(tmp_path / "tp2.nemo")
    assert cfg["tensor_model_parallel_size"] == 2 and len(ranks) == 2
    assert compare_merged(tmp_path / "tp2.nemo", MODEL.write(tmp_path / "ref_tp2.nemo", 2)) == len(MODEL.full_weights())


def test_export_to_hugging_face_gives_the_models_logits(dist, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokens = torch.tensor([3, 17, 250, 299, 0, 42])
    (rank,) = MODEL.split(MODEL.full_weights(), 1)
    want = tp_logits([rank], MODEL.config(1), tokens, MODEL.vocab_size)
    hf = transformers.GPT2LMHeadModel.from_pretrained(export_hf(dist, tmp_path / "hf")).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens[None]).logits[0], want, rtol=1e-4, atol=1e-4)


def test_a_missing_shard_file_is_named(dist, tmp_path):
    damaged = tmp_path / "damaged.nemo"
    with tarfile.open(dist) as src, tarfile.open(damaged, "w:") as dst:
        for member in src:
            if member.name.endswith("__0_0.distcp"):
                continue  # the shard file the index points at is gone
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp"):
        summarize(damaged, check_records=True)
