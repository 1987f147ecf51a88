"""Streaming tensor-parallel resharding of Megatron-GPT .nemo checkpoints (N → M ranks, no NeMo needed).

Why not NeMo's megatron_change_num_partitions.py: it restores every source rank as a full model in CPU RAM,
merges into a TP1 model and splits again (several model copies in RAM, a full NeMo install). Here each
output tensor is assembled from just the source rows/columns it needs (read straight from the archive)
and written at once, so peak memory is a few tensors, flat in the number of layers.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fedllm.checkpoint.archive import CONFIG_NAME, LAZY_TENSORS, NemoArchive, NemoArchiveWriter, rank_member_name
from fedllm.checkpoint.errors import CheckpointError
from fedllm.checkpoint.layout import Rule, Split, layer_index, rule_for
from fedllm.checkpoint.model_spec import ModelSpec
from fedllm.checkpoint.structure import check_structure
from fedllm.checkpoint.torch_zip import LazyStateDict, LazyTensor, StreamingStateDictWriter
from fedllm.checkpoint.vocab import resolve_vocab_size
from fedllm.fileio import atomic_path


@dataclass(frozen=True)
class ConvertResult:
    target: Path
    source_tp: int
    target_tp: int
    source_padded_vocab: int
    target_padded_vocab: int
    vocab_size: int
    tensors: int


def column_rows(
    shards: list[LazyTensor], chunks: int, chunk: int, start: int, stop: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows [start, stop) of chunk `chunk` of the merged column-parallel tensor, read from the shards.

    Each shard stacks `chunks` parts ([Q;K;V] → 3, [W;V] → 2, else 1); part c of the merged tensor is the
    concatenation of every shard's part c. Rows at or beyond the merged size (vocabulary padding that the
    target needs and the source lacks) are zeros. Bytes are read straight into `out` (no concatenation copy).
    """
    per = shards[0].shape[0] // chunks  # rows of one part in one shard
    merged = per * len(shards)
    if out is None:
        out = torch.empty((stop - start, *shards[0].shape[1:]), dtype=shards[0].dtype)
    row = start
    while row < stop:
        if row >= merged:
            out[row - start :].zero_()
            break
        i = row // per
        lo, hi = row - i * per, min(stop - i * per, per)
        shards[i].load_rows(chunk * per + lo, chunk * per + hi, out=out[row - start : row - start + hi - lo])
        row = i * per + hi
    return out


def row_parallel_cols(shards: list[LazyTensor], start: int, stop: int) -> torch.Tensor:
    """Columns [start, stop) of the merged row-parallel (dim 1) tensor."""
    per = shards[0].shape[1]
    pieces, col = [], start
    while col < stop:
        i = col // per
        lo, hi = col - i * per, min(stop - i * per, per)
        full = shards[i].load()
        pieces.append(full if (lo, hi) == (0, per) else full[:, lo:hi])
        col = i * per + hi
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1).contiguous()


def target_shard(
    key: str, rule: Rule, shards: list[LazyTensor], rank: int, tp: int, padded_vocab: int | None
) -> torch.Tensor:
    """The tensor `key` of target rank `rank` of `tp`, built from all source shards of that key."""
    if rule.split is Split.COLUMN:
        if rule.vocab:
            assert padded_vocab is not None
            rows = padded_vocab // tp
            return column_rows(shards, 1, 0, rank * rows, (rank + 1) * rows)
        part_rows = shards[0].shape[0] // rule.chunks * len(shards) // tp
        out = torch.empty((part_rows * rule.chunks, *shards[0].shape[1:]), dtype=shards[0].dtype)
        for c in range(rule.chunks):
            column_rows(
                shards,
                rule.chunks,
                c,
                rank * part_rows,
                (rank + 1) * part_rows,
                out[c * part_rows : (c + 1) * part_rows],
            )
        return out
    if rule.split is Split.ROW:
        cols = shards[0].shape[1] * len(shards) // tp
        return row_parallel_cols(shards, rank * cols, (rank + 1) * cols)
    return shards[0].load()


