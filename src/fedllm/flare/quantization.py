"""NVFlare's 8-/4-bit quantization filters, loaded where they run rather than where the job is created.

`nvflare.app_opt.pt.quantization`'s ModelQuantizer and ModelDequantizer import bitsandbytes at module
level and quantize on CUDA. The job's configuration names these two fedllm filters instead, which take
the same arguments and hand every message to NVFlare's filter, built on first use inside the server's
and the sites' job processes. So a job is created on any machine (the GPU-less admin container too);
a participant that lacks bitsandbytes or a GPU stops at the first message with that reason.
"""

from __future__ import annotations

import threading
from typing import Any

from nvflare.apis.dxo import DataKind
from nvflare.apis.dxo_filter import DXOFilter

KINDS = [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF]


class QuantizationUnavailable(RuntimeError):
    """This participant cannot run NVFlare's quantization filters; the message says what it lacks."""


def _requirements() -> None:
    import importlib.util

    import torch

    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes (pip install bitsandbytes)")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU")
    if missing:
        raise QuantizationUnavailable(
            "the job's 8-/4-bit compression runs NVFlare's ModelQuantizer/ModelDequantizer, which need "
            f"{' and '.join(missing)} here; create the job with --compress fp16 or bf16 instead"
        )


class _Deferred(DXOFilter):
    """A DXO filter that builds NVFlare's own on the first message and passes every message to it."""

    def __init__(self) -> None:
        super().__init__(supported_data_kinds=KINDS, data_kinds_to_filter=KINDS)
        self._inner: Any = None
        self._building = threading.Lock()  # the server filters one message per site, from several threads

    def _build(self) -> DXOFilter:
        raise NotImplementedError

    def process_dxo(self, dxo, shareable, fl_ctx):
        with self._building:
            if self._inner is None:
                _requirements()
                self._inner = self._build()
        return self._inner.process_dxo(dxo, shareable, fl_ctx)


class Quantize(_Deferred):
    """nvflare.app_opt.pt.quantization.quantizer.ModelQuantizer(quantization_type), built where it runs."""

    def __init__(self, quantization_type: str = "blockwise8"):
        super().__init__()
        self.quantization_type = quantization_type

    def _build(self) -> DXOFilter:
        from nvflare.app_opt.pt.quantization.quantizer import ModelQuantizer

        return ModelQuantizer(quantization_type=self.quantization_type)


class Dequantize(_Deferred):
    """nvflare.app_opt.pt.quantization.dequantizer.ModelDequantizer, built where it runs."""

    def _build(self) -> DXOFilter:
        from nvflare.app_opt.pt.quantization.dequantizer import ModelDequantizer

        return ModelDequantizer()
