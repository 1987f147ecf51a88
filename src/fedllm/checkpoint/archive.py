"""Reading and writing `.nemo` archives (tar, plain or gzip) without unpacking the weights into memory.

Layout (NeMo's save_to): model_config.yaml; model_weights.ckpt (TP=PP=1), mp_rank_XX/model_weights.ckpt
(TP>1, PP=1) or tp_rank_XX_pp_rank_YYY/model_weights.ckpt (PP>1), or — NeMo 2 with Megatron-core models —
a `model_weights/` torch-distributed checkpoint (read as one merged shard, fedllm.checkpoint.distributed);
tokenizer and other artifacts, which fedllm carries over byte for byte. Member names may start with "./". Plain tars are read in place (each weight file is a
window of the tar); gzip tars are streamed once into a scratch directory next to the output.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from fedllm.checkpoint.distributed import DIST_DIR, METADATA, DistributedWeights, DistTensor
from fedllm.checkpoint.errors import CheckpointError, DistributedCheckpointError
from fedllm.checkpoint.torch_zip import FileWindow, LazyStateDict, LazyTensor

CONFIG_NAME = "model_config.yaml"
WEIGHTS_NAME = "model_weights.ckpt"
# What `open_rank(...).state` holds for a tensor: read on demand, per-rank file or distributed checkpoint.
LAZY_TENSORS = (LazyTensor, DistTensor)
_MP_RANK = re.compile(r"^mp_rank_(\d+)/" + re.escape(WEIGHTS_NAME) + "$")
_TP_PP_RANK = re.compile(r"^tp_rank_(\d+)_pp_rank_(\d+)/" + re.escape(WEIGHTS_NAME) + "$")


def _normalize(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def rank_member_name(tp_rank: int, tp: int, pp_rank: int = 0, pp: int = 1) -> str:
    """Where NeMo puts one rank's weights."""
    if tp == 1 and pp == 1:
        return WEIGHTS_NAME
    if pp == 1:
        return f"mp_rank_{tp_rank:02d}/{WEIGHTS_NAME}"
    return f"tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:03d}/{WEIGHTS_NAME}"


@dataclass(frozen=True)
class CheckpointHeader:
    """What a `.nemo` says about itself, read without touching its weights."""

    path: Path
    config: dict[str, Any]
    # The weights are a torch-distributed checkpoint (a model_weights/ directory, NeMo 2's save_to),
    # not per-rank model_weights.ckpt files.
    distributed: bool


def _parse_config(text: bytes | str, source: Path) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CheckpointError(
            f"{source}: {CONFIG_NAME} is not valid YAML ({exc}). Fix: re-save the checkpoint"
        ) from exc
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{source}: {CONFIG_NAME} is not a mapping. Fix: re-save the checkpoint with NeMo")
    return cfg