def merged_tensor(key: str, rule: Rule, shards: list[LazyTensor]) -> torch.Tensor:
    """The TP1 tensor (all shards merged), for verification against another checkpoint."""
    if rule.split is Split.EXTRA_STATE:
        raise ValueError("extra state is not a tensor")
    if rule.split is Split.COLUMN:
        return target_shard(key, rule, shards, 0, 1, shards[0].shape[0] * len(shards) if rule.vocab else None)
    if rule.split is Split.ROW:
        return target_shard(key, rule, shards, 0, 1, None)
    return shards[0].load()


def _check_split_sizes(key: str, rule: Rule, shape: tuple[int, ...], n_src: int, n_tgt: int, source: str) -> None:
    if rule.split is Split.COLUMN and not rule.vocab:
        rows = shape[0] * n_src
        if rows % (rule.chunks * n_tgt):
            raise CheckpointError(
                f"{source}: {key} has {rows} rows, which do not split into {n_tgt} ranks × {rule.chunks} parts"
            )
    if rule.split is Split.ROW and (shape[1] * n_src) % n_tgt:
        raise CheckpointError(f"{source}: {key} has {shape[1] * n_src} columns, which do not split into {n_tgt} ranks")


def updated_config_text(text: str, target_tp: int) -> str:
    """model_config.yaml with the new TP size; everything else byte for byte (comments and order kept)."""
    line = re.compile(r"^tensor_model_parallel_size:[^\n]*$", re.MULTILINE)
    text = (
        line.sub(f"tensor_model_parallel_size: {target_tp}", text)
        if line.search(text)
        else (text.rstrip("\n") + f"\ntensor_model_parallel_size: {target_tp}\n")
    )
    if target_tp == 1:  # Megatron refuses sequence parallelism without tensor parallelism
        text = re.sub(r"^sequence_parallel:\s*[Tt]rue\s*$", "sequence_parallel: false", text, flags=re.MULTILINE)
    return text


def _layer_groups(keys: list[str]) -> list[list[str]]:
    groups: list[list[str]] = []
    last: object = object()
    for key in keys:
        layer = layer_index(key)
        tag = layer if layer is not None else key.split(".layers.", 1)[0].rsplit(".", 2)[0]
        if tag != last:
            groups.append([])
            last = tag
        groups[-1].append(key)
    return groups


