"""The structure every reader checks before it uses a checkpoint's tensors: what `info` reports, what
`convert` and `export-hf` rely on.

Every rank holds the same keys; each is a tensor of one shape on every rank; merged, it has the shape
model_config.yaml implies; the layers present are exactly 0..num_layers-1. Only metadata is read (the
pickled state dicts), so this is cheap; the tensors' bytes are checked (CRC-32) when they are read.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from fedllm.checkpoint.archive import LAZY_TENSORS, NemoArchive
from fedllm.checkpoint.distributed import DistributedWeights
from fedllm.checkpoint.errors import CheckpointError
from fedllm.checkpoint.layout import Split, expected_full_shape, full_shape, layer_index, rule_for
from fedllm.checkpoint.model_spec import ModelSpec
from fedllm.checkpoint.torch_zip import LazyStateDict


@dataclass
class Structure:
    """What the checks found: parameter count, dtypes, the padded vocabulary rows, tensors per rank."""

    parameters: int = 0
    padded_vocab: int = 0
    tensors: int = 0
    dtypes: Counter[str] = field(default_factory=Counter)


def check_structure(
    archive: NemoArchive, spec: ModelSpec, ranks: list[LazyStateDict] | list[DistributedWeights]
) -> Structure:
    """Raise, naming the shard, key and config field, unless the ranks form the model the config describes."""
    keys = ranks[0].keys()
    for r, sd in enumerate(ranks[1:], start=1):
        if set(sd.keys()) != set(keys):
            missing = sorted(set(keys) - set(sd.keys()))
            extra = sorted(set(sd.keys()) - set(keys))
            raise CheckpointError(
                f"{sd.name}: tensor set differs from rank 0 (missing {missing[:5]}, extra {extra[:5]}); "
                f"rank {r} is damaged — re-create or re-download the checkpoint"
            )
    layers = {i for i in (layer_index(k) for k in keys) if i is not None}
    # distinct indices ≥ 0, as many as num_layers, the largest num_layers-1: exactly 0..num_layers-1
    if layers and (len(layers) != spec.num_layers or max(layers) != spec.num_layers - 1):
        raise CheckpointError(
            f"{ranks[0].name}: the weights hold layers {_spans(layers)} but model_config.yaml field num_layers is "
            f"{spec.num_layers}; the config or the weights are wrong — re-download or re-create the checkpoint"
        )
    found = Structure()
    for key in keys:
        try:
            rule = rule_for(key, spec)
        except CheckpointError as exc:
            raise CheckpointError(f"{ranks[0].name}: {exc}") from exc
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
        try:
            full = full_shape(key, rule, shard.shape, archive.shards)
        except CheckpointError as exc:
            raise CheckpointError(f"{ranks[0].name}: {exc}; the checkpoint is damaged or not a Megatron-GPT") from exc
        if rule.vocab:
            found.padded_vocab = full[0]
            if found.padded_vocab % (spec.make_vocab_size_divisible_by * archive.tp):
                raise CheckpointError(
                    f"{archive.path}: {key} has {found.padded_vocab} rows, not a multiple of "
                    f"make_vocab_size_divisible_by × TP = {spec.make_vocab_size_divisible_by * archive.tp}; "
                    "model_config.yaml or the weights are wrong"
                )
        want = expected_full_shape(key, spec, found.padded_vocab)
        if want is not None and tuple(full) != tuple(want):
            raise CheckpointError(
                f"{ranks[0].name}: {key} merges to shape {tuple(full)} but model_config.yaml implies {want} "
                f"(hidden_size={spec.hidden_size}, ffn_hidden_size={spec.ffn_hidden_size}, "
                f"num_attention_heads={spec.num_attention_heads}, TP={archive.tp}); the config or the shard is wrong"
            )
        n = 1
        for d in full:
            n *= d
        found.parameters += n
        found.dtypes[str(shard.dtype).removeprefix("torch.")] += n
        found.tensors += 1
    return found


def _spans(numbers: set[int]) -> str:
    """{0, 1, 2, 5} → "0-2, 5"."""
    out, run = [], []
    for n in sorted(numbers):
        if run and n != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(n)
    out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)
