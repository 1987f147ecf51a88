"""Weights on the wire as views of their own memory: a FOBS tensor downloader without serialization.

NVFlare's TensorDecomposer sends torch tensors through its download service, but first turns
every tensor into a safetensors blob (`TensorDownloadable.produce_item`) and parses the blob
again on arrival: two extra passes over every byte, the sender's largest CPU cost in our
profile (docs/exchange.md), and a whole tensor per item, however large.

This module plugs into the same machinery (FOBS decomposer → DownloadService transaction →
Consumer) with another item format: the sender hands out memoryviews of each tensor's own
storage, in slices of at most the job's download chunk size; the receiver copies each slice
into the tensor it allocated for it, or writes it into a one-tensor safetensors file when the
job offloads incoming tensors to disk (NVFlare's lazy references then load them for the
aggregation, as they do for NVFlare's own downloader). Transactions, retries, timeouts and
chunk-size settings (`tensor_download_chunk_size`, …) stay NVFlare's.

A job opts in with the `WireViews` output filter on each sending side (fedllm.jobs.create adds
it): it wraps outgoing tensors as `WireTensor`, which only this decomposer serializes. The
receiver gets plain torch tensors back. Every process that sends or receives such weights calls
`register()`: the filter does when the job starts, the job's entry script does for trainers that
download the server's weights themselves (external-process trainers).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import threading
import warnings
from typing import Any

import torch
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.app_common.utils.tensor_disk_offload_context import _TENSOR_DISK_OFFLOAD_ROOT_DIR
from nvflare.app_opt.pt.lazy_tensor_dict import LazyTensorDict, _cleanup_temp_dir
from nvflare.fuel.f3.streaming.cacheable import ItemConsumer
from nvflare.fuel.f3.streaming.download_service import Downloadable, ProduceRC, download_object
from nvflare.fuel.utils import fobs
from nvflare.fuel.utils.fobs.decomposers.via_downloader import ViaDownloaderDecomposer
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

# Datum Object Type of our download references: one byte on the wire (FOBS datum header); NVFlare
# registers 1–6 (fobs/dots.py) and checks for duplicates at registration.
WIRE_TENSOR_DOWNLOAD = 70
DEFAULT_CHUNK_BYTES = 64 * 2**20
# torch dtype ↔ safetensors dtype code, for the files written under disk offload.
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES_BY_NAME = {str(dtype).removeprefix("torch."): dtype for dtype in SAFETENSORS_DTYPES}


class WireTensor:
    """A tensor marked to cross the wire as raw slices of its storage (see module docstring)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def _flat_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes as a flat memoryview, without a copy when it is already contiguous on CPU."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.dtype not in SAFETENSORS_DTYPES:
        raise TypeError(
            f"tensor dtype {t.dtype} cannot cross as raw slices (supported: {', '.join(sorted(DTYPES_BY_NAME))}); "
            "set `exchange: {tensor_items: safetensors}` in the job template to use NVFlare's tensor items"
        )
    return memoryview(t.view(torch.uint8).numpy())


class TensorViewDownloadable(Downloadable):
    """Produces ≤ max_chunk_size bytes of slices per request, straight from the tensors' storage.

    Stateless between requests (the position travels in the download state), so every receiver
    of a broadcast and every retried request is served from the same views, with nothing cached.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], max_chunk_size: int):
        super().__init__(tensors)
        self.max_chunk_size = max(1, int(max_chunk_size))
        self.ids = list(tensors)
        self.meta = [(str(t.dtype).removeprefix("torch."), list(t.shape)) for t in tensors.values()]
        self.views = [_flat_bytes(t) for t in tensors.values()]

    def produce(self, state: dict, requester: str):
        views = self.views
        if views is None:
            raise RuntimeError("tensors requested after the download transaction released them")
        index, offset = (state or {}).get("pos", (0, 0))
        if index >= len(views):
            return ProduceRC.EOF, None, {}
        items, budget = [], self.max_chunk_size
        while index < len(views) and budget > 0:
            view = views[index]
            take = min(len(view) - offset, budget)
            dtype, shape = self.meta[index]
            items.append([self.ids[index], dtype, shape, offset, len(view), view[offset : offset + take]])
            budget -= take
            offset += take
            if offset == len(view):
                index, offset = index + 1, 0
        return ProduceRC.OK, items, {"pos": [index, offset]}

    def release(self) -> None:
        self.views = None
        self.base_obj = None


def _as_uint8(data: Any) -> torch.Tensor:
    with warnings.catch_warnings():
        # The received buffer is read-only (bytes); it is only ever read from here.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)


class _Assembly:
    """Checks that one tensor's slices arrive in order and add up to its size."""

    def __init__(self, item_id: str, total: int):
        self.item_id, self.total, self.filled = item_id, total, 0

    def advance(self, offset: int, size: int) -> None:
        if offset != self.filled or offset + size > self.total:
            raise ValueError(
                f"tensor {self.item_id}: slice [{offset}, {offset + size}) out of order "
                f"(have {self.filled} of {self.total} bytes)"
            )
        self.filled += size


