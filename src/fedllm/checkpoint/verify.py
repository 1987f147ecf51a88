"""Checks of a .nemo checkpoint: every tensor present on every rank, shapes the config implies, records
intact (zip CRC32), and optionally the merged full weights equal to another checkpoint's, bit for bit."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedllm.checkpoint.archive import LAZY_TENSORS, NemoArchive
from fedllm.checkpoint.errors import CheckpointError
from fedllm.checkpoint.layout import Split, expected_full_shape, is_mcore, rule_for
from fedllm.checkpoint.model_spec import ModelSpec
from fedllm.checkpoint.reshard import merged_tensor
from fedllm.checkpoint.torch_zip import LazyStateDict


@dataclass
class CheckpointSummary:
    path: Path
    layout: str
    tp: int
    pp: int
    dtype: str
    parameters: int
    padded_vocab: int
    size_on_disk: int
    compressed: bool
    spec: ModelSpec
    artifacts: list[str] = field(default_factory=list)
    tensors: int = 0


def _open_ranks(archive: NemoArchive) -> list[LazyStateDict]:
    return [archive.open_rank(t, p) for (t, p) in sorted(archive.ranks, key=lambda tp: (tp[1], tp[0]))]


def summarize(path: str | os.PathLike[str], *, check_records: bool = False) -> CheckpointSummary:
    """Read the config and every rank's tensor metadata, check structure; with check_records also CRCs."""
    with NemoArchive(path) as archive:
        spec = ModelSpec.from_config(archive.config, str(archive.path))
        if archive.pp != 1:
            raise CheckpointError(
                f"{archive.path}: pipeline_model_parallel_size={archive.pp}; fedllm reads the shard list "
                f"({sorted(archive.ranks.values())}) but inspects and converts PP=1 checkpoints only"
            )
        ranks = _open_ranks(archive)
        try:
            keys = ranks[0].keys()
            for r, sd in enumerate(ranks[1:], start=1):
                if set(sd.keys()) != set(keys):
                    missing = sorted(set(keys) - set(sd.keys()))
                    extra = sorted(set(sd.keys()) - set(keys))
                    raise CheckpointError(
                        f"{sd.name}: tensor set differs from rank 0 (missing {missing[:5]}, extra {extra[:5]}); "
                        f"rank {r} is damaged — re-create or re-download the checkpoint"
                    )
            params, dtypes, tensors, padded_vocab = 0, Counter(), 0, 0
            for key in keys:
                rule = rule_for(key, spec)
                if rule.split is Split.EXTRA_STATE:
                    continue
                shards = [sd.state[key] for sd in ranks]
                if not all(isinstance(s, LAZY_TENSORS) for s in shards):
                    raise CheckpointError(f"{ranks[0].name}: {key} is not a tensor on every rank")
                if len({s.shape for s in shards}) != 1:
                    raise CheckpointError(
                        f"{archive.path}: {key} has different shapes across ranks: {[s.shape for s in shards]}"
                    )
                shard = shards[0]
                full = _full_shape(rule.split, shard.shape, archive.shards)
                if rule.vocab:
                    padded_vocab = full[0]
                    if padded_vocab % (spec.make_vocab_size_divisible_by * archive.tp):
                        raise CheckpointError(
                            f"{archive.path}: {key} has {padded_vocab} rows, not a multiple of "
                            f"make_vocab_size_divisible_by × TP = {spec.make_vocab_size_divisible_by * archive.tp}"
                        )
                want = expected_full_shape(key, spec, padded_vocab)
                if want is not None and tuple(full) != tuple(want):
                    raise CheckpointError(
                        f"{ranks[0].name}: {key} merges to shape {tuple(full)} but model_config.yaml implies {want} "
                        f"(hidden_size={spec.hidden_size}, ffn_hidden_size={spec.ffn_hidden_size}, "
                        f"num_attention_heads={spec.num_attention_heads}, TP={archive.tp}); the config or the shard is wrong"
                    )
                n = 1
                for d in full:
                    n *= d
                params += n
                dtypes[str(shard.dtype).removeprefix("torch.")] += n
                tensors += 1
            if check_records:
                for sd in ranks:
                    sd.check_crcs()
        finally:
            for sd in ranks:
                sd.close()
        return CheckpointSummary(
            path=archive.path,
            layout=("mcore" if is_mcore(keys) else "legacy")
            + (" (distributed checkpoint)" if archive.distributed else ""),
            tp=archive.tp,
            pp=archive.pp,
            dtype=dtypes.most_common(1)[0][0] if dtypes else "?",
            parameters=params,
            padded_vocab=padded_vocab,
            size_on_disk=archive.size_on_disk,
            compressed=archive.compressed,
            spec=spec,
            artifacts=archive.artifact_names(),
            tensors=tensors,
        )


def _full_shape(split: Split, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    if split is Split.COLUMN:
        return (shape[0] * tp, *shape[1:])
    if split is Split.ROW:
        return (shape[0], shape[1] * tp)
    return shape


def compare_merged(path: str | os.PathLike[str], against: str | os.PathLike[str]) -> int:
    """Merge both checkpoints' shards tensor by tensor and require equal bits.

    Vocabulary rows are compared up to the smaller padded size (rows past it are padding that a TP change
    trims or adds). Returns the number of tensors compared.
    """
    with NemoArchive(path) as a, NemoArchive(against) as b:
        spec_a = ModelSpec.from_config(a.config, str(a.path))
        ra, rb = _open_ranks(a), _open_ranks(b)
        try:
            keys_a, keys_b = ra[0].keys(), rb[0].keys()
            if set(keys_a) != set(keys_b):
                diff = sorted(set(keys_a) ^ set(keys_b))
                raise CheckpointError(f"{a.path} and {b.path} hold different tensors (e.g. {diff[:5]})")
            compared = 0
            for key in keys_a:
                rule = rule_for(key, spec_a)
                if rule.split is Split.EXTRA_STATE:
                    continue
                x = merged_tensor(key, rule, [sd.state[key] for sd in ra])
                y = merged_tensor(key, rule, [sd.state[key] for sd in rb])
                if rule.vocab:
                    n = min(x.shape[0], y.shape[0])  # both pad the same vocabulary: rows past n are padding
                    x, y = x[:n], y[:n]
                if (
                    x.dtype != y.dtype
                    or x.shape != y.shape
                    or not torch.equal(x.view(torch.uint8), y.view(torch.uint8))
                ):
                    raise CheckpointError(
                        f"{a.path}: merged {key} differs from {b.path}'s "
                        f"({x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)})"
                    )
                compared += 1
        finally:
            for sd in ra + rb:
                sd.close()
    return compared
