"""Fit before running: a model's size read from its files, for the per-site memory estimate of `job create`.

The estimate itself (Workload, estimate, fit) is fedllm.config.memory's, shared with the site config and
GPU preflight; it is re-exported here so job creation has one module to call. What this module adds is
`model_size`: the parameter count and shapes of a local Hugging Face folder (safetensors headers when
present — exact —, else the architecture fields of GPT-2- and Llama-style config.json files) or of a
.nemo (its model_config.yaml, read through fedllm.checkpoint). No torch import.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedllm.checkpoint.archive import NemoArchive, read_header
from fedllm.checkpoint.config_fields import flag, name, optional_positive_int, positive_int
from fedllm.checkpoint.errors import CheckpointError
from fedllm.checkpoint.model_spec import ModelSpec
from fedllm.checkpoint.vocab import vocabulary_from_archive
from fedllm.config.memory import Estimate, Fit, ModelSize, Workload, estimate, fit
from fedllm.jobs.errors import JobSpecError

__all__ = ["Estimate", "Fit", "ModelSize", "Workload", "estimate", "fit", "model_size", "workload_for"]

# bytes per element of the safetensors dtypes a model's weights come in
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_TORCH_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
# More parameters than any model has (100 T): a config with such sizes is damaged, and its estimate meaningless.
MAX_PARAMETERS = 10**14
# The GPT-2 BPE vocabulary of NVIDIA's Megatron-GPT checkpoints (megatron GPT2BPETokenizer).
GPT2_VOCAB = 50257


def model_size(model: str) -> ModelSize | None:
    """The size of `model` where it is readable here: a Hugging Face folder or a .nemo (file or extracted folder).

    None where it is not (a hub id, a path that exists on the sites only, a {data_dir} path, an architecture
    whose config.json this does not know and that has no safetensors). A file that is there but damaged is a
    JobSpecError naming it and the fix.
    """
    if "{" in model:
        return None
    path = Path(model)
    try:
        if path.suffix == ".nemo" or (path / "model_config.yaml").is_file():
            size = _nemo_size(path) if path.exists() else None
        else:
            size = _hf_size(path) if (path / "config.json").is_file() else None
    except CheckpointError as exc:
        raise JobSpecError(f"--model: {exc}" if str(exc).startswith(str(path)) else f"--model {model}: {exc}") from None
    if size is not None and not 0 < size.parameters <= MAX_PARAMETERS:
        raise JobSpecError(
            f"--model {model}: {size.source} gives {size.parameters} parameters, which no model has. Fix: correct "
            "the model's config (its layer count and sizes) or re-download the model"
        )
    return size


# NeMo's Lightning precision names → the estimate's.
_NEMO_PRECISION = {"bf16-mixed": "bf16", "bf16": "bf16", "16-mixed": "fp16", "16": "fp16", "32": "fp32"}


def workload_for(trainer: str, args: Mapping[str, Any], devices: int) -> Workload | None:
    """The Workload of a job's trainer and its parsed arguments (`vars(namespace)` as the trainer parses them).

    None for a trainer the estimate does not model (the CPU demo, another package's trainer). `precision=auto`
    counts as bf16 (fp16 has the same sizes; fp32 is for CPU sites, which have no GPU memory to fit).
    """
    if trainer in ("fedllm.training.hf.sft", "fedllm.training.hf.lora"):
        quantized = args.get("quantize") == "4bit"
        return Workload(
            method="full" if trainer.endswith(".sft") else ("qlora" if quantized else "lora"),
            precision="fp32"
            if args.get("precision") == "fp32"
            else "fp16"
            if args.get("precision") == "fp16"
            else "bf16",
            micro_batch=int(args["batch_size"]),
            seq_len=int(args["max_length"]),
            checkpointing=bool(args.get("gradient_checkpointing")),
            lora_r=int(args.get("lora_r") or 8),
            processes=devices,
        )
    if trainer == "fedllm.training.hf.ptuning":
        return Workload(
            method="ptuning",
            micro_batch=int(args["batch_size"]),
            seq_len=int(args["max_length"]),
            virtual_tokens=int(args.get("num_virtual_tokens") or 10),
            encoder_hidden=int(args.get("encoder_hidden_size") or 0) or None,
            processes=devices,
        )
    if trainer in ("fedllm.training.nemo.sft", "fedllm.training.nemo.ptuning"):
        ptuning = trainer.endswith(".ptuning")
        return Workload(
            method="ptuning" if ptuning else "full",
            precision=_NEMO_PRECISION.get(str(args.get("precision", "bf16-mixed")), "bf16"),  # type: ignore[arg-type]
            micro_batch=int(args["micro_batch_size"]),
            seq_len=int(args["max_seq_length"]),
            virtual_tokens=int(args.get("virtual_tokens") or 10),
            encoder_hidden=int(args.get("encoder_hidden") or 2048) if ptuning else None,
            tensor_parallel=devices,
            processes=devices,
            backend="nemo",
        )
    return None


# ---- Hugging Face folders -------------------------------------------------------------------------------------


def _int(cfg: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _hf_size(folder: Path) -> ModelSize | None:
    config = folder / "config.json"
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise JobSpecError(f"--model {folder}: cannot read {config} ({exc}). Fix: the model folder") from None
    if not isinstance(cfg, dict):
        raise JobSpecError(f"--model {folder}: {config} is not a JSON object. Fix: the model folder")
    hidden = _int(cfg, "hidden_size", "n_embd", "d_model")
    layers = _int(cfg, "num_hidden_layers", "n_layer", "num_layers")
    vocab = _int(cfg, "vocab_size")
    heads = _int(cfg, "num_attention_heads", "n_head")
    if hidden is None or layers is None or vocab is None:
        return None
    tied = cfg.get("tie_word_embeddings", True) is not False
    positions = hidden * (_int(cfg, "n_positions") or 0) if cfg.get("model_type") == "gpt2" else 0
    embedding = vocab * hidden * (1 if tied else 2) + positions
    counted = _safetensors_parameters(folder, cfg) or _architecture_parameters(cfg, hidden, layers, vocab, heads, tied)
    if counted is None:
        return None
    parameters, source = counted
    return ModelSize(parameters, layers, hidden, vocab, heads, embedding, source=source)


def _safetensors_parameters(folder: Path, cfg: dict[str, Any]) -> tuple[int, str] | None:
    """Exact: the elements of every tensor in the safetensors headers (tied weights are stored once)."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return _header_elements(single), f"{single} (safetensors header)"
    if not index.is_file():
        return None
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        shards = sorted(set(data["weight_map"].values()))
        if not shards or not all(isinstance(shard, str) and Path(shard).name == shard for shard in shards):
            raise ValueError("weight_map names no shard, or one that is not a file name in the folder")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise JobSpecError(f"--model {folder}: cannot read {index} ({exc}). Fix: the model folder") from None
    if all((folder / s).is_file() for s in shards):
        return sum(_header_elements(folder / s) for s in shards), f"{index} (safetensors headers)"
    total = data["metadata"].get("total_size") if isinstance(data.get("metadata"), dict) else None
    width = _TORCH_DTYPE_BYTES.get(str(cfg.get("torch_dtype") or cfg.get("dtype")))
    if isinstance(total, int) and not isinstance(total, bool) and total > 0 and width:
        return total // width, f"{index} (total_size / {width} bytes)"
    return None


def _header_elements(file: Path) -> int:
    try:
        with file.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 1024 * 1024:
                raise ValueError(f"header length {length} is not plausible")
            header = json.loads(f.read(length))
        shapes = [t["shape"] for k, t in header.items() if k != "__metadata__" and t["dtype"] in _DTYPE_BYTES]
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for shape in shapes for d in shape):
            raise ValueError("a tensor's shape is not a list of non-negative whole numbers")
        return sum(math.prod(shape) for shape in shapes)
    except (
        OSError,
        struct.error,
        UnicodeDecodeError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        RecursionError,
    ) as exc:
        raise JobSpecError(
            f"--model {file.parent}: {file.name} is not a readable safetensors file ({exc}). Fix: re-download the model"
        ) from None


