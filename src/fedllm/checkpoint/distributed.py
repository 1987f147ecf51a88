"""NeMo 2's distributed checkpoints read tensor by tensor, without NeMo or megatron-core.

NeMo 2's `save_to` writes a Megatron-core model's weights as a torch-distributed checkpoint: a
`model_weights/` folder in the .nemo with `.metadata` (torch.distributed.checkpoint's pickled index: every
tensor's global shape, dtype and chunks, and where each chunk's bytes lie), `__R_S.distcp` files holding the
chunks (one torch.save blob each), `common.pt` and `metadata.json`. Layers are stacked: the tensor
`model.decoder.layers.self_attention.linear_qkv.weight` has shape [num_layers, ...], and names follow
transformer-engine's fused layer norms (`linear_qkv.layer_norm_weight`). Transformer-engine's per-layer
`_extra_state` objects are byte items, torch.save blobs of a few hundred bytes each, which the merged view
holds as BytesIO of those bytes (read at once).

What is checked: each tensor item is a torch.save blob, read by fedllm.checkpoint.torch_zip (torch.load
would check none of its CRC-32s) and required to have the shape and dtype the index gives; a byte item
must be empty or a torch.save blob (what megatron-core writes) with intact CRCs; the index's chunks must
tile each tensor exactly. The index itself (a pickle) carries no checksum: a damaged one is refused when
it no longer unpickles or no longer agrees with the items and the config.

`DistributedWeights` shows such a checkpoint as one merged (TP1) per-layer state dict — the keys a
per-rank mcore checkpoint has — so inspecting, verifying, converting and exporting work on it as on any
other .nemo. A tensor is read only when asked for, chunk by chunk, into its own buffer.
"""

from __future__ import annotations

import io
import math
import pickle
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

from fedllm.checkpoint.errors import CheckpointError
from fedllm.checkpoint.torch_zip import FileWindow, LazyTensor, TorchZipReader

DIST_DIR = "model_weights"
METADATA = ".metadata"
STACKED_PREFIX = "model.decoder.layers."
_SHARD_SUFFIX = re.compile(r"^(?P<key>.+)/shard_(?P<numbers>[\d_]+)$")
# Modules whose classes may appear in torch.distributed.checkpoint's metadata pickle.
_TORCH_DCP = ("torch.distributed.checkpoint.",)
# megatron-core's save plan rides along in the pickle; it is not needed to read the weights.
_IGNORABLE = ("megatron.core.",)

# (member name, start, length) → a window onto those bytes of the archive member (fedllm.checkpoint.archive).
OpenRange = Callable[[str, int, int], FileWindow]


class _Ignored:
    """Stands for a class of megatron-core in the metadata pickle: its state is kept, never used."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles torch.distributed.checkpoint's Metadata, refusing anything but its own building blocks."""

    def __init__(self, data: BinaryIO, source: str) -> None:
        super().__init__(data)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(_TORCH_DCP) or (module, name) in {
            ("torch", "Size"),
            ("torch.serialization", "_get_layout"),
            ("collections", "OrderedDict"),
            ("builtins", "set"),
            ("builtins", "frozenset"),
            ("builtins", "getattr"),
            # where the checkpoint was written (StorageMeta.checkpoint_id)
            ("pathlib", "PosixPath"),
            ("pathlib", "PurePosixPath"),
            ("pathlib", "WindowsPath"),
            ("pathlib", "PureWindowsPath"),
        }:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith(_IGNORABLE):
            return type(name, (_Ignored,), {})
        raise CheckpointError(
            f"{self.source}: unexpected object {module}.{name} in the distributed checkpoint's index (.metadata); "
            "only torch.distributed.checkpoint's metadata is read from it"
        )


@dataclass(frozen=True)
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str  # member name inside the archive
    start: int
    length: int