class _SliceConsumer(ItemConsumer):
    """Rebuilds tensors from their slices, in order; subclasses decide where the bytes go.

    A slice is [item id, dtype name, shape, offset, total bytes, data] (TensorViewDownloadable.produce).
    """

    def __init__(self):
        super().__init__()
        self.result = {}
        self._assembly: dict[str, _Assembly] = {}

    def _start(self, item_id: str, dtype: torch.dtype, shape: list[int], total: int) -> Any:
        """Make room for a new tensor; returns its entry in the result."""
        raise NotImplementedError

    def _write(self, item_id: str, offset: int, data: Any, done: bool) -> None:
        """Put one slice's bytes in place; `done` when it was the tensor's last."""
        raise NotImplementedError

    def consume_items(self, items: list, result: Any) -> Any:
        for item_id, dtype_name, shape, offset, total, data in items:
            if item_id not in self._assembly:
                self.result[item_id] = self._start(item_id, DTYPES_BY_NAME[dtype_name], shape, total)
                self._assembly[item_id] = _Assembly(item_id, total)
            assembly = self._assembly[item_id]
            assembly.advance(offset, len(data))
            self._write(item_id, offset, data, assembly.filled == assembly.total)
        return self.result

    def download_completed(self, ref_id: str) -> None:
        incomplete = [a.item_id for a in self._assembly.values() if a.filled != a.total]
        if incomplete:
            self.download_failed(ref_id, f"tensors {incomplete} arrived incomplete")


class TensorViewConsumer(_SliceConsumer):
    """Receives slices into preallocated tensors; the result maps item ids to tensors."""

    def _start(self, item_id, dtype, shape, total):
        tensor = torch.empty(shape, dtype=dtype)
        if tensor.numel() * tensor.element_size() != total:
            raise ValueError(f"tensor {item_id}: {total} bytes announced for {dtype}{tensor.shape}")
        return tensor

    def _write(self, item_id, offset, data, done):
        flat = self.result[item_id].reshape(-1).view(torch.uint8)
        flat[offset : offset + len(data)].copy_(_as_uint8(data))


def safetensors_header(dtype: torch.dtype, shape: list[int], nbytes: int, key: str = "t") -> bytes:
    """The header of a one-tensor safetensors file (8-byte length + JSON, padded to 8 bytes)."""
    meta = {key: {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [0, nbytes]}}
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class TensorViewDiskConsumer(_SliceConsumer):
    """Writes slices into one safetensors file per tensor (NVFlare's disk offload, for our item format)."""

    KEY = "t"

    def __init__(self, temp_dir: str):
        super().__init__()
        self.temp_dir = temp_dir
        self._files: dict[str, Any] = {}
        self._lock = threading.Lock()  # a failed download closes the files from another thread

    def _start(self, item_id, dtype, shape, total):
        path = os.path.join(self.temp_dir, f"{len(self._assembly)}.safetensors")
        handle = open(path, "wb")  # noqa: SIM115 - closed when the tensor's last slice lands
        handle.write(safetensors_header(dtype, shape, total, self.KEY))
        self._files[item_id] = handle
        return (path, self.KEY)

    def _write(self, item_id, offset, data, done):
        self._files[item_id].write(data)
        if done:
            self._files.pop(item_id).close()

    def consume_items(self, items: list, result: Any) -> Any:
        with self._lock:
            return super().consume_items(items, result)

    def close_all(self) -> None:
        with self._lock:
            for handle in self._files.values():
                handle.close()
            self._files.clear()

    def download_completed(self, ref_id: str) -> None:
        super().download_completed(ref_id)
        self.close_all()

    def download_failed(self, ref_id, reason: str) -> None:
        super().download_failed(ref_id, reason)
        self.close_all()


