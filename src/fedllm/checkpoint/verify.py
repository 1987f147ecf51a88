"""Checks of a .nemo checkpoint: every tensor present on every rank, shapes the config implies, every byte
intact (zip CRC-32s, fedllm's checksums), and optionally the merged full weights equal to another
checkpoint's, bit for bit."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedllm.checkpoint.archive import CHECKSUMS_NAME, NemoArchive, check_member_sum, rank_of, read_header
from fedllm.checkpoint.config_fields import CONFIG_NAME, positive_int
from fedllm.checkpoint.distributed import DIST_DIR, METADATA, DistributedWeights
from fedllm.checkpoint.errors import CheckpointError
from fedllm.checkpoint.layout import Split, is_mcore, rule_for
from fedllm.checkpoint.model_spec import ModelSpec
from fedllm.checkpoint.reshard import merged_tensor
from fedllm.checkpoint.structure import check_structure
from fedllm.checkpoint.torch_zip import FileWindow, LazyStateDict, TorchZipReader


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
    ranks: list = []
    try:
        for t, p in sorted(archive.ranks, key=lambda tp: (tp[1], tp[0])):
            ranks.append(archive.open_rank(t, p))
    except BaseException:
        for sd in ranks:
            sd.close()
        raise
    return ranks


def summarize(path: str | os.PathLike[str], *, check_records: bool = False) -> CheckpointSummary:
    """Read the config and every rank's tensor metadata, check structure; with check_records every byte.

    check_records reads every record of every weight file (CRC-32), every item of a distributed
    checkpoint, its other torch files (common.pt), and every member fedllm_checksums.json lists.
    """
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
            found = check_structure(archive, spec, ranks)
            if check_records:
                for sd in ranks:
                    sd.check_crcs()
                _check_other_torch_files(archive)
                archive.check_members()
        finally:
            for sd in ranks:
                sd.close()
        return CheckpointSummary(
            path=archive.path,
            layout=("mcore" if is_mcore(keys) else "legacy")
            + (" (distributed checkpoint)" if archive.distributed else ""),
            tp=archive.tp,
            pp=archive.pp,
            dtype=found.dtypes.most_common(1)[0][0] if found.dtypes else "?",
            parameters=found.parameters,
            padded_vocab=found.padded_vocab,
            size_on_disk=archive.size_on_disk,
            compressed=archive.compressed,
            spec=spec,
            artifacts=archive.artifact_names(),
            tensors=found.tensors,
        )


def _check_other_torch_files(archive: NemoArchive) -> None:
    """The distributed checkpoint's torch.save files besides its items (common.pt): their CRCs hold."""
    for name in archive.weight_members() if archive.distributed else []:
        if name.endswith(".pt"):
            with TorchZipReader(archive.open_range(name, 0, archive.members[name].size), f"{archive.path}:{name}") as f:
                f.check_crcs()


def check_integrity(path: str | os.PathLike[str], tp_rank: int | None = None) -> None:
    """Every byte NeMo will restore from `path` is intact (CRC-32s), before NeMo reads it: torch.load checks none.

    `tp_rank` limits the weights checked to that tensor-parallel rank's file (each process of a site restores
    its own shard); a distributed checkpoint is checked whole. Costs one extra read of those weights (19 GB
    per process for the 20B model at TP2). `path` may be an extracted folder (NeMo restores those too).
    """
    path = Path(path)
    if path.is_dir():
        _check_folder(path, tp_rank)
        return
    with NemoArchive(path) as archive:
        archive.check_members()
        names = list(archive.ranks)
        if tp_rank is not None and not archive.distributed:
            names = [r for r in names if r[0] == tp_rank]
        for t, p in names:
            with archive.open_rank(t, p) as sd:
                sd.check_crcs()
        _check_other_torch_files(archive)


def _check_folder(folder: Path, tp_rank: int | None) -> None:
    """check_integrity of an extracted .nemo: its checksummed members, its weight files' records and items."""
    header = read_header(folder)  # checks model_config.yaml against fedllm_checksums.json when there is one
    sums_file = folder / CHECKSUMS_NAME
    for name in json.loads(sums_file.read_bytes())["members"] if sums_file.is_file() else []:
        if name != CONFIG_NAME:
            check_member_sum(folder, name, (folder / name).read_bytes() if (folder / name).is_file() else b"")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for file in files:
        name = file.relative_to(folder).as_posix()
        rank = rank_of(name)
        if rank is not None and (tp_rank is None or rank[0] == tp_rank):
            with TorchZipReader(FileWindow(file), f"{folder}:{name}") as sd:
                sd.check_crcs()
        elif name.startswith(DIST_DIR + "/") and name.endswith(".pt"):
            with TorchZipReader(FileWindow(file), f"{folder}:{name}") as f:
                f.check_crcs()
    if header.distributed:
        members = {p.relative_to(folder).as_posix() for p in files}
        layers = positive_int(header.config, "num_layers", str(folder))
        index = (folder / DIST_DIR / METADATA).read_bytes()
        with DistributedWeights(
            index, lambda name, start, length: FileWindow(folder / name, start, length), members, str(folder), layers
        ) as weights:
            weights.check_crcs()


def compare_merged(path: str | os.PathLike[str], against: str | os.PathLike[str]) -> int:
    """Merge both checkpoints' shards tensor by tensor and require equal bits.

    Vocabulary rows are compared up to the smaller padded size (rows past it are padding that a TP change
    trims or adds). Returns the number of tensors compared.
    """
    with NemoArchive(path) as a, NemoArchive(against) as b:
        spec_a = ModelSpec.from_config(a.config, str(a.path))
        spec_b = ModelSpec.from_config(b.config, str(b.path))
        ra: list[LazyStateDict] = []
        rb: list[LazyStateDict] = []
        try:
            ra = _open_ranks(a)
            rb = _open_ranks(b)
            check_structure(a, spec_a, ra)
            check_structure(b, spec_b, rb)
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