def _architecture_parameters(
    cfg: dict[str, Any], hidden: int, layers: int, vocab: int, heads: int | None, tied: bool
) -> tuple[int, str] | None:
    """From config.json: exact for GPT-2 and Llama-style (llama, mistral, qwen2) architectures."""
    model_type = cfg.get("model_type")
    output = 0 if tied else vocab * hidden
    if model_type == "gpt2":
        ffn = _int(cfg, "n_inner") or 4 * hidden
        per_layer = 4 * hidden + (hidden * 3 * hidden + 3 * hidden) + (hidden * hidden + hidden)
        per_layer += (hidden * ffn + ffn) + (ffn * hidden + hidden)
        positions = (_int(cfg, "n_positions") or 1024) * hidden
        return vocab * hidden + positions + layers * per_layer + 2 * hidden + output, "config.json (GPT-2)"
    if model_type in ("llama", "mistral", "qwen2") and heads:
        head_dim = _int(cfg, "head_dim") or hidden // heads
        kv_heads = _int(cfg, "num_key_value_heads") or heads
        ffn = _int(cfg, "intermediate_size")
        if ffn is None:
            return None
        q, kv = heads * head_dim, kv_heads * head_dim
        attention = hidden * q + 2 * hidden * kv + q * hidden
        if cfg.get("attention_bias") is True or model_type == "qwen2":
            attention += q + 2 * kv + (hidden if model_type != "qwen2" else 0)
        mlp = 3 * hidden * ffn + ((2 * ffn + hidden) if cfg.get("mlp_bias") is True else 0)
        per_layer = attention + mlp + 2 * hidden  # two RMSNorm weights
        return vocab * hidden + layers * per_layer + hidden + output, f"config.json ({model_type})"
    return None


