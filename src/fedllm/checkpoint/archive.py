"""Reading and writing `.nemo` archives (tar, plain or gzip) without unpacking the weights into memory.

Layout (NeMo's save_to): model_config.yaml; model_weights.ckpt (TP=PP=1), mp_rank_XX/model_weights.ckpt
(TP>1, PP=1) or tp_rank_XX_pp_rank_YYY/model_weights.ckpt (PP>1), or — NeMo 2 with Megatron-core models —
a `model_weights/` torch-distributed checkpoint (read as one merged shard, fedllm.checkpoint.distributed);
tokenizer and other artifacts, which fedllm carries over byte for byte. Member names may start with "./".
Plain tars are read in place (each weight file is a window of the tar); gzip tars are streamed once into a
scratch directory next to the output.

What is checked as it is read (docs/checkpoints.md, "What fedllm checks"): every tar header's checksum, and
that the archive ends with tar's end block (tarfile alone stops listing silently at a damaged header, which
would drop the members after it); a gzip stream's CRC-32 and length; each torch zip record's CRC-32
(fedllm.checkpoint.torch_zip). NeMo writes no checksum over model_config.yaml and tokenizer files, so
fedllm writes one into the archives it writes — `fedllm_checksums.json`, the size and CRC-32 of every
member that is not a torch zip — and every reader refuses a listed member whose bytes disagree.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tarfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from fedllm.checkpoint.config_fields import CONFIG_NAME, positive_int
from fedllm.checkpoint.distributed import DIST_DIR, METADATA, DistributedWeights, DistTensor
from fedllm.checkpoint.errors import CheckpointError, DistributedCheckpointError
from fedllm.checkpoint.torch_zip import FileWindow, LazyStateDict, LazyTensor

WEIGHTS_NAME = "model_weights.ckpt"
# fedllm's own checksums in the archives it writes: {"format": ..., "members": {name: {"size", "crc32"}}}.
CHECKSUMS_NAME = "fedllm_checksums.json"
CHECKSUMS_FORMAT = "fedllm-checksums/1"
# What `open_rank(...).state` holds for a tensor: read on demand, per-rank file or distributed checkpoint.
LAZY_TENSORS = (LazyTensor, DistTensor)
_MP_RANK = re.compile(r"^mp_rank_(\d+)/" + re.escape(WEIGHTS_NAME) + "$")
_TP_PP_RANK = re.compile(r"^tp_rank_(\d+)_pp_rank_(\d+)/" + re.escape(WEIGHTS_NAME) + "$")
_REFETCH = "re-download the file (make download-20b resumes and checks the sha256) or re-create it"


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


def rank_of(name: str) -> tuple[int, int] | None:
    """(tp_rank, pp_rank) of a per-rank weights member's name; None for any other member."""
    if name == WEIGHTS_NAME:
        return (0, 0)
    if m := _MP_RANK.match(name):
        return (int(m.group(1)), 0)
    if m := _TP_PP_RANK.match(name):
        return (int(m.group(1)), int(m.group(2)))
    return None


# -- tar reading that notices damage ------------------------------------------------------------------------
class _DamagedHeader(tarfile.ReadError):
    """A header after the first is unreadable: tarfile would take it for the end of the archive."""

    def __init__(self, offset: int, cause: tarfile.HeaderError) -> None:
        super().__init__(str(cause))
        self.offset = offset
        self.truncated = isinstance(cause, tarfile.EmptyHeaderError | tarfile.TruncatedHeaderError)


