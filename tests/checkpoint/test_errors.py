"""Bad checkpoints and bad requests: a clear error naming the file/field/fix, exit 1, and no target file."""

from __future__ import annotations

import io
import pickle
import re
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from fedllm.checkpoint import CheckpointError, DistributedCheckpointError, convert, summarize
from fedllm.checkpoint import reshard as reshard_module
from fedllm.checkpoint.hf_export import export_hf
from fedllm.cli.main import main
from tests.support.nemo_files import tar_members
from tests.support.synthetic_checkpoint import TinyGPT, write_distributed


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


# -- every reader checks what it reads (issue 28) --------------------------------------------------------------------
def _flip_in_tensor(blob: bytes, key: str | None = None) -> bytes:
    """`blob` (a torch.save file) with one bit flipped inside tensor `key`'s bytes (the saved tensor itself when
    None); torch.load (which checks no CRC) is what finds the record, so the flip lands in the tensor."""
    clean = torch.load(io.BytesIO(blob), weights_only=False)
    pick = (lambda state: state) if key is None else (lambda state: state[key])
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        records = [i for i in z.infolist() if "/data/" in i.filename]
    for info in records:
        name_len, extra_len = struct.unpack("<2H", blob[info.header_offset + 26 : info.header_offset + 30])
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        damaged = bytearray(blob)
        damaged[at] ^= 0x10
        changed = torch.load(io.BytesIO(bytes(damaged)), weights_only=False)
        if not torch.equal(pick(changed), pick(clean)):
            return bytes(damaged)
    raise AssertionError(f"no record holds {key}")


EMBEDDING = "model.language_model.embedding.word_embeddings.weight"


def test_flipped_bytes_in_a_shard_are_refused_by_every_reader(tmp_path, src, capsys):
    members = tar_members(src)
    members["mp_rank_01/model_weights.ckpt"] = _flip_in_tensor(members["mp_rank_01/model_weights.ckpt"], EMBEDDING)
    _rewrite(src, members)
    dst = str(tmp_path / "dst.nemo")
    for args in (
        ["ckpt", "convert", "--source", str(src), "--target", dst, "--target-tp", "2", "--no-progress"],
        [
            "ckpt",
            "convert",
            "--source",
            str(src),
            "--target",
            dst,
            "--target-tp",
            "1",
            "--check-equal",
            "--no-progress",
        ],
        ["ckpt", "export-hf", str(src), "--out", str(tmp_path / "hf")],
        ["ckpt", "verify", str(src)],
    ):
        assert main(args) == 1, args
        err = capsys.readouterr().err
        assert "mp_rank_01/model_weights.ckpt" in err and "corrupted" in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
        _no_outputs(tmp_path)


def test_flipped_tensor_bytes_are_refused_by_the_servers_reader_and_before_nemo_restores(tmp_path, src):
    from fedllm.flare.server_models import load_nemo_weights

    members = tar_members(src)
    members["mp_rank_02/model_weights.ckpt"] = _flip_in_tensor(members["mp_rank_02/model_weights.ckpt"], EMBEDDING)
    _rewrite(src, members)
    with pytest.raises(CheckpointError, match=r"mp_rank_02/model_weights\.ckpt: record .* is corrupted"):
        load_nemo_weights(src)
    from fedllm.checkpoint.verify import check_integrity

    check_integrity(src, tp_rank=0)  # each process of a site checks the shard it restores
    with pytest.raises(CheckpointError, match=r"mp_rank_02/model_weights\.ckpt"):
        check_integrity(src, tp_rank=2)
    extracted = tmp_path / "extracted"  # NeMo restores an extracted folder too
    with tarfile.open(src) as tar:
        tar.extractall(extracted, filter="data")
    check_integrity(extracted, tp_rank=1)
    with pytest.raises(CheckpointError, match=r"extracted:mp_rank_02/model_weights\.ckpt: record .* is corrupted"):
        check_integrity(extracted)


