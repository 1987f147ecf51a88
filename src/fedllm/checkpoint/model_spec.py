"""The few model_config.yaml fields that decide how Megatron-GPT tensors are split across TP ranks."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from fedllm.checkpoint.archive import read_header
from fedllm.checkpoint.config_fields import flag, name, positive_int
from fedllm.checkpoint.errors import CheckpointError

# Activations whose fc1 holds [W; V] (gate and value) in one tensor. NeMo's legacy model fuses them only for
# the "fast-" variants (plain swiglu keeps a separate dense_h_to_4h_2); Megatron-core always fuses them.
GLU_ACTIVATIONS = {"swiglu", "geglu", "reglu", "fast-swiglu", "fast-geglu", "fast-reglu"}


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and parallel layout of a Megatron-GPT model, read from its model_config.yaml."""

    source: str  # the file the config came from, for error messages
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    tensor_parallel: int
    pipeline_parallel: int
    make_vocab_size_divisible_by: int
    activation: str
    megatron_legacy: bool
    mcore: bool
    tied_embeddings: bool
    position_embedding_type: str
    precision: str

    @classmethod
    def from_config(cls, cfg: dict[str, Any], source: str) -> ModelSpec:
        """The spec of a parsed model_config.yaml; a missing, mistyped or out-of-range field names itself."""
        hidden = positive_int(cfg, "hidden_size", source)
        heads = positive_int(cfg, "num_attention_heads", source)
        if cfg.get("kv_channels") is None and hidden % heads:
            raise CheckpointError(
                f"{source}: model_config.yaml field num_attention_heads is {heads}, which does not divide "
                f"hidden_size={hidden}, and no kv_channels is given (Megatron's head size is hidden_size / "
                "num_attention_heads). Fix: correct num_attention_heads or hidden_size, or set kv_channels"
            )
        return cls(
            source=source,
            hidden_size=hidden,
            ffn_hidden_size=positive_int(cfg, "ffn_hidden_size", source, 4 * hidden),
            num_layers=positive_int(cfg, "num_layers", source),
            num_attention_heads=heads,
            num_query_groups=positive_int(cfg, "num_query_groups", source, heads),
            kv_channels=positive_int(cfg, "kv_channels", source, hidden // heads),
            tensor_parallel=positive_int(cfg, "tensor_model_parallel_size", source, 1),
            pipeline_parallel=positive_int(cfg, "pipeline_model_parallel_size", source, 1),
            make_vocab_size_divisible_by=positive_int(cfg, "make_vocab_size_divisible_by", source, 128),
            activation=name(cfg, "activation", source, "gelu"),
            megatron_legacy=flag(cfg, "megatron_legacy", source, False),
            mcore=flag(cfg, "mcore_gpt", source, False),
            tied_embeddings=flag(cfg, "share_embeddings_and_output_weights", source, True),
            position_embedding_type=name(cfg, "position_embedding_type", source, "learned_absolute"),
            precision=str(cfg.get("precision", "")),
        )

    @property
    def glu(self) -> bool:
        return self.activation in GLU_ACTIVATIONS

    @property
    def fused_glu_fc1(self) -> bool:
        """fc1 holds [W; V] halves in one tensor (so it is split half by half)."""
        return self.glu and (self.mcore or self.activation.startswith("fast-"))

    def padded_vocab_size(self, vocab_size: int, tp: int) -> int:
        """Megatron's rule: round the vocabulary up to a multiple of make_vocab_size_divisible_by × TP."""
        multiple = self.make_vocab_size_divisible_by * tp
        return math.ceil(vocab_size / multiple) * multiple

    def check_tp(self, tp: int, what: str = "target") -> None:
        """Every split dimension must divide by the TP size; say which one does not."""
        if tp < 1:
            raise CheckpointError(f"{what} tensor-parallel size must be ≥ 1, got {tp}")
        for field_name, value in (
            ("num_attention_heads", self.num_attention_heads),
            ("num_query_groups", self.num_query_groups),
            ("ffn_hidden_size", self.ffn_hidden_size),
        ):
            if value % tp:
                ok = [d for d in range(1, min(value, 64) + 1) if value % d == 0]
                raise CheckpointError(
                    f"{self.source}: {what} tensor-parallel size {tp} does not divide {field_name}={value}; use one of {ok}"
                )

    def check_fits_site(self, devices: int) -> None:
        """Raise unless one copy of the model spans exactly a site's `devices` GPUs (one process per GPU).

        Megatron shards per-rank checkpoints by TP rank, so a TP=2 file needs exactly two processes. NeMo
        could reshard a torch-distributed checkpoint on load, but its trainers take the TP from the
        checkpoint's config and fedllm's SFT exchange names shards by it: the same rule holds for both.
        """
        if self.pipeline_parallel != 1:
            raise CheckpointError(
                f"{self.source}: model_config.yaml field pipeline_model_parallel_size is {self.pipeline_parallel}; "
                "fedllm's NeMo jobs use tensor parallelism only. Fix: re-save the checkpoint with "
                "pipeline_model_parallel_size 1"
            )
        if self.tensor_parallel != devices:
            raise CheckpointError(
                f"{self.source}: model_config.yaml field tensor_model_parallel_size is {self.tensor_parallel}, but "
                f"the site trains on {devices} GPU(s) (one process per GPU, each holding one tensor-parallel shard). "
                f"Fix: create the job with --devices {self.tensor_parallel} and give each site {self.tensor_parallel} "
                f"GPUs (sites[].gpus in the site config), or convert the checkpoint: `fedllm ckpt convert --source "
                f"{self.source} --target <new>.nemo --target-tp {devices}`"
            )


def read_model_spec(path: str | os.PathLike[str]) -> ModelSpec:
    """The ModelSpec of a .nemo archive or extracted folder, from its config alone."""
    header = read_header(path)
    return ModelSpec.from_config(header.config, str(header.path))
