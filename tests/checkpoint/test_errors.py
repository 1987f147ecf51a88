"""Bad checkpoints and bad requests: a clear error naming the file/field/fix, exit 1, and no target file."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch

from fedllm.checkpoint import CheckpointError, DistributedCheckpointError, convert, summarize
from fedllm.checkpoint import reshard as reshard_module
from fedllm.cli.main import main
from tests.support.nemo_files import tar_members
from tests.support.synthetic_checkpoint import TinyGPT


def _rewrite(path, members: dict[str, bytes]) -> None:
    path.unlink(missing_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _no_outputs(tmp_path) -> None:
    left = [p.name for p in tmp_path.iterdir() if p.name not in ("src.nemo",)]
    assert left == [], f"left behind: {left}"


@pytest.fixture
def src(tmp_path):
    return TinyGPT().write(tmp_path / "src.nemo", 4)


def test_target_tp_that_does_not_divide_heads(tmp_path, src, capsys):
    assert (
        main(["ckpt", "convert", "--source", str(src), "--target", str(tmp_path / "dst.nemo"), "--target-tp", "3"]) == 1
    )
    err = capsys.readouterr().err
    assert "does not divide num_attention_heads=4" in err and "use one of [1, 2, 4]" in err
    _no_outputs(tmp_path)


def test_missing_shard(tmp_path, src):
    members = tar_members(src)
    del members["mp_rank_03/model_weights.ckpt"]
    _rewrite(src, members)
    with pytest.raises(
        CheckpointError, match=r"tensor_model_parallel_size=4.*missing \['mp_rank_03/model_weights.ckpt'\]"
    ):
        convert(src, tmp_path / "dst.nemo", 2, progress=False)
    _no_outputs(tmp_path)


def test_config_tp_disagrees_with_shards(tmp_path, src):
    members = tar_members(src)
    members["model_config.yaml"] = members["model_config.yaml"].replace(
        b"tensor_model_parallel_size: 4", b"tensor_model_parallel_size: 2"
    )
    _rewrite(src, members)
    with pytest.raises(CheckpointError, match="fix tensor_model_parallel_size \\(the shards suggest 4\\)"):
        convert(src, tmp_path / "dst.nemo", 1, progress=False)
    _no_outputs(tmp_path)


def test_truncated_archive(tmp_path, src):
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"src.nemo.*(truncated|corrupted)"):
        convert(src, tmp_path / "dst.nemo", 2, progress=False)
    _no_outputs(tmp_path)


def test_not_a_tar(tmp_path):
    bad = tmp_path / "src.nemo"
    bad.write_bytes(b"hello, this is not a checkpoint" * 100)
    assert main(["ckpt", "info", str(bad)]) == 1
    with pytest.raises(CheckpointError, match=r"not a readable \.nemo archive"):
        summarize(bad)


def test_corrupted_tensor_bytes_caught_by_verify(tmp_path, src, capsys):
    members = tar_members(src)
    ckpt = bytearray(members["mp_rank_01/model_weights.ckpt"])
    ckpt[len(ckpt) // 2] ^= 0xFF  # inside a storage record
    members["mp_rank_01/model_weights.ckpt"] = bytes(ckpt)
    _rewrite(src, members)
    assert main(["ckpt", "verify", str(src)]) == 1
    assert "mp_rank_01/model_weights.ckpt" in capsys.readouterr().err


def test_missing_tensor_caught_by_verify(tmp_path, src, capsys):
    model = TinyGPT()
    ranks = model.split(model.full_weights(), 4)
    del ranks[2]["model.language_model.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    members = tar_members(src)
    buf = io.BytesIO()
    torch.save(ranks[2], buf)
    members["mp_rank_02/model_weights.ckpt"] = buf.getvalue()
    _rewrite(src, members)
    assert main(["ckpt", "verify", str(src)]) == 1
    err = capsys.readouterr().err
    assert "mp_rank_02" in err and "layers.1.mlp.dense_4h_to_h.weight" in err


def test_shape_inconsistent_with_config(tmp_path, src):
    members = tar_members(src)
    members["model_config.yaml"] = members["model_config.yaml"].replace(b"ffn_hidden_size: 32", b"ffn_hidden_size: 64")
    _rewrite(src, members)
    with pytest.raises(CheckpointError, match=r"model_config\.yaml implies"):
        summarize(src)


def test_verify_against_detects_different_weights(tmp_path, src, capsys):
    other = TinyGPT(seed=1).write(tmp_path / "other.nemo", 2)
    assert main(["ckpt", "verify", str(src), "--against", str(other)]) == 1
    assert "differs" in capsys.readouterr().err


def test_distributed_checkpoint_without_its_index_is_refused(tmp_path):
    nemo = tmp_path / "dist.nemo"
    _rewrite(
        nemo,
        {
            "./model_config.yaml": b"tensor_model_parallel_size: 4\n",
            "./model_weights/metadata.json": b"{}",
            "./model_weights/__0_0.distcp": b"x",
        },
    )
    with pytest.raises(DistributedCheckpointError, match=r"model_weights/ has no \.metadata index"):
        convert(nemo, tmp_path / "dst.nemo", 2, progress=False)
    assert not (tmp_path / "dst.nemo").exists()


def test_pipeline_parallel_is_read_but_not_converted(tmp_path):
    model = TinyGPT()
    members = tar_members(model.write(tmp_path / "tp2.nemo", 2))
    members["model_config.yaml"] = members["model_config.yaml"].replace(
        b"pipeline_model_parallel_size: 1", b"pipeline_model_parallel_size: 2"
    )
    pp = {"model_config.yaml": members["model_config.yaml"]}
    for t in range(2):
        for p in range(2):
            pp[f"tp_rank_{t:02d}_pp_rank_{p:03d}/model_weights.ckpt"] = members[f"mp_rank_{t:02d}/model_weights.ckpt"]
    path = tmp_path / "pp.nemo"
    _rewrite(path, pp)
    with pytest.raises(CheckpointError, match="pipeline_model_parallel_size=2; fedllm converts PP=1"):
        convert(path, tmp_path / "dst.nemo", 1, progress=False)
    assert not (tmp_path / "dst.nemo").exists()


def test_interrupted_convert_leaves_no_target(tmp_path, src, monkeypatch):
    calls = {"n": 0}
    real = reshard_module.target_shard

    def interrupt_midway(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(reshard_module, "target_shard", interrupt_midway)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "dst.nemo", 2, progress=False)
    _no_outputs(tmp_path)


def test_failed_verification_leaves_no_target(tmp_path, src):
    def reject(tmp):
        assert tmp.exists()
        raise CheckpointError("verification failed")

    with pytest.raises(CheckpointError, match="verification failed"):
        convert(src, tmp_path / "dst.nemo", 2, progress=False, verify=reject)
    _no_outputs(tmp_path)


def test_existing_target_is_not_clobbered(tmp_path, src):
    dst = tmp_path / "dst.nemo"
    dst.write_bytes(b"keep me")
    with pytest.raises(CheckpointError, match="already exists; remove it or pass --overwrite"):
        convert(src, dst, 2, progress=False)
    assert dst.read_bytes() == b"keep me"


def test_cli_convert_info_verify(tmp_path, src, capsys):
    dst = tmp_path / "dst.nemo"
    assert (
        main(
            [
                "ckpt",
                "convert",
                "--source",
                str(src),
                "--target",
                str(dst),
                "--target-tp",
                "2",
                "--check-equal",
                "--no-progress",
            ]
        )
        == 0
    )
    assert main(["ckpt", "info", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "TP=2 PP=1" in out and "parameters" in out and "float32" in out
    assert main(["ckpt", "verify", str(dst), "--against", str(src)]) == 0
    assert "bit for bit" in capsys.readouterr().out
