"""Synthetic Megatron-GPT .nemo files (random weights, real layout) for tests and benchmarks.

The full (TP1) weights are generated first and split into ranks here with torch.chunk, independently of
the resharder's streaming rules, so tests can compare the resharder against this ground truth.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from fedllm.checkpoint.layout import KEY_NAMES

VOCAB_ARTIFACT = "a1b2c3_vocab.json"
MERGES_ARTIFACT = "d4e5f6_merges.txt"
SPM_ARTIFACT = "0a1b2c_tokenizer.model"


@dataclass
class TinyGPT:
    """Shape and layout knobs of a synthetic Megatron-GPT checkpoint."""

    layout: str = "legacy"  # legacy | mcore
    hidden_size: int = 16
    ffn_hidden_size: int = 32
    num_layers: int = 2
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # mcore GQA; None = one group per head
    vocab_size: int = 300
    make_vocab_size_divisible_by: int = 8
    max_position_embeddings: int = 32
    activation: str = "gelu"
    megatron_legacy: bool = False
    tied: bool = True
    position_embedding_type: str = "learned_absolute"
    rotary_percentage: float = 1.0
    dtype: torch.dtype = torch.float32
    seed: int = 0
    extra_config: dict = field(default_factory=dict)
    # The tokenizer packed in the archive: a GPT-2 BPE vocab.json with `tokenizer_vocab` entries (default:
    # vocab_size), or a SentencePiece model's bytes (`sentencepiece_model`), as NeMo's Llama-style .nemo has.
    tokenizer_vocab: int | None = None
    sentencepiece_model: bytes | None = None

    @property
    def groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def kv(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def fused_glu(self) -> bool:
        glu = self.activation in ("swiglu", "geglu", "reglu", "fast-swiglu", "fast-geglu", "fast-reglu")
        return glu and (self.layout == "mcore" or self.activation.startswith("fast-"))

    def padded_vocab(self, tp: int) -> int:
        m = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // m) * m

    def config(self, tp: int) -> dict:
        cfg = {
            "mcore_gpt": self.layout == "mcore",
            "encoder_seq_length": self.max_position_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "ffn_hidden_size": self.ffn_hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_query_groups": self.num_query_groups,
            "init_method_std": 0.02,
            "hidden_dropout": 0.0,
            "kv_channels": None,
            "apply_query_key_layer_scaling": False,
            "layernorm_epsilon": 1e-5,
            "make_vocab_size_divisible_by": self.make_vocab_size_divisible_by,
            "pre_process": True,
            "post_process": True,
            "persist_layer_norm": True,
            "bias": True,
            "activation": self.activation,
            "normalization": "layernorm",
            "position_embedding_type": self.position_embedding_type,
            "rotary_percentage": self.rotary_percentage,
            "share_embeddings_and_output_weights": self.tied,
            "megatron_legacy": self.megatron_legacy,
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": 1,
            "sequence_parallel": tp > 1,
            "precision": "bf16" if self.dtype == torch.bfloat16 else 32,
            "tokenizer": {
                "library": "megatron",
                "type": "GPT2BPETokenizer",
                "model": None,
                "vocab_file": f"nemo:{VOCAB_ARTIFACT}",
                "merge_file": f"nemo:{MERGES_ARTIFACT}",
            }
            if self.sentencepiece_model is None
            else {"library": "sentencepiece", "type": None, "model": f"nemo:{SPM_ARTIFACT}", "vocab_file": None},
        }
        cfg.update(self.extra_config)
        return cfg

    # -- weights ----------------------------------------------------------------------------------------------
    def _keys(self) -> dict[str, str]:
        return KEY_NAMES[self.layout]

    def full_weights(self) -> OrderedDict[str, torch.Tensor]:
        """TP1 weights (vocabulary unpadded): the ground truth every split is compared with."""
        g = torch.Generator().manual_seed(self.seed)
        h, ffn = self.hidden_size, self.ffn_hidden_size

        def rnd(*shape: int, scale: float = 0.05, mean: float = 0.0) -> torch.Tensor:
            return (torch.randn(*shape, generator=g) * scale + mean).to(self.dtype)

        k = self._keys()
        qkv_rows = (self.num_attention_heads + 2 * self.groups) * self.kv
        fc1_rows = 2 * ffn if self.fused_glu else ffn
        w: OrderedDict[str, torch.Tensor] = OrderedDict()
        w[k["emb"]] = rnd(self.vocab_size, h, scale=0.5)
        if self.position_embedding_type == "learned_absolute":
            w[k["pos"]] = rnd(self.max_position_embeddings, h, scale=0.1)
        for i in range(self.num_layers):
            p = k["layer"].format(i=i)
            w[p + k["ln1"] + "weight"] = rnd(h, scale=0.1, mean=1.0)
            w[p + k["ln1"] + "bias"] = rnd(h)
            w[p + k["qkv"] + "weight"] = rnd(qkv_rows, h, scale=h**-0.5)
            w[p + k["qkv"] + "bias"] = rnd(qkv_rows)
            w[p + k["proj"] + "weight"] = rnd(h, self.num_attention_heads * self.kv, scale=h**-0.5)
            w[p + k["proj"] + "bias"] = rnd(h)
            w[p + k["ln2"] + "weight"] = rnd(h, scale=0.1, mean=1.0)
            w[p + k["ln2"] + "bias"] = rnd(h)
            w[p + k["fc1"] + "weight"] = rnd(fc1_rows, h, scale=h**-0.5)
            w[p + k["fc1"] + "bias"] = rnd(fc1_rows)
            w[p + k["fc2"] + "weight"] = rnd(h, ffn, scale=ffn**-0.5)
            w[p + k["fc2"] + "bias"] = rnd(h)
        w[k["final"] + "weight"] = rnd(h, scale=0.1, mean=1.0)
        w[k["final"] + "bias"] = rnd(h)
        if not self.tied:
            w[k["out"]] = rnd(self.vocab_size, h, scale=0.5)
        if self.layout == "mcore":
            w = OrderedDict(sorted(w.items(), key=lambda kv: _mcore_order(kv[0])))
        return w

    def split(self, full: dict[str, torch.Tensor], tp: int) -> list[OrderedDict[str, object]]:
        """Cut the TP1 weights into `tp` rank state dicts the way Megatron lays them out."""
        ranks: list[OrderedDict[str, object]] = [OrderedDict() for _ in range(tp)]
        pv = self.padded_vocab(tp)
        for key, t in full.items():
            if key.endswith(("word_embeddings.weight", "output_layer.weight")):
                padded = torch.zeros(pv, t.shape[1], dtype=t.dtype)
                padded[: t.shape[0]] = t
                parts = list(padded.chunk(tp))
            elif key.endswith(("query_key_value.weight", "query_key_value.bias")) and self.megatron_legacy:
                q, kk, v = t.chunk(3)
                parts = [torch.cat(x) for x in zip(q.chunk(tp), kk.chunk(tp), v.chunk(tp), strict=True)]
            elif ".dense_h_to_4h." in key or ".linear_fc1.weight" in key or ".linear_fc1.bias" in key:
                if self.fused_glu:
                    a, b = t.chunk(2)
                    parts = [torch.cat(x) for x in zip(a.chunk(tp), b.chunk(tp), strict=True)]
                else:
                    parts = list(t.chunk(tp))
            elif key.endswith(
                ("query_key_value.weight", "query_key_value.bias", "linear_qkv.weight", "linear_qkv.bias")
            ):
                parts = list(t.chunk(tp))
            elif key.endswith(
                ("self_attention.dense.weight", "linear_proj.weight", "dense_4h_to_h.weight", "linear_fc2.weight")
            ):
                parts = list(t.chunk(tp, dim=1))
            else:
                parts = [t] * tp
            for r in range(tp):
                ranks[r][key] = parts[r].clone()
                if self.layout == "mcore" and key.endswith(".weight") and ".layers." in key and "layer_norm" not in key:
                    ranks[r][key[: -len("weight")] + "_extra_state"] = io.BytesIO(b"")  # what TE stores without fp8
        return ranks

    def write(self, path: str | Path, tp: int, *, gzip: bool = False, dot_prefix: bool = True) -> Path:
        """Write a .nemo the way NeMo's save_to does (torch.save per rank, then tar)."""
        path = Path(path)
        ranks = self.split(self.full_weights(), tp)
        members: list[tuple[str, bytes]] = [
            ("model_config.yaml", yaml.safe_dump(self.config(tp), sort_keys=False).encode())
        ]
        if self.sentencepiece_model is None:
            vocab = {f"tok{i}": i for i in range(self.tokenizer_vocab or self.vocab_size)}
            members.append((VOCAB_ARTIFACT, json.dumps(vocab).encode()))
            members.append((MERGES_ARTIFACT, b"#version: 0.2\n" + bytes(range(256)) + b"\nt o\n"))
        else:
            members.append((SPM_ARTIFACT, self.sentencepiece_model))
        for r, sd in enumerate(ranks):
            buf = io.BytesIO()
            torch.save(sd, buf)
            name = "model_weights.ckpt" if tp == 1 else f"mp_rank_{r:02d}/model_weights.ckpt"
            members.append((name, buf.getvalue()))
        prefix = "./" if dot_prefix else ""
        with tarfile.open(path, "w:gz" if gzip else "w:") as tar:
            for name, data in members:
                info = tarfile.TarInfo(prefix + name)
                info.size, info.mtime = len(data), int(time.time())
                tar.addfile(info, io.BytesIO(data))
        return path