class _StrictTarInfo(tarfile.TarInfo):
    """TarInfo that turns a bad header (checksum, truncation) past the first into an error.

    tarfile ends the listing quietly there; the members after it would be dropped without a word. The
    first header keeps tarfile's own handling (so that `r:*` can still try gzip on a compressed file).
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        offset = tarfile_.offset
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:
            raise  # a zero block: the archive's proper end
        except tarfile.HeaderError as exc:
            if offset == 0:
                raise
            raise _DamagedHeader(offset, exc) from exc


def _open_tar(path: Path, mode: str) -> tarfile.TarFile:
    return tarfile.open(path, mode, tarinfo=_StrictTarInfo)  # type: ignore[call-overload]


def _listing(tar: tarfile.TarFile, path: Path) -> Iterator[tarfile.TarInfo]:
    """The archive's members; damage that tarfile would take for the end of the archive raises, naming where."""
    last: str | None = None
    try:
        for info in tar:
            yield info
            last = _normalize(info.name)
    except _DamagedHeader as exc:
        where = f"after member {last}" if last else "after the first member"
        if exc.truncated:
            raise CheckpointError(
                f"{path}: the archive ends at byte {exc.offset} ({where}) without tar's end-of-archive block: "
                f"the file is truncated; {_REFETCH}"
            ) from exc
        raise CheckpointError(
            f"{path}: the tar header at byte {exc.offset} ({where}) is damaged ({exc}); the members from there on "
            f"cannot be read; {_REFETCH}"
        ) from exc
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        where = f" after member {last}" if last else ""
        raise CheckpointError(
            f"{path}: not a readable .nemo archive{where} ({type(exc).__name__}: {exc}); the file is truncated or "
            f"corrupted; {_REFETCH}"
        ) from exc


def _finish_gzip(tar: tarfile.TarFile, path: Path) -> None:
    """Read the gzip stream to its end, where gzip checks the CRC-32 and length of everything decompressed."""
    try:
        while tar.fileobj.read(1 << 22):  # type: ignore[union-attr]
            pass
    except (EOFError, OSError, zlib.error) as exc:
        raise CheckpointError(
            f"{path}: the gzip stream is corrupted ({type(exc).__name__}: {exc}) — its CRC-32 or length does not "
            f"match what it decompressed to, so any member may be damaged; {_REFETCH}"
        ) from exc


# -- fedllm's own checksums ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Sum:
    size: int
    crc32: int