def read_header(path: str | os.PathLike[str]) -> CheckpointHeader:
    """model_config.yaml and the weights' layout of a .nemo archive (plain or gzip) or an extracted folder.

    Only tar headers are read (a plain tar is skipped through, a gzip one decompressed up to what is
    needed), so this is cheap even for a 38 GB checkpoint: sites check it before NeMo loads anything.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist on this machine. Fix: put the .nemo file there (sites read it from "
            "their own disk or data mount) or pass its path with `fedllm job create ... --model <path>`"
        )
    if path.is_dir():
        config_file = path / CONFIG_NAME
        if not config_file.is_file():
            raise CheckpointError(f"{path} has no {CONFIG_NAME}, so it is not an extracted NeMo checkpoint")
        return CheckpointHeader(path, _parse_config(config_file.read_bytes(), path), (path / DIST_DIR).is_dir())
    config: dict[str, Any] | None = None
    distributed = per_rank = False
    try:
        with tarfile.open(path, "r:*") as tar:
            for info in tar:
                name = _normalize(info.name)
                distributed = distributed or name == DIST_DIR or name.startswith(DIST_DIR + "/")
                per_rank = per_rank or name.endswith(WEIGHTS_NAME)
                if name == CONFIG_NAME and info.isfile():
                    handle = tar.extractfile(info)
                    config = _parse_config(handle.read() if handle else b"", path)
                if config is not None and (distributed or per_rank):
                    break  # the weights' layout is known: the rest of the archive is weights
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CheckpointError(
            f"{path} is not a readable .nemo archive ({type(exc).__name__}: {exc}). Fix: re-download or re-save it"
        ) from exc
    if config is None:
        raise CheckpointError(
            f"{path} has no {CONFIG_NAME}, so it is not a NeMo checkpoint. Fix: pass a .nemo saved by NeMo "
            "(model.save_to) or written by `fedllm ckpt convert`"
        )
    return CheckpointHeader(path, config, distributed)


@dataclass
class _Member:
    name: str  # normalized
    size: int
    offset: int  # data offset inside the tar (plain tars)
    extracted: Path | None = None  # scratch copy (gzip tars)


class NemoArchive:
    """An opened .nemo file: its config, its rank weight files (lazily readable) and its other members."""

    def __init__(self, path: str | os.PathLike[str], scratch_dir: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(
                f"{self.path}: no such checkpoint file; check the path (download it with make download-20b)"
            )
        self.size_on_disk = self.path.stat().st_size
        self._scratch: Path | None = None
        self.compressed = _is_gzip(self.path)
        self.members: dict[str, _Member] = {}
        self.dot_prefix = False
        try:
            if self.compressed:
                self._scan_gzip(scratch_dir)
            else:
                self._scan_plain()
        except (tarfile.TarError, EOFError, OSError) as exc:
            self.close()
            raise CheckpointError(
                f"{self.path}: not a readable .nemo archive ({type(exc).__name__}: {exc}); the file is truncated "
                "or corrupted — download it again (make download-20b resumes and checks the sha256)"
            ) from exc
        except BaseException:
            self.close()
            raise
        self._check_layout()
        self.config: dict[str, Any] = self._read_config()
        self.ranks = self._find_ranks()

    # -- scanning ---------------------------------------------------------------------------------------------
    def _scan_plain(self) -> None:
        with tarfile.open(self.path, "r:") as tar:
            for info in tar:
                if info.name.startswith("./"):
                    self.dot_prefix = True
                name = _normalize(info.name)
                if info.isfile() and name:
                    self.members[name] = _Member(name, info.size, info.offset_data)
        if not self.members:
            raise tarfile.ReadError("empty archive")

    def _scan_gzip(self, scratch_dir: str | os.PathLike[str] | None) -> None:
        base = Path(scratch_dir) if scratch_dir else self.path.parent
        self._scratch = base / f".{self.path.name}.extract-{os.getpid()}-{time.monotonic_ns()}"
        self._scratch.mkdir(parents=True)
        with tarfile.open(self.path, "r:gz") as tar:
            for i, info in enumerate(tar):
                if info.name.startswith("./"):
                    self.dot_prefix = True
                name = _normalize(info.name)
                if not (info.isfile() and name):
                    continue
                target = self._scratch / f"{i:06d}"
                src = tar.extractfile(info)
                assert src is not None
                with src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
                self.members[name] = _Member(name, info.size, 0, target)
        if not self.members:
            raise tarfile.ReadError("empty archive")

    def _check_layout(self) -> None:
        self.distributed = any(name.startswith(DIST_DIR + "/") for name in self.members)
        if self.distributed and f"{DIST_DIR}/{METADATA}" not in self.members:
            raise DistributedCheckpointError(
                f"{self.path}: the distributed checkpoint in {DIST_DIR}/ has no {METADATA} index; the file is "
                "truncated or was not written by NeMo — re-save it with NeMo (model.save_to)"
            )
        if CONFIG_NAME not in self.members:
            raise CheckpointError(
                f"{self.path}: no {CONFIG_NAME} in the archive (members: {sorted(self.members)[:8]}); "
                "this is not a NeMo checkpoint or it is truncated"
            )

    def _read_config(self) -> dict[str, Any]:
        return _parse_config(self.read_member(CONFIG_NAME), self.path)

    def _find_ranks(self) -> dict[tuple[int, int], str]:
        """(tp_rank, pp_rank) → member name, checked against the config's TP and PP sizes.

        A distributed checkpoint is one merged shard whatever TP it was saved at (fedllm.checkpoint.distributed).
        """
        if self.distributed:
            return {(0, 0): f"{DIST_DIR}/{METADATA}"}
        ranks: dict[tuple[int, int], str] = {}
        for name in self.members:
            if name == WEIGHTS_NAME:
                ranks[(0, 0)] = name
            elif m := _MP_RANK.match(name):
                ranks[(int(m.group(1)), 0)] = name
            elif m := _TP_PP_RANK.match(name):
                ranks[(int(m.group(1)), int(m.group(2)))] = name
        tp, pp = self.tp, self.pp
        expected = {(t, p) for t in range(tp) for p in range(pp)}
        if not ranks:
            raise CheckpointError(
                f"{self.path}: no {WEIGHTS_NAME} in the archive; the file is truncated or not a model"
            )
        missing = sorted(expected - set(ranks))
        extra = sorted(set(ranks) - expected)
        if missing or extra:
            have_tp = len({t for t, _ in ranks})
            raise CheckpointError(
                f"{self.path}: {CONFIG_NAME} says tensor_model_parallel_size={tp}, pipeline_model_parallel_size={pp} "
                f"but the archive holds shards {sorted(ranks.values())}"
                + (f" (missing {[rank_member_name(t, tp, p, pp) for t, p in missing]})" if missing else "")
                + f"; fix tensor_model_parallel_size (the shards suggest {have_tp}) or re-download the file"
            )
        return ranks

    # -- access -----------------------------------------------------------------------------------------------
    @property
    def tp(self) -> int:
        return int(self.config.get("tensor_model_parallel_size") or 1)

    @property
    def pp(self) -> int:
        return int(self.config.get("pipeline_model_parallel_size") or 1)

    @property
    def shards(self) -> int:
        """How many tensor-parallel weight shards `open_rank` gives: the TP, or 1 for a distributed checkpoint."""
        return 1 if self.distributed else self.tp

    def weight_members(self) -> list[str]:
        """The members that hold weights: every rank file, or the distributed checkpoint's folder."""
        if self.distributed:
            return [n for n in self.members if n.startswith(DIST_DIR + "/")]
        return list(self.ranks.values())

    def weights_bytes(self) -> int:
        return sum(self.members[n].size for n in self.weight_members())

    def artifact_names(self) -> list[str]:
        """Members that are neither the config nor weights: tokenizer files and the like."""
        weights = {CONFIG_NAME, *self.weight_members()}
        return [n for n in self.members if n not in weights]

    def read_member(self, name: str) -> bytes:
        with self.open_member(name) as f:
            return f.read()

    @contextlib.contextmanager
    def open_member(self, name: str) -> Iterator[BinaryIO]:
        m = self.members[name]
        window = FileWindow(m.extracted, 0, m.size) if m.extracted else FileWindow(self.path, m.offset, m.size)
        try:
            yield window  # type: ignore[misc]
        finally:
            window.close()

    def open_rank(self, tp_rank: int, pp_rank: int = 0) -> LazyStateDict | DistributedWeights:
        name = self.ranks[(tp_rank, pp_rank)]
        if self.distributed:
            layers = int(self.config.get("num_layers") or 0)
            return DistributedWeights(
                self.read_member(name), self.open_member, set(self.members), f"{self.path}:{DIST_DIR}", layers
            )
        m = self.members[name]
        window = FileWindow(m.extracted, 0, m.size) if m.extracted else FileWindow(self.path, m.offset, m.size)
        return LazyStateDict(window, f"{self.path}:{name}")

    def close(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def __enter__(self) -> NemoArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


class _CountingStream:
    """What PyTorchFileWriter writes through: appends to the tar file and counts bytes."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.written = 0
        self.discard = False  # set after a failure: torch's writer still flushes its end on destruction

    def write(self, data: Any) -> int:
        if self.discard:
            return len(memoryview(data))
        n = self._f.write(data)
        self.written += n
        return n

    def flush(self) -> None:
        self._f.flush()


class NemoArchiveWriter:
    """Writes a plain-tar .nemo member by member; streamed members get their header patched afterwards."""

    def __init__(self, path: str | os.PathLike[str], dot_prefix: bool = True) -> None:
        self.path = Path(path)
        self._prefix = "./" if dot_prefix else ""
        self._f: BinaryIO = open(self.path, "xb")  # noqa: SIM115 - closed in close(); x: never clobber
        self._dirs: set[str] = set()
        self._mtime = int(time.time())

    def _info(self, name: str, size: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
        info = tarfile.TarInfo(self._prefix + name)
        info.size, info.type, info.mtime = size, kind, self._mtime
        info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
        return info

    def _ensure_dirs(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self._dirs:
                self._dirs.add(d)
                self._f.write(self._info(d, 0, tarfile.DIRTYPE).tobuf(tarfile.GNU_FORMAT))

    def _pad(self, size: int) -> None:
        if size % tarfile.BLOCKSIZE:
            self._f.write(b"\0" * (tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE))

    def add_bytes(self, name: str, data: bytes) -> None:
        self._ensure_dirs(name)
        self._f.write(self._info(name, len(data)).tobuf(tarfile.GNU_FORMAT))
        self._f.write(data)
        self._pad(len(data))

    def add_stream(self, name: str, src: BinaryIO, size: int) -> None:
        """Copy a member of known size (an artifact) byte for byte."""
        self._ensure_dirs(name)
        self._f.write(self._info(name, size).tobuf(tarfile.GNU_FORMAT))
        copied = 0
        while chunk := src.read(min(1 << 22, size - copied)):
            self._f.write(chunk)
            copied += len(chunk)
        if copied != size:
            raise CheckpointError(f"{self.path}: short copy of {name} ({copied} of {size} bytes)")
        self._pad(size)

    @contextlib.contextmanager
    def member_stream(self, name: str) -> Iterator[_CountingStream]:
        """Yield a stream for a member whose size is known only at the end (a rank's weights)."""
        self._ensure_dirs(name)
        header_at = self._f.tell()
        placeholder = self._info(name, 0).tobuf(tarfile.GNU_FORMAT)
        self._f.write(placeholder)
        stream = _CountingStream(self._f)
        try:
            yield stream
        except BaseException:
            stream.discard = True
            raise
        end = self._f.tell()
        # GNU format stores sizes ≥ 8 GiB in base-256 in the same field, so the header keeps its length.
        header = self._info(name, stream.written).tobuf(tarfile.GNU_FORMAT)
        if len(header) != len(placeholder):
            raise CheckpointError(f"{self.path}: tar header for {name} changed length; cannot patch it")
        self._f.seek(header_at)
        self._f.write(header)
        self._f.seek(end)
        self._pad(stream.written)

    def finish(self) -> None:
        self._f.write(b"\0" * (2 * tarfile.BLOCKSIZE))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