def convert(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    target_tp: int,
    *,
    vocab_size: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    verify: Callable[[Path], object] | None = None,
) -> ConvertResult:
    """Reshard `source` to `target_tp` ranks into `target`, atomically (temp file, verify, rename)."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise CheckpointError(f"{target}: already exists; remove it or pass --overwrite")
    if not target.parent.is_dir():
        raise CheckpointError(f"{target.parent}: the target directory does not exist; create it first")
    with NemoArchive(source, scratch_dir=target.parent) as archive:
        spec = ModelSpec.from_config(archive.config, str(archive.path))
        if archive.pp != 1:
            raise CheckpointError(
                f"{archive.path}: pipeline_model_parallel_size={archive.pp}; fedllm converts PP=1 checkpoints only "
                "(merge the pipeline stages with NeMo first, or convert with PP=1)"
            )
        spec.check_tp(spec.tensor_parallel, "source")
        spec.check_tp(target_tp)
        weights_bytes = archive.weights_bytes()
        free = shutil.disk_usage(target.parent).free
        if free < weights_bytes * 1.05:
            raise CheckpointError(
                f"{target.parent}: {free / 2**30:.1f} GiB free but the converted checkpoint needs about "
                f"{weights_bytes / 2**30:.1f} GiB; free space or choose another --target directory"
            )
        with atomic_path(target, durable=True) as tmp:
            result = _write(archive, spec, tmp, target, target_tp, vocab_size, progress)
            if verify is not None:
                verify(tmp)
    return result


def _write(
    archive: NemoArchive,
    spec: ModelSpec,
    tmp: Path,
    target: Path,
    target_tp: int,
    vocab_override: int | None,
    progress: bool,
) -> ConvertResult:
    n_src = archive.shards
    sources: list[LazyStateDict] = []
    try:
        for r in range(n_src):
            sources.append(archive.open_rank(r))
        keys = sources[0].keys()
        check_structure(archive, spec, sources)
        for r, sd in enumerate(sources[1:], start=1):
            if sd.keys() != keys:
                missing = sorted(set(keys) ^ set(sd.keys()))[:5]
                raise CheckpointError(
                    f"{sd.name}: its keys differ from rank 0's (e.g. {missing}); shard {r} is damaged"
                )
        rules = {k: rule_for(k, spec) for k in keys}
        tensors = [k for k in keys if rules[k].split is not Split.EXTRA_STATE]
        vocab_keys = [k for k in tensors if rules[k].vocab]
        src_padded = sources[0].state[vocab_keys[0]].shape[0] * n_src if vocab_keys else 0
        vocab = resolve_vocab_size(archive, vocab_override, src_padded, spec) if vocab_keys else 0
        tgt_padded = spec.padded_vocab_size(vocab, target_tp) if vocab_keys else 0
        for k in tensors:
            value = sources[0].state[k]
            if not isinstance(value, LAZY_TENSORS):
                raise CheckpointError(f"{sources[0].name}: {k} is a {type(value).__name__}, expected a tensor")
            _check_split_sizes(k, rules[k], value.shape, n_src, target_tp, str(archive.path))
        _check_replicas(sources, [k for k in tensors if "position_embeddings" in k])

        writer = NemoArchiveWriter(tmp, dot_prefix=archive.dot_prefix)
        try:
            try:
                config_text = archive.read_member(CONFIG_NAME).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CheckpointError(
                    f"{archive.path}: {CONFIG_NAME} is not UTF-8 text ({exc}); re-save the checkpoint with NeMo"
                ) from exc
            writer.add_bytes(CONFIG_NAME, updated_config_text(config_text, target_tp).encode("utf-8"))
            for name in archive.artifact_names():  # checked against the source's fedllm_checksums.json if any
                with archive.open_member(name) as src:
                    writer.add_stream(name, src, archive.members[name].size)
            writer.add_checksums()
            groups = _layer_groups(keys)
            bar = tqdm(
                total=target_tp * len(groups), unit="layer", disable=not progress, desc=f"TP{n_src}→TP{target_tp}"
            )

            def produce(k: str, rank: int) -> object:
                rule = rules[k]
                if rule.split is Split.EXTRA_STATE:
                    value = sources[0].state[k]
                    return value.load() if isinstance(value, LAZY_TENSORS) else value
                return target_shard(k, rule, [sd.state[k] for sd in sources], rank, target_tp, tgt_padded)

            # One tensor is read and assembled on a worker thread while the previous one is written (file I/O
            # and torch copies release the GIL): reading and writing overlap, memory grows by one tensor.
            flat = [(k, k == group[-1]) for group in groups for k in group]
            with bar, ThreadPoolExecutor(1, thread_name_prefix="fedllm-reshard") as pool:
                for rank in range(target_tp):
                    with writer.member_stream(rank_member_name(rank, target_tp)) as stream:
                        out = StreamingStateDictWriter(stream)
                        pending = pool.submit(produce, flat[0][0], rank)
                        for i, (k, ends_group) in enumerate(flat):
                            value = pending.result()
                            if i + 1 < len(flat):
                                pending = pool.submit(produce, flat[i + 1][0], rank)
                            out.add_object(k, value)
                            del value
                            if ends_group:
                                bar.set_postfix_str(f"rank {rank}")
                                bar.update(1)
                        out.finish()
            for sd in sources:  # the records read only in part (vocabulary padding left out) are read to their end
                sd.finish_checks()
            writer.finish()
        finally:
            writer.close()
    finally:
        for sd in sources:
            sd.close()
    return ConvertResult(target, archive.tp, target_tp, src_padded, tgt_padded, vocab, len(tensors))


def _check_replicas(sources: list[LazyStateDict], keys: list[str]) -> None:
    """Replicated tensors that must agree across ranks (position embeddings) do, or we would drop data."""
    for k in keys:
        ref = sources[0].state[k].load()
        for sd in sources[1:]:
            if not torch.equal(ref, sd.state[k].load()):
                raise CheckpointError(
                    f"{sd.name}: replicated tensor {k} differs from rank 0's; the checkpoint is inconsistent"
                )
