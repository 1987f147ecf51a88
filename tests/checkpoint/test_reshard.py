"""The streaming resharder against ground truth split independently (synthetic.TinyGPT.split)."""

from __future__ import annotations

import itertools

import pytest
import torch

from fedllm.checkpoint import compare_merged, convert, summarize
from tests.support.nemo_files import load_ranks, tar_members
from tests.support.synthetic_checkpoint import MERGES_ARTIFACT, VOCAB_ARTIFACT, TinyGPT
from tests.support.tp_forward import tp_logits

MODELS = {
    "legacy-gelu": TinyGPT(layout="legacy"),
    "legacy-qkv-fast-swiglu-untied": TinyGPT(
        layout="legacy", megatron_legacy=True, activation="fast-swiglu", tied=False
    ),
    "mcore-gelu": TinyGPT(layout="mcore"),
    "mcore-swiglu-gqa-bf16": TinyGPT(
        layout="mcore", activation="swiglu", num_query_groups=4, num_attention_heads=8, dtype=torch.bfloat16
    ),
}
PAIRS = [(a, b) for a, b in itertools.product((1, 2, 4), repeat=2) if a != b]


def _assert_ranks_equal(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for r, (g, w) in enumerate(zip(got, want, strict=True)):
        assert list(g) == list(w), f"rank {r}: key order/set differs"
        for k, v in w.items():
            if isinstance(v, torch.Tensor):
                assert g[k].dtype == v.dtype and torch.equal(g[k], v), f"rank {r}: {k} differs"


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize(("src_tp", "dst_tp"), PAIRS)
def test_convert_matches_ground_truth_and_round_trips(tmp_path, name, src_tp, dst_tp):
    model = MODELS[name]
    src = model.write(tmp_path / "src.nemo", src_tp)
    dst = convert(src, tmp_path / "dst.nemo", dst_tp, progress=False).target
    cfg, ranks = load_ranks(dst)
    assert cfg["tensor_model_parallel_size"] == dst_tp
    _assert_ranks_equal(ranks, model.split(model.full_weights(), dst_tp))
    back = convert(dst, tmp_path / "back.nemo", src_tp, progress=False).target
    assert compare_merged(back, src) > 0
    _, got = load_ranks(back)
    _, orig = load_ranks(src)
    _assert_ranks_equal(got, orig)  # bit for bit, padding included (zero here)


@pytest.mark.parametrize(("src_tp", "dst_tp", "rows"), [(4, 2, 50432), (2, 4, 50688), (4, 1, 50304), (1, 4, 50688)])
def test_vocab_padding_recomputed_for_target_tp(tmp_path, gpt2_vocab_model, src_tp, dst_tp, rows):
    src = gpt2_vocab_model.write(tmp_path / "src.nemo", src_tp)
    result = convert(src, tmp_path / "dst.nemo", dst_tp, progress=False)
    assert (result.vocab_size, result.target_padded_vocab) == (50257, rows)
    _, ranks = load_ranks(result.target)
    emb = torch.cat([r["model.language_model.embedding.word_embeddings.weight"] for r in ranks])
    full = gpt2_vocab_model.full_weights()["model.language_model.embedding.word_embeddings.weight"]
    assert emb.shape[0] == rows
    assert torch.equal(emb[:50257], full) and not emb[50257:].any()


def test_nonzero_padding_is_trimmed_and_real_rows_kept(tmp_path, gpt2_vocab_model):
    """Real checkpoints may have non-zero padding rows; shrinking the padding drops only padding."""
    src = gpt2_vocab_model.write(tmp_path / "src.nemo", 4)
    model = gpt2_vocab_model
    ranks = model.split(model.full_weights(), 4)
    key = "model.language_model.embedding.word_embeddings.weight"
    ranks[3][key][-10:] = 7.0  # padding rows of the last rank
    import io
    import tarfile

    members = tar_members(src)
    buf = io.BytesIO()
    torch.save(ranks[3], buf)
    members["mp_rank_03/model_weights.ckpt"] = buf.getvalue()
    patched = tmp_path / "patched.nemo"
    with tarfile.open(patched, "w") as tar:
        for n, data in members.items():
            info = tarfile.TarInfo(n)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dst = convert(patched, tmp_path / "dst.nemo", 2, progress=False).target
    _, got = load_ranks(dst)
    emb = torch.cat([r[key] for r in got])
    assert emb.shape[0] == 50432 and torch.equal(emb[:50257], model.full_weights()[key])
    assert compare_merged(dst, patched) > 0  # common rows equal


@pytest.mark.parametrize(("gzip", "dot_prefix"), [(True, True), (False, False), (True, False)])
def test_gzip_and_member_prefixes_and_artifacts_byte_for_byte(tmp_path, gzip, dot_prefix):
    model = TinyGPT(layout="mcore")
    src = model.write(tmp_path / "src.nemo", 2, gzip=gzip, dot_prefix=dot_prefix)
    dst = convert(src, tmp_path / "dst.nemo", 4, progress=False).target
    before, after = tar_members(src), tar_members(dst)
    for artifact in (VOCAB_ARTIFACT, MERGES_ARTIFACT):
        assert after[artifact] == before[artifact]
    _assert_ranks_equal(load_ranks(dst)[1], model.split(model.full_weights(), 4))
    assert not list(tmp_path.glob(".*")), "scratch files left behind"


def test_config_keeps_everything_but_tp(tmp_path):
    model = TinyGPT()
    src = model.write(tmp_path / "src.nemo", 2)
    dst = convert(src, tmp_path / "dst.nemo", 1, progress=False).target
    before = tar_members(src)["model_config.yaml"].decode().splitlines()
    after = tar_members(dst)["model_config.yaml"].decode().splitlines()
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert changed == [
        ("tensor_model_parallel_size: 2", "tensor_model_parallel_size: 1"),
        ("sequence_parallel: true", "sequence_parallel: false"),
    ]


@pytest.mark.parametrize(
    "model",
    [
        TinyGPT(layout="legacy", num_layers=2, seed=5),
        TinyGPT(layout="legacy", megatron_legacy=True, activation="fast-swiglu", tied=False, seed=6),
        TinyGPT(layout="mcore", activation="swiglu", num_attention_heads=8, num_query_groups=4, seed=7),
        TinyGPT(layout="mcore", position_embedding_type="rope", rotary_percentage=0.5, seed=8),
    ],
    ids=["legacy", "legacy-qkv-swiglu", "mcore-gqa-swiglu", "mcore-rope"],
)
def test_tensor_parallel_forward_gives_same_logits_after_resharding(tmp_path, model):
    tokens = torch.tensor([3, 17, 250, 299, 0, 42, 8, 123])
    src = model.write(tmp_path / "tp4.nemo", 4)
    cfg4, r4 = load_ranks(src)
    logits4 = tp_logits(r4, cfg4, tokens, model.vocab_size)
    for tp in (2, 1):
        dst = convert(src, tmp_path / f"tp{tp}.nemo", tp, progress=False).target
        cfg, ranks = load_ranks(dst)
        torch.testing.assert_close(tp_logits(ranks, cfg, tokens, model.vocab_size), logits4, rtol=1e-5, atol=1e-5)
    assert logits4.std() > 0.1  # the model is not degenerate


def test_info_summary(tmp_path, gpt2_vocab_model):
    src = gpt2_vocab_model.write(tmp_path / "src.nemo", 4)
    s = summarize(src)
    full = gpt2_vocab_model.full_weights()
    expected = sum(t.numel() for t in full.values()) + (50688 - 50257) * 8
    assert (s.tp, s.pp, s.layout, s.dtype, s.padded_vocab, s.parameters) == (4, 1, "legacy", "float32", 50688, expected)
    assert s.size_on_disk == src.stat().st_size