def _parse_checksums(data: bytes, source: str) -> dict[str, _Sum]:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(
            f"{source}: {CHECKSUMS_NAME} (the checksums fedllm wrote into this archive) is corrupted: {why}; {_REFETCH}"
        )

    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise bad(f"not JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != CHECKSUMS_FORMAT or not isinstance(doc.get("members"), dict):
        raise bad(f'expected {{"format": "{CHECKSUMS_FORMAT}", "members": {{...}}}}')
    sums: dict[str, _Sum] = {}
    for name, entry in doc["members"].items():
        size, crc = (entry.get("size"), entry.get("crc32")) if isinstance(entry, dict) else (None, None)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise bad(f"{name}: size {size!r}")
        if not (isinstance(crc, str) and len(crc) == 8 and all(c in "0123456789abcdef" for c in crc)):
            raise bad(f"{name}: crc32 {crc!r}")
        sums[name] = _Sum(size, int(crc, 16))
    return sums


def checksums_document(sums: dict[str, tuple[int, int]]) -> bytes:
    """The fedllm_checksums.json of members name → (size, CRC-32)."""
    members = {name: {"size": size, "crc32": f"{crc:08x}"} for name, (size, crc) in sums.items()}
    return (json.dumps({"format": CHECKSUMS_FORMAT, "members": members}, indent=1) + "\n").encode()


def _mismatch(source: str, name: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{source}: member {name} is corrupted: {what} disagrees with {CHECKSUMS_NAME}, which fedllm wrote with the "
        f"archive; {_REFETCH} (or, if you edited {name} on purpose, delete {CHECKSUMS_NAME} from the archive)"
    )


def check_member_sum(folder: Path, name: str, data: bytes) -> None:
    """An extracted member's bytes against the folder's fedllm_checksums.json (when it lists the member)."""
    sums_file = folder / CHECKSUMS_NAME
    if sums_file.is_file():
        _check_sum(str(folder), name, data, _parse_checksums(sums_file.read_bytes(), str(folder)))


def _check_sum(source: str, name: str, data: bytes, sums: dict[str, _Sum] | None) -> None:
    expected = (sums or {}).get(name)
    if expected is None:
        return
    if len(data) != expected.size:
        raise _mismatch(source, name, f"its size {len(data)} (expected {expected.size})")
    crc = zlib.crc32(data)
    if crc != expected.crc32:
        raise _mismatch(source, name, f"its CRC-32 {crc:08x} (expected {expected.crc32:08x})")


class _CheckedMember(io.RawIOBase):
    """A member read front to back whose CRC-32 must match fedllm_checksums.json once the end is reached."""

    def __init__(self, window: FileWindow, expected: _Sum, source: str, name: str) -> None:
        self._window, self._expected, self._source, self._name = window, expected, source, name
        self._crc = self._pos = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = self._window.readinto(view)
        self._crc = zlib.crc32(view[:n], self._crc)
        self._pos += n
        if not self._done and (self._pos >= self._window.size or (n == 0 and len(view))):
            self._done = True
            if self._window.size != self._expected.size:
                raise _mismatch(
                    self._source, self._name, f"its size {self._window.size} (expected {self._expected.size})"
                )
            if self._crc != self._expected.crc32:
                raise _mismatch(
                    self._source, self._name, f"its CRC-32 {self._crc:08x} (expected {self._expected.crc32:08x})"
                )
        return n

    def close(self) -> None:
        self._window.close()
        super().close()


# -- the config, read cheaply ---------------------------------------------------------------------------------
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
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise CheckpointError(
            f"{source}: {CONFIG_NAME} is not valid YAML ({exc}). Fix: re-save the checkpoint"
        ) from exc
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{source}: {CONFIG_NAME} is not a mapping. Fix: re-save the checkpoint with NeMo")
    return cfg


def read_header(path: str | os.PathLike[str]) -> CheckpointHeader:
    """model_config.yaml and the weights' layout of a .nemo archive (plain or gzip) or an extracted folder.

    Only tar headers are read (a plain tar is skipped through, a gzip one decompressed up to what is
    needed), so this is cheap even for a 38 GB checkpoint: sites check it before NeMo loads anything. The
    config is checked against fedllm_checksums.json when fedllm wrote the archive (it comes before the weights).
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
        data = config_file.read_bytes()
        if (path / CHECKSUMS_NAME).is_file():
            _check_sum(str(path), CONFIG_NAME, data, _parse_checksums((path / CHECKSUMS_NAME).read_bytes(), str(path)))
        return CheckpointHeader(path, _parse_config(data, path), (path / DIST_DIR).is_dir())
    raw: bytes | None = None
    sums: dict[str, _Sum] | None = None
    distributed = per_rank = False
    try:
        with _open_tar(path, "r:*") as tar:
            for info in _listing(tar, path):
                name = _normalize(info.name)
                distributed = distributed or name == DIST_DIR or name.startswith(DIST_DIR + "/")
                per_rank = per_rank or name.endswith(WEIGHTS_NAME)
                if name in (CONFIG_NAME, CHECKSUMS_NAME) and info.isfile():
                    handle = tar.extractfile(info)
                    data = handle.read() if handle else b""
                    if name == CONFIG_NAME:
                        raw = data
                    else:
                        sums = _parse_checksums(data, str(path))
                if raw is not None and (distributed or per_rank):
                    break  # the weights' layout is known: the rest of the archive is weights
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise CheckpointError(
            f"{path} is not a readable .nemo archive ({type(exc).__name__}: {exc}). Fix: re-download or re-save it"
        ) from exc
    if raw is None:
        raise CheckpointError(
            f"{path} has no {CONFIG_NAME}, so it is not a NeMo checkpoint. Fix: pass a .nemo saved by NeMo "
            "(model.save_to) or written by `fedllm ckpt convert`"
        )
    _check_sum(str(path), CONFIG_NAME, raw, sums)
    return CheckpointHeader(path, _parse_config(raw, path), distributed)


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
        self.members: dict[str, _Member] = {}
        self.dot_prefix = False
        self.checksums: dict[str, _Sum] | None = None
        try:
            self.compressed = _is_gzip(self.path)
            try:
                if self.compressed:
                    self._scan_gzip(scratch_dir)
                else:
                    self._scan_plain()
            except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
                raise CheckpointError(
                    f"{self.path}: not a readable .nemo archive ({type(exc).__name__}: {exc}); the file is truncated "
                    f"or corrupted — {_REFETCH}"
                ) from exc
            self._check_layout()
            if CHECKSUMS_NAME in self.members:
                self.checksums = _parse_checksums(self._read_unchecked(CHECKSUMS_NAME), str(self.path))
            self.config: dict[str, Any] = self._read_config()
            self.ranks = self._find_ranks()
            self._check_listed()
        except BaseException:
            self.close()  # a gzip archive's scratch copy goes with the error
            raise

    # -- scanning ---------------------------------------------------------------------------------------------
    def _scan_plain(self) -> None:
        try:
            tar = _open_tar(self.path, "r:")
        except tarfile.ReadError as exc:
            raise CheckpointError(
                f"{self.path}: not a readable .nemo archive: its first tar header (byte 0) is unreadable ({exc}); "
                f"the file is not a .nemo, or it is corrupted — {_REFETCH}"
            ) from exc
        with tar:
            for info in _listing(tar, self.path):
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
        with _open_tar(self.path, "r:gz") as tar:
            for i, info in enumerate(_listing(tar, self.path)):
                if info.name.startswith("./"):
                    self.dot_prefix = True
                name = _normalize(info.name)
                if not (info.isfile() and name):
                    continue
                target = self._scratch / f"{i:06d}"
                try:
                    src = tar.extractfile(info)
                    assert src is not None
                    with src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 22)
                except (tarfile.TarError, EOFError, zlib.error) as exc:
                    raise CheckpointError(
                        f"{self.path}: member {name} cannot be decompressed ({type(exc).__name__}: {exc}); the gzip "
                        f"archive is truncated or corrupted — {_REFETCH}"
                    ) from exc
                self.members[name] = _Member(name, info.size, 0, target)
            _finish_gzip(tar, self.path)
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

    def _check_listed(self) -> None:
        """With fedllm's checksums: every listed member is there at its size, and no other non-weight member is."""
        if self.checksums is None:
            return
        weights = set(self.weight_members())
        for name, expected in self.checksums.items():
            member = self.members.get(name)
            if member is None:
                raise _mismatch(str(self.path), name, "its absence from the archive")
            if member.size != expected.size:
                raise _mismatch(str(self.path), name, f"its size {member.size} (expected {expected.size})")
        unlisted = sorted(set(self.members) - set(self.checksums) - weights - {CHECKSUMS_NAME})
        if unlisted:
            raise _mismatch(str(self.path), unlisted[0], "its presence (it is not listed)")

    def _read_config(self) -> dict[str, Any]:
        return _parse_config(self.read_member(CONFIG_NAME), self.path)

    def _find_ranks(self) -> dict[tuple[int, int], str]:
        """(tp_rank, pp_rank) → member name, checked against the config's TP and PP sizes.

        A distributed checkpoint is one merged shard whatever TP it was saved at (fedllm.checkpoint.distributed).
        """
        tp, pp = self.tp, self.pp
        if self.distributed:
            return {(0, 0): f"{DIST_DIR}/{METADATA}"}
        ranks: dict[tuple[int, int], str] = {}
        for name in self.members:
            if (rank := rank_of(name)) is not None:
                ranks[rank] = name
        if not ranks:
            raise CheckpointError(
                f"{self.path}: no {WEIGHTS_NAME} in the archive; the file is truncated or not a model"
            )
        # distinct ranks, all in range, as many as TP × PP: exactly the expected set (no TP × PP set is built)
        if len(ranks) != tp * pp or any(t >= tp or p >= pp for t, p in ranks):
            missing = [
                rank_member_name(t, tp, p, pp)
                for t in range(min(tp, len(ranks) + 8))
                for p in range(min(pp, len(ranks) + 8))
                if (t, p) not in ranks
            ][:8]
            have_tp = len({t for t, _ in ranks})
            raise CheckpointError(
                f"{self.path}: {CONFIG_NAME} says tensor_model_parallel_size={tp}, pipeline_model_parallel_size={pp} "
                f"but the archive holds shards {sorted(ranks.values())}"
                + (f" (missing {missing})" if missing else "")
                + f"; fix tensor_model_parallel_size (the shards suggest {have_tp}) or re-download the file"
            )
        return ranks

    # -- access -----------------------------------------------------------------------------------------------
    @property
    def tp(self) -> int:
        return positive_int(self.config, "tensor_model_parallel_size", str(self.path), 1)

    @property
    def pp(self) -> int:
        return positive_int(self.config, "pipeline_model_parallel_size", str(self.path), 1)

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
        """Members that are neither the config nor weights nor fedllm's checksums: tokenizer files and the like."""
        skip = {CONFIG_NAME, CHECKSUMS_NAME, *self.weight_members()}
        return [n for n in self.members if n not in skip]

    def _window(self, name: str, start: int = 0, length: int | None = None) -> FileWindow:
        m = self.members[name]
        length = m.size - start if length is None else length
        if start < 0 or length < 0 or start + length > m.size:
            raise CheckpointError(
                f"{self.path}: bytes [{start}, {start + length}) of {name} were asked for, but it has {m.size} bytes; "
                f"an index in the archive points past its end — {_REFETCH}"
            )
        if m.extracted:
            return FileWindow(m.extracted, start, length)
        return FileWindow(self.path, m.offset + start, length)

    def _read_unchecked(self, name: str) -> bytes:
        with self._window(name) as window:
            return window.read()

    def read_member(self, name: str) -> bytes:
        with self.open_member(name) as f:
            return f.read()

    @contextlib.contextmanager
    def open_member(self, name: str) -> Iterator[BinaryIO]:
        """A member, read front to back; one fedllm_checksums.json lists must match it by the end."""
        window = self._window(name)
        expected = (self.checksums or {}).get(name)
        reader: Any = window if expected is None else _CheckedMember(window, expected, str(self.path), name)
        try:
            yield reader
        finally:
            reader.close()

    def open_range(self, name: str, start: int, length: int) -> FileWindow:
        """Bytes [start, start+length) of a member (an item of a distributed checkpoint's file); the caller closes it."""
        return self._window(name, start, length)

    def check_members(self) -> None:
        """Read every member fedllm_checksums.json lists, so that a mismatch raises (what `verify` adds)."""
        for name in self.checksums or {}:
            self.read_member(name)

    def open_rank(self, tp_rank: int, pp_rank: int = 0) -> LazyStateDict | DistributedWeights:
        name = self.ranks[(tp_rank, pp_rank)]
        if self.distributed:
            layers = positive_int(self.config, "num_layers", str(self.path))
            return DistributedWeights(
                self.read_member(name), self.open_range, set(self.members), str(self.path), layers
            )
        return LazyStateDict(self._window(name), f"{self.path}:{name}")

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
    """Writes a plain-tar .nemo member by member; streamed members get their header patched afterwards.

    Members written whole (`add_bytes`, `add_stream`: config, tokenizer files) are summed as they go;
    `add_checksums` writes those sums as fedllm_checksums.json, before the weights, which carry their own.
    """

    def __init__(self, path: str | os.PathLike[str], dot_prefix: bool = True) -> None:
        self.path = Path(path)
        self._prefix = "./" if dot_prefix else ""
        self._f: BinaryIO = open(self.path, "xb")  # noqa: SIM115 - closed in close(); x: never clobber
        self._dirs: set[str] = set()
        self._mtime = int(time.time())
        self._sums: dict[str, tuple[int, int]] = {}

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
        self._sums[name] = (len(data), zlib.crc32(data))

    def add_stream(self, name: str, src: BinaryIO, size: int) -> None:
        """Copy a member of known size (an artifact) byte for byte."""
        self._ensure_dirs(name)
        self._f.write(self._info(name, size).tobuf(tarfile.GNU_FORMAT))
        copied = crc = 0
        while chunk := src.read(min(1 << 22, size - copied)):
            self._f.write(chunk)
            crc = zlib.crc32(chunk, crc)
            copied += len(chunk)
        if copied != size:
            raise CheckpointError(f"{self.path}: short copy of {name} ({copied} of {size} bytes)")
        self._pad(size)
        self._sums[name] = (size, crc)

    def add_checksums(self) -> None:
        """fedllm_checksums.json: size and CRC-32 of every member written so far with add_bytes/add_stream."""
        self.add_bytes(CHECKSUMS_NAME, checksums_document(dict(self._sums)))
        del self._sums[CHECKSUMS_NAME]

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
