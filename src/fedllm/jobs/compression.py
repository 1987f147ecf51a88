"""Which message-compression filters a job gets (`fedllm job create --compress`, `exchange.wire_dtype`).

none        nothing (weights cross in their own dtype)
fp16, bf16  fedllm.flare.filters.PrecisionCast / PrecisionRestore in both directions
blockwise8, float4, normfloat4
            NVFlare's ModelQuantizer / ModelDequantizer (bitsandbytes, CUDA on every participant)
"""

from __future__ import annotations

from fedllm.errors import FedllmError
from fedllm.flare.filters import PRECISIONS, PrecisionCast, PrecisionRestore

QUANTIZATIONS = ("blockwise8", "float4", "normfloat4")
CHOICES = ("none", *PRECISIONS, *QUANTIZATIONS)
TASKS = ["train"]  # FedAvg's task name: the filters apply to what it sends and returns
WIRE_DTYPES = {"float16": "fp16", "bfloat16": "bf16"}  # exchange.wire_dtype → compression


class CompressionError(FedllmError):
    """The asked compression cannot run where the job would run it."""


def _check_quantization_possible() -> None:
    import importlib.util

    import torch

    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes (pip install bitsandbytes)")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU")
    if missing:
        raise CompressionError(
            "8-/4-bit quantization uses NVFlare's ModelQuantizer/ModelDequantizer, which need "
            f"{' and '.join(missing)} on every participant; this machine lacks them. Use --compress fp16 "
            "(or bf16) on CPU"
        )


def apply_compression(recipe, compression: str) -> None:
    """Add the filters for `compression` (one of CHOICES) to an NVFlare recipe, in both directions."""
    if compression not in CHOICES:
        raise CompressionError(f"--compress {compression!r} unknown; use one of {', '.join(CHOICES)}")
    if compression == "none":
        return
    if compression in PRECISIONS:
        recipe.add_server_output_filter(PrecisionCast(compression), tasks=TASKS)
        recipe.add_client_input_filter(PrecisionRestore(), tasks=TASKS)
        recipe.add_client_output_filter(PrecisionCast(compression), tasks=TASKS)
        recipe.add_server_input_filter(PrecisionRestore(), tasks=TASKS)
        return
    _check_quantization_possible()
    from nvflare.app_opt.pt.quantization.dequantizer import ModelDequantizer
    from nvflare.app_opt.pt.quantization.quantizer import ModelQuantizer

    recipe.add_server_output_filter(ModelQuantizer(quantization_type=compression), tasks=TASKS)
    recipe.add_client_input_filter(ModelDequantizer(), tasks=TASKS)
    recipe.add_client_output_filter(ModelQuantizer(quantization_type=compression), tasks=TASKS)
    recipe.add_server_input_filter(ModelDequantizer(), tasks=TASKS)