def download_tensor_views(from_fqcn: str, ref_id: str, cell, use_disk: bool, root_dir: str | None, **kwargs):
    """Download one batch of tensors; (error or None, {item id: tensor} or NVFlare's LazyTensorDict)."""
    if not use_disk:
        consumer = TensorViewConsumer()
        download_object(from_fqcn=from_fqcn, ref_id=ref_id, consumer=consumer, cell=cell, **kwargs)
        return consumer.error, (None if consumer.error else consumer.result)
    if not root_dir:
        raise RuntimeError("tensor disk offload is on, but the job set no offload directory")
    temp_dir = tempfile.mkdtemp(prefix="fedllm_tensors_", dir=root_dir)
    consumer = TensorViewDiskConsumer(temp_dir)
    try:
        download_object(from_fqcn=from_fqcn, ref_id=ref_id, consumer=consumer, cell=cell, **kwargs)
    except BaseException:
        consumer.close_all()
        _cleanup_temp_dir(temp_dir)
        raise
    if consumer.error:
        _cleanup_temp_dir(temp_dir)
        return consumer.error, None
    return None, LazyTensorDict(key_to_file=consumer.result, temp_dir=temp_dir)


class WireTensorDecomposer(ViaDownloaderDecomposer):
    """FOBS decomposer for WireTensor: download references over NVFlare's DownloadService.

    Shares NVFlare's `tensor_` config variables (tensor_download_chunk_size, …), so a job's
    exchange settings apply to it unchanged.
    """

    def __init__(self):
        super().__init__(DEFAULT_CHUNK_BYTES, "tensor_")

    def supported_type(self):
        return WireTensor

    def get_download_dot(self) -> int:
        return WIRE_TENSOR_DOWNLOAD

    def to_downloadable(self, items: dict, max_chunk_size: int, fobs_ctx: dict):
        return TensorViewDownloadable({k: w.tensor for k, w in items.items()}, max_chunk_size)

    def _get_download_kwargs(self, fobs_ctx: dict) -> dict:
        return {"fobs_ctx": fobs_ctx}

    def download(
        self,
        from_fqcn: str,
        ref_id: str,
        per_request_timeout: float,
        cell,
        secure=False,
        optional=False,
        abort_signal=None,
        progress_cb=None,
        fobs_ctx: dict | None = None,
    ):
        cell_ctx = cell.get_fobs_context()
        fobs_ctx = fobs_ctx or {}
        return download_tensor_views(
            from_fqcn,
            ref_id,
            cell,
            use_disk=fobs_ctx.get(
                fobs.FOBSContextKey.TENSOR_DISK_OFFLOAD, cell_ctx.get(fobs.FOBSContextKey.TENSOR_DISK_OFFLOAD)
            ),
            root_dir=fobs_ctx.get(_TENSOR_DISK_OFFLOAD_ROOT_DIR, cell_ctx.get(_TENSOR_DISK_OFFLOAD_ROOT_DIR)),
            per_request_timeout=per_request_timeout,
            secure=secure,
            optional=optional,
            abort_signal=abort_signal,
            progress_cb=progress_cb,
        )

    def native_decompose(self, target: WireTensor, manager=None) -> bytes:
        # No cell (e.g. a message saved to a file): one safetensors blob, as NVFlare does.
        return save_safetensors({"t": target.tensor.detach().cpu().contiguous()})

    def native_recompose(self, data: bytes, manager=None) -> torch.Tensor:
        return load_safetensors(data)["t"]


def register() -> None:
    """Make this process able to send and receive WireTensors (idempotent)."""
    fobs.register(WireTensorDecomposer)


class WireViews(DXOFilter):
    """Output filter: the weights leave as WireTensors (raw slices), not safetensors blobs.

    Last in a sending side's filter chain; the receiving side gets torch tensors back.
    """

    def __init__(self):
        kinds = [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF]
        super().__init__(supported_data_kinds=kinds, data_kinds_to_filter=kinds)
        register()

    def process_dxo(self, dxo, shareable, fl_ctx):
        # A new DXO, never an in-place edit: the server filters the same task data once per site.
        data = {k: WireTensor(v) if isinstance(v, torch.Tensor) else v for k, v in dxo.data.items()}
        return DXO(dxo.data_kind, data=data, meta=dict(dxo.meta))