def test_a_flip_in_a_gzip_archive_that_still_decompresses_is_refused(tmp_path, capsys):
    members = tar_members(TinyGPT().write(tmp_path / "plain.nemo", 2))
    path = tmp_path / "src.nemo"
    with tarfile.open(path, "w:gz", compresslevel=0) as tar:  # stored blocks: a flipped byte decompresses as such
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "plain.nemo").unlink()
    shard = members["mp_rank_01/model_weights.ckpt"]
    damaged_shard = _flip_in_tensor(shard, EMBEDDING)
    at = next(i for i, (a, b) in enumerate(zip(shard, damaged_shard, strict=True)) if a != b)
    raw = path.read_bytes()
    where = raw.index(shard[at - 16 : at + 16]) + 16
    path.write_bytes(raw[:where] + bytes([raw[where] ^ 0x10]) + raw[where + 1 :])
    assert tar_members(path)["mp_rank_01/model_weights.ckpt"] == damaged_shard  # tarfile reads it without a word
    for args in (
        ["ckpt", "info", str(path)],
        ["ckpt", "convert", "--source", str(path), "--target", str(tmp_path / "dst.nemo"), "--target-tp", "1"],
    ):
        assert main([*args, "--no-progress"] if "convert" in args else args) == 1
        assert "gzip stream is corrupted" in capsys.readouterr().err
        _no_outputs(tmp_path)


