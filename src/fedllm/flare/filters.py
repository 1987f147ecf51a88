"""NVFlare DXO filters that narrow weights to 16 bits on the wire and widen them back on arrival.

`PrecisionCast` casts float32/64 weights to fp16 or bf16 before they leave; `PrecisionRestore` brings
them back to their own dtype on the other side (halves the bytes; the seeds measured 5,993,930,752 →
2,996,965,376 bytes for Llama-3.2-1B). They sit on both directions: the server casts the global model
it sends and the sites restore it; the sites cast their update and the server restores it before
averaging. The site-side cast also records `bytes_on_wire` (bytes of the cast update) in the site's
metrics for the round. Which filters a job gets is decided at job creation (fedllm.jobs.compression);
NVFlare builds these classes by path inside the server and site processes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PRECISIONS = ("fp16", "bf16")
ORIGINAL_DTYPES = "fedllm_original_dtypes"
BYTES_ON_WIRE = "bytes_on_wire"


def _nbytes(value: Any) -> int:
    if hasattr(value, "nbytes"):
        return int(value.nbytes)
    if hasattr(value, "element_size"):
        return value.numel() * value.element_size()
    return 0


def _cast(value: Any, precision: str) -> tuple[Any, str | None]:
    """(value in the target precision, its original dtype name) or (value, None) if not a float32/64 array."""
    import torch

    if isinstance(value, np.ndarray) and value.dtype in (np.float32, np.float64):
        if precision == "bf16":
            return torch.from_numpy(value).to(torch.bfloat16), str(value.dtype)
        return value.astype(np.float16), str(value.dtype)
    if isinstance(value, torch.Tensor) and value.dtype in (torch.float32, torch.float64):
        return value.to(torch.float16 if precision == "fp16" else torch.bfloat16), str(value.dtype)
    return value, None


def _restore(value: Any, dtype: str) -> Any:
    import torch

    if hasattr(value, "materialize"):  # a tensor NVFlare offloaded to disk on arrival (exchange.disk_offload)
        value = value.materialize()
    if dtype.startswith("torch."):
        return torch.as_tensor(value).to(getattr(torch, dtype.removeprefix("torch.")))
    if isinstance(value, torch.Tensor):
        return value.float().numpy().astype(dtype)
    return np.asarray(value).astype(dtype)


def _dxo_filter_base():
    from nvflare.apis.dxo import DataKind
    from nvflare.apis.dxo_filter import DXOFilter

    return DXOFilter, [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF]


class PrecisionCast(_dxo_filter_base()[0]):
    """Cast float32 weights to fp16/bf16 before they leave (an NVFlare DXO filter)."""

    def __init__(self, precision: str = "fp16"):
        _, kinds = _dxo_filter_base()
        super().__init__(supported_data_kinds=kinds, data_kinds_to_filter=kinds)
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} unknown; use one of {PRECISIONS}")
        self.precision = precision

    def process_dxo(self, dxo, shareable, fl_ctx):
        # A new DXO, never an in-place edit: the server filters the same task data once per site.
        from nvflare.apis.dxo import DXO, MetaKey

        data, originals, before = {}, {}, 0
        for key, value in dxo.data.items():
            before += _nbytes(value)
            data[key], dtype = _cast(value, self.precision)
            if dtype:
                originals[key] = dtype
        after = sum(_nbytes(v) for v in data.values())
        meta = {**dxo.meta, ORIGINAL_DTYPES: originals}
        if isinstance(meta.get(MetaKey.INITIAL_METRICS), dict):  # a site's result: report the bytes on the wire
            meta[MetaKey.INITIAL_METRICS] = {**meta[MetaKey.INITIAL_METRICS], BYTES_ON_WIRE: float(after)}
        if fl_ctx is not None:
            self.log_info(fl_ctx, f"{self.precision}: {len(originals)} tensors, {before:,} → {after:,} bytes")
        return DXO(dxo.data_kind, data=data, meta=meta)


class PrecisionRestore(_dxo_filter_base()[0]):
    """Restore the original precision of weights a PrecisionCast filter sent (an NVFlare DXO filter)."""

    def __init__(self):
        _, kinds = _dxo_filter_base()
        super().__init__(supported_data_kinds=kinds, data_kinds_to_filter=kinds)

    def process_dxo(self, dxo, shareable, fl_ctx):
        from nvflare.apis.dxo import DXO

        originals = dxo.get_meta_prop(ORIGINAL_DTYPES) or {}
        data = {k: _restore(v, originals[k]) if k in originals else v for k, v in dxo.data.items()}
        meta = {k: v for k, v in dxo.meta.items() if k != ORIGINAL_DTYPES}
        return DXO(dxo.data_kind, data=data, meta=meta)