@dataclass(frozen=True)
class DistTensor:
    """One per-layer (or unstacked) tensor of the merged view; its bytes are read on `load()`."""

    source: DistributedWeights
    key: str  # the global tensor's key in the checkpoint
    layer: int | None  # index along the stacked layer dimension, None for unstacked tensors
    shape: tuple[int, ...]
    dtype: torch.dtype

    def numel(self) -> int:
        return math.prod(self.shape)

    def load(self) -> torch.Tensor:
        return self.load_rows(0, self.shape[0]) if self.shape else self.source.read(self, None, None)

    def load_rows(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) along dim 0, reading only the chunks that hold them, into `out` if given."""
        if not 0 <= start <= stop <= self.shape[0]:
            raise ValueError(f"rows {(start, stop)} out of range for shape {self.shape}")
        return self.source.read(self, (start, stop), out)


class DistributedWeights:
    """A distributed checkpoint as one merged per-layer state dict (the LazyStateDict interface)."""

    def __init__(self, metadata: bytes, open_range: OpenRange, members: set[str], source: str, num_layers: int) -> None:
        # Errors about keys, shapes and chunks come from the index: they name it; errors about bytes name the file.
        self.source = source
        self.name = name = f"{source}:{DIST_DIR}/{METADATA}"
        self._open = open_range
        self._members = members
        self._chunks: dict[str, list[_Chunk]] = {}
        self._global: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        byte_items: dict[str, list[tuple[tuple[int, ...], _Chunk]]] = {}
        try:
            md = _MetadataUnpickler(io.BytesIO(metadata), name).load()
            storage = {
                (idx.fqn, tuple(idx.offset) if idx.offset is not None else None): info
                for idx, info in md.storage_data.items()
            }
            for key, item in md.state_dict_metadata.items():
                if hasattr(item, "chunks"):  # TensorStorageMetadata
                    dtype = item.properties.dtype
                    if not isinstance(dtype, torch.dtype):
                        raise TypeError(f"{key} has dtype {dtype!r}")
                    self._global[key] = (tuple(int(d) for d in item.size), dtype)
                    self._chunks[key] = [
                        self._chunk(storage, key, tuple(int(o) for o in c.offsets), tuple(int(d) for d in c.sizes))
                        for c in item.chunks
                    ]
                elif (m := _SHARD_SUFFIX.match(key)) is not None:  # BytesStorageMetadata of a sharded object
                    numbers = tuple(int(n) for n in m.group("numbers").split("_"))
                    byte_items.setdefault(m.group("key"), []).append((numbers, self._chunk(storage, key, None, ())))
        except CheckpointError:
            raise
        except Exception as exc:  # a damaged pickle can fail in any way; it carries no checksum of its own
            raise CheckpointError(
                f"{name}: the distributed checkpoint's index is unreadable ({type(exc).__name__}: {exc}); "
                "the file is corrupted — re-download it or re-save it with NeMo"
            ) from exc
        stacked = [key for key in self._global if key.startswith(STACKED_PREFIX)]
        for key in stacked:
            shape = self._global[key][0]
            if not shape or shape[0] != num_layers:
                raise CheckpointError(
                    f"{name}: {key} has shape {list(shape)}, but model_config.yaml says num_layers={num_layers}; "
                    "the checkpoint and its config disagree"
                )
        extra: dict[tuple[str, int], _Chunk] = {}
        for key, items in byte_items.items():
            for numbers, chunk in sorted(items, key=lambda entry: entry[0]):
                extra.setdefault((key, numbers[0]), chunk)  # offsets lead, the layer first; TP rank 0's copy
        # The model's own order: embeddings, then layer by layer, then the final norm and output layer.
        self.state: OrderedDict[str, Any] = OrderedDict()
        for key, (shape, dtype) in self._global.items():
            if key.startswith("model.embedding."):
                self.state[key] = DistTensor(self, key, None, shape, dtype)
        for i in range(num_layers if stacked else 0):
            for key in stacked:
                shape, dtype = self._global[key]
                self.state[_layer_key(key, i)] = DistTensor(self, key, i, shape[1:], dtype)
                part = key.rsplit(".", 1)[0] + "._extra_state"
                if (part, i) in extra and _layer_key(part, i) not in self.state:
                    self.state[_layer_key(part, i)] = self._read_extra_state(extra[(part, i)], part)
        for key, (shape, dtype) in self._global.items():
            if key not in stacked and key not in self.state:
                self.state[key] = DistTensor(self, key, None, shape, dtype)
        self._check_coverage()

    def _chunk(self, storage: dict, key: str, offsets: tuple[int, ...] | None, sizes: tuple[int, ...]) -> _Chunk:
        info = storage.get((key, offsets))
        if info is None:
            raise CheckpointError(f"{self.name}: the index names no file for {key} at {offsets}; it is damaged")
        file = f"{DIST_DIR}/{info.relative_path}"
        if file not in self._members:
            raise CheckpointError(
                f"{self.name}: {file}, which holds {key}, is not in the archive; the distributed checkpoint is "
                "incomplete — re-save or re-download it"
            )
        return _Chunk(offsets or (), sizes, file, int(info.offset), int(info.length))

    def _check_coverage(self) -> None:
        """Every element of every global tensor is in exactly one chunk (missing shards are an error).

        Chunks inside the tensor, pairwise disjoint and as many elements as it has: they tile it exactly.
        """
        for key, (shape, _) in self._global.items():
            chunks = self._chunks[key]
            covered = sum(math.prod(c.sizes) for c in chunks)
            inside = all(
                len(c.offsets) == len(c.sizes) == len(shape)
                and all(o >= 0 and n >= 0 and o + n <= d for o, n, d in zip(c.offsets, c.sizes, shape, strict=True))
                for c in chunks
            )
            disjoint = inside and not any(_overlap(a, b) for i, a in enumerate(chunks) for b in chunks[i + 1 :])
            if covered != math.prod(shape) or not disjoint:
                raise CheckpointError(
                    f"{self.name}: the chunks of {key} {list(shape)} do not tile it ({covered} of {math.prod(shape)} "
                    f"elements{'' if disjoint else ', overlapping or out of bounds'}); a shard of the distributed "
                    "checkpoint is missing or its index is damaged"
                )

    # -- the LazyStateDict interface -------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.state)

    def tensors(self) -> Iterator[tuple[str, DistTensor]]:
        for key, value in self.state.items():
            if isinstance(value, DistTensor):
                yield key, value

    def close(self) -> None:
        pass

    def __enter__(self) -> DistributedWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_crcs(self) -> None:
        """Read every chunk's blob whole, every record's CRC-32 checked (byte items were checked when read)."""
        for key, chunks in self._chunks.items():
            for chunk in chunks:
                self._load_chunk(key, chunk, every_record=True)

    def finish_checks(self) -> None:
        """Nothing is left half-read: every chunk is read whole and CRC-checked when it is used."""

    # -- reading ---------------------------------------------------------------------------------------------
    def _read_extra_state(self, chunk: _Chunk, key: str) -> io.BytesIO:
        """A transformer-engine extra state, as the BytesIO a per-rank file holds: the byte item megatron-core
        wrote (a torch.save blob), its structure and every record's CRC-32 checked, its pickle left unread."""
        where = f"{self.source}:{chunk.file} ({key} at byte {chunk.start})"
        with self._open(chunk.file, chunk.start, chunk.length) as window:
            blob = window.read()
        if len(blob) != chunk.length:
            raise CheckpointError(f"{where}: shorter than the index says; the file is truncated")
        if blob:
            with TorchZipReader(_InMemory(blob), where, unpickle=False) as reader:
                reader.check_crcs()
        return io.BytesIO(blob)

    def _load_chunk(self, key: str, chunk: _Chunk, every_record: bool = False) -> torch.Tensor:
        """One chunk's tensor, read through fedllm's CRC-checking reader (torch.load checks no CRC); with
        every_record also the blob's other records (what `verify` adds)."""
        where = f"{self.source}:{chunk.file} ({key} at byte {chunk.start})"
        with TorchZipReader(self._open(chunk.file, chunk.start, chunk.length), where) as blob:
            item = blob.obj
            if not isinstance(item, LazyTensor):
                raise CheckpointError(f"{where}: holds a {type(item).__name__}, not a tensor; the file is corrupted")
            dtype = self._global[key][1]
            if tuple(item.shape) != chunk.sizes or item.dtype != dtype:
                raise CheckpointError(
                    f"{where}: holds a {item.dtype} tensor of shape {list(item.shape)} where the index "
                    f"({METADATA}) says {dtype} {list(chunk.sizes)}; the file or its index is corrupted"
                )
            if every_record:
                blob.check_crcs()
            return item.load()

    def read(self, t: DistTensor, rows: tuple[int, int] | None, out: torch.Tensor | None) -> torch.Tensor:
        """The rows of one view tensor: the intersection of each chunk with the asked box, copied into `out`."""
        shape = self._global[t.key][0]
        lead = () if t.layer is None else (t.layer,)
        lo = [*lead, rows[0] if rows else 0, *([0] * (len(t.shape) - 1))][: len(shape)]
        hi = [*(i + 1 for i in lead), rows[1] if rows else (t.shape[0] if t.shape else 0), *t.shape[1:]][: len(shape)]
        box_shape = [h - low for low, h in zip(lo, hi, strict=True)][len(lead) :]
        if out is None:
            out = torch.empty(box_shape, dtype=t.dtype)
        view = out.view(*([1] * len(lead)), *box_shape) if lead else out
        for chunk in self._chunks[t.key]:
            c_lo, c_hi = chunk.offsets, [o + s for o, s in zip(chunk.offsets, chunk.sizes, strict=True)]
            i_lo = [max(a, b) for a, b in zip(lo, c_lo, strict=True)]
            i_hi = [min(a, b) for a, b in zip(hi, c_hi, strict=True)]
            if any(a >= b for a, b in zip(i_lo, i_hi, strict=True)):
                continue
            data = self._load_chunk(t.key, chunk)
            src = tuple(slice(a - o, b - o) for a, b, o in zip(i_lo, i_hi, c_lo, strict=True))
            dst = tuple(slice(a - low, b - low) for a, b, low in zip(i_lo, i_hi, lo, strict=True))
            view[dst] = data[src]
        return out


class _InMemory(io.BytesIO):
    """Bytes already read, with the `size` TorchZipReader asks of its source."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.size = len(data)


def _overlap(a: _Chunk, b: _Chunk) -> bool:
    return all(x < y + m and y < x + n for x, n, y, m in zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True))


def _layer_key(key: str, layer: int) -> str:
    return f"{STACKED_PREFIX}{layer}.{key[len(STACKED_PREFIX) :]}"