def test_a_damaged_tar_header_is_refused_not_taken_for_the_end_of_the_archive(tmp_path, src, capsys):
    members = tar_members(src)
    tokenizer = {n: members.pop(n) for n in list(members) if not n.endswith((".ckpt", ".yaml"))}
    _rewrite(src, members | tokenizer)  # tokenizer files last, as NeMo's save_to may order them
    with tarfile.open(src) as tar:
        header = next(m for m in tar if m.name.endswith("merges.txt")).offset
    raw = bytearray(src.read_bytes())
    raw[header + 3] ^= 0x01  # a letter of the member's name: the header's checksum no longer holds
    src.write_bytes(bytes(raw))
    args = ["ckpt", "convert", "--source", str(src), "--target", str(tmp_path / "dst.nemo"), "--target-tp", "2"]
    assert main([*args, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"the tar header at byte {header} (after member a1b2c3_vocab.json) is damaged" in err, err
    _no_outputs(tmp_path)


def test_a_flipped_tensor_item_of_a_distributed_checkpoint_is_refused(tmp_path, capsys):
    model = TinyGPT(layout="mcore", seed=3)
    dist = write_distributed(model, tmp_path / "src.nemo")
    members = tar_members(dist)
    md = pickle.loads(members["model_weights/.metadata"])  # torch.distributed.checkpoint's own index
    where = next(s for i, s in md.storage_data.items() if i.fqn == "model.embedding.word_embeddings.weight")
    name = f"model_weights/{where.relative_path}"
    damaged = _flip_in_tensor(members[name][where.offset : where.offset + where.length])
    members[name] = members[name][: where.offset] + damaged + members[name][where.offset + where.length :]
    _rewrite(dist, members)
    for args in (
        ["ckpt", "verify", str(dist)],
        ["ckpt", "convert", "--source", str(dist), "--target", str(tmp_path / "dst.nemo"), "--target-tp", "1"],
        ["ckpt", "export-hf", str(dist), "--out", str(tmp_path / "hf")],
    ):
        assert main([*args, "--no-progress"] if "convert" in args else args) == 1
        err = capsys.readouterr().err
        assert f"{name} (model.embedding.word_embeddings.weight at byte {where.offset})" in err, err
        assert "is corrupted" in err
        _no_outputs(tmp_path)
    from fedllm.checkpoint.verify import check_integrity

    with pytest.raises(CheckpointError, match=r"__0_0\.distcp \(model\.embedding\.word_embeddings\.weight"):
        check_integrity(dist)
    with tarfile.open(dist) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    with pytest.raises(CheckpointError, match=r"extracted:model_weights/__0_0\.distcp \(model\.embedding"):
        check_integrity(tmp_path / "extracted")


def test_fedllm_checksums_catch_what_no_other_checksum_covers(tmp_path, capsys):
    """A converted .nemo carries fedllm_checksums.json: a tokenizer file or the config changed after it was
    written (still valid, still consistent with the weights) is refused by every reader that reads it."""
    converted = convert(TinyGPT().write(tmp_path / "tp2.nemo", 2), tmp_path / "src.nemo", 1, progress=False).target
    (tmp_path / "tp2.nemo").unlink()
    members = tar_members(converted)
    assert "fedllm_checksums.json" in members
    vocab = members["a1b2c3_vocab.json"]
    members["a1b2c3_vocab.json"] = vocab.replace(b'"tok12"', b'"tok1x"')  # same count: nothing else would notice
    _rewrite(converted, members)
    for args in (
        ["ckpt", "verify", str(converted)],
        ["ckpt", "convert", "--source", str(converted), "--target", str(tmp_path / "dst.nemo"), "--target-tp", "2"],
        ["ckpt", "export-hf", str(converted), "--out", str(tmp_path / "hf")],
    ):
        assert main([*args, "--no-progress"] if "convert" in args else args) == 1
        err = capsys.readouterr().err
        assert "member a1b2c3_vocab.json is corrupted: its CRC-32" in err and "fedllm_checksums.json" in err, err
        _no_outputs(tmp_path)
    members["a1b2c3_vocab.json"] = vocab
    members["model_config.yaml"] = members["model_config.yaml"].replace(
        b"layernorm_epsilon: 1.0e-05", b"layernorm_epsilon: 1.0e-04"
    )
    _rewrite(converted, members)
    assert main(["ckpt", "info", str(converted)]) == 1
    assert "member model_config.yaml is corrupted" in capsys.readouterr().err
    from fedllm.checkpoint.archive import read_header  # what job creation and NeMo sites read first

    with pytest.raises(CheckpointError, match=r"member model_config\.yaml is corrupted"):
        read_header(converted)


def test_export_hf_into_an_existing_file_is_an_error(tmp_path, src, capsys):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        export_hf(src, taken)  # was NotADirectoryError's traceback
    assert main(["ckpt", "export-hf", str(src), "--out", str(taken)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "is a file, not a folder" in err and "--out" in err
    assert taken.read_text() == "keep me"


def test_export_hf_takes_its_folder_as_out_like_the_other_export_hf(tmp_path, src, capsys):
    assert main(["ckpt", "export-hf", str(src), str(tmp_path / "hf")]) == 2  # the old positional shape
    assert not (tmp_path / "hf").exists()
    assert main(["ckpt", "export-hf", str(src), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()


def test_download_from_an_endpoint_that_is_not_a_url_is_an_error(tmp_path, capsys):
    assert main(["ckpt", "download", "--endpoint", "notaurl", "--models-dir", str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "error: --endpoint (or HF_ENDPOINT) 'notaurl' is not an http(s) URL. Fix: pass the hub's address with its scheme, e.g. "
        "--endpoint https://huggingface.co or your mirror's https://host[:port]\n"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("field", "value", "want"),
    [
        ("hidden_size", "sixteen", "a positive integer"),
        ("tensor_model_parallel_size", 0, "a positive integer"),
        ("num_layers", -2, "a positive integer"),
        ("num_attention_heads", 16.0, "a positive integer"),
        ("megatron_legacy", "false", "true or false"),
    ],
)
def test_a_config_value_of_the_wrong_type_or_range_names_the_field(tmp_path, field, value, want, capsys):
    path = TinyGPT().write(tmp_path / "src.nemo", 1)
    members = tar_members(path)
    config = yaml.safe_load(members["model_config.yaml"])
    members["model_config.yaml"] = yaml.safe_dump({**config, field: value}).encode()
    _rewrite(path, members)
    assert main(["ckpt", "info", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"model_config.yaml field {field} is {value!r}; it must be {want}. Fix: correct {field}" in err, err
    assert err.count("\n") == 1


def test_docs_name_only_modules_that_exist():
    """docs/checkpoints.md's module table lists fedllm.checkpoint's modules, each of which exists there."""
    repo = Path(__file__).resolve().parents[2]
    doc = (repo / "docs" / "checkpoints.md").read_text()
    table = doc.split("## How it stays small and safe", 1)[1].split("\n\n", 2)[1]
    named = {m for row in table.splitlines()[2:] for m in re.findall(r"`([\w/.]+\.py)`", row.split("|")[1])}
    assert named, table
    package = repo / "src" / "fedllm" / "checkpoint"
    assert sorted(m for m in named if not (package / m).is_file() and not (repo / m).is_file()) == []