# ---- .nemo checkpoints ----------------------------------------------------------------------------------------


def _nemo_size(path: Path) -> ModelSize:
    header = read_header(path)
    cfg, source = header.config, str(header.path)
    spec = ModelSpec.from_config(cfg, source)
    vocab = optional_positive_int(cfg, "vocab_size", source) or _nemo_vocab(path, cfg)
    padded = spec.padded_vocab_size(vocab, spec.tensor_parallel)
    h, ffn = spec.hidden_size, spec.ffn_hidden_size
    bias = flag(cfg, "bias", source, True)
    layernorm = name(cfg, "normalization", source, "layernorm") != "rmsnorm"
    q, kv = spec.num_attention_heads * spec.kv_channels, spec.num_query_groups * spec.kv_channels
    attention = h * (q + 2 * kv) + q * h + ((q + 2 * kv + h) if bias else 0)
    mlp = h * ffn * (2 if spec.glu else 1) + ffn * h + ((ffn * (2 if spec.glu else 1) + h) if bias else 0)
    norm = 2 * h if layernorm else h
    positions = 0
    if spec.position_embedding_type == "learned_absolute":
        positions = h * positive_int(
            cfg, "max_position_embeddings", source, positive_int(cfg, "encoder_seq_length", source, 2048)
        )
    embedding = padded * h * (1 if spec.tied_embeddings else 2) + positions
    flash = flag(cfg, "use_flash_attention", source, False) or (
        spec.mcore and flag(cfg, "transformer_engine", source, False)
    )
    return ModelSize(
        parameters=spec.num_layers * (attention + mlp + 2 * norm) + norm + embedding,
        layers=spec.num_layers,
        hidden=h,
        vocab=padded,
        heads=spec.num_attention_heads,
        embedding_parameters=embedding,
        tensor_parallel=spec.tensor_parallel,
        source=f"{source} (model_config.yaml)",
        fused_attention=flash,
    )


def _nemo_vocab(path: Path, cfg: dict[str, Any]) -> int:
    """The unpadded vocabulary: a Megatron GPT-2 BPE tokenizer's, else counted from a .nemo file's tokenizer files."""
    tokenizer = cfg.get("tokenizer") if isinstance(cfg.get("tokenizer"), dict) else {}
    if tokenizer.get("library") == "megatron" and "GPT2" in str(tokenizer.get("type", "")):
        return GPT2_VOCAB
    vocab = vocabulary_from_archive(NemoArchive(path)) if path.is_file() else None
    if vocab is None:
        raise CheckpointError(
            f"{path}: cannot tell the vocabulary size (no vocab_size in model_config.yaml, no tokenizer file fedllm "
            "counts). Fix: add vocab_size to the checkpoint's model_config.yaml"
        )
    return vocab.size