def _mcore_order(key: str) -> tuple:
    return (0 if "embedding" in key else 2 if "final" in key or "output_layer" in key else 1, _layer_num(key))


def _layer_num(key: str) -> int:
    if ".layers." in key:
        return int(key.split(".layers.")[1].split(".")[0])
    return 0


def write_distributed(model: TinyGPT, path: str | Path, saved_tp: int = 1) -> Path:
    """A .nemo holding `model` the way NeMo 2's save_to writes a Megatron-core model: a model_weights/
    torch-distributed checkpoint, layers stacked along dim 0, transformer-engine names, per-layer extra state.

    Written with torch.distributed.checkpoint itself (no NeMo needed); `saved_tp` only sets the config's TP
    and the vocabulary padding, as a TP-agnostic checkpoint saved from that many ranks has.
    """
    import tempfile
    import warnings

    import torch.distributed.checkpoint as dcp

    if model.layout != "mcore":
        raise ValueError("distributed checkpoints hold Megatron-core models")
    (rank,) = model.split(model.full_weights(), 1)
    padded = model.padded_vocab(saved_tp)
    flat: dict[str, object] = {}
    stacked: dict[str, list[torch.Tensor]] = {}
    for key, value in rank.items():
        if key.endswith("_extra_state"):
            continue
        if ".layers." in key:
            base = "model.decoder.layers." + key.split(".layers.", 1)[1].split(".", 1)[1]
            stacked.setdefault(base, []).append(value)
        elif key.endswith(("word_embeddings.weight", "output_layer.weight")):
            rows = torch.zeros(padded, value.shape[1], dtype=value.dtype)
            rows[: model.vocab_size] = value[: model.vocab_size]
            flat[key] = rows
        else:
            flat[key] = value
    flat |= {key: torch.stack(values) for key, values in stacked.items()}
    for i in range(model.num_layers):
        for part in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"):
            flat[f"model.decoder.layers.{part}._extra_state/shard_{i}_{model.num_layers}"] = io.BytesIO(b"")
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model_weights"
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(flat, storage_writer=dcp.FileSystemWriter(str(weights)), no_dist=True)
        (weights / "metadata.json").write_text('{"sharded_backend": "torch_dist", "sharded_backend_version": 1}')
        torch.save({}, weights / "common.pt")
        cfg = model.config(saved_tp)
        cfg["tokenizer"]["vocab_file"] = f"nemo:{VOCAB_ARTIFACT}"
        vocab = {f"tok{i}": i for i in range(model.tokenizer_vocab or model.vocab_size)}
        with tarfile.open(path, "w:") as tar:
            for name, data in (
                ("./model_config.yaml", yaml.safe_dump(cfg, sort_keys=False).encode()),
                (f"./{VOCAB_ARTIFACT}", json.dumps(vocab).encode()),
                (f"./{MERGES_ARTIFACT}", b"#version: 0.2\n"),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            tar.add(weights, arcname="./model_weights")
    return path
