"""Which message-compression filters a job gets (`fedllm job create --compress`, `exchange.wire_dtype`).

none        nothing (weights cross in their own dtype)
fp16, bf16  fedllm.flare.filters.PrecisionCast / PrecisionRestore in both directions
blockwise8, float4, normfloat4
            NVFlare's ModelQuantizer / ModelDequantizer through fedllm.flare.quantization (built where
            they run: bitsandbytes and CUDA on every participant, the server included; the sites'
            GPUs are checked against the site config at creation, fedllm.jobs.sites)
"""

from __future__ import annotations

from fedllm.errors import FedllmError
from fedllm.flare.filters import PRECISIONS, PrecisionCast, PrecisionRestore

QUANTIZATIONS = ("blockwise8", "float4", "normfloat4")
CHOICES = ("none", *PRECISIONS, *QUANTIZATIONS)
TASKS = ["train"]  # FedAvg's task name: the filters apply to what it sends and returns
WIRE_DTYPES = {"float16": "fp16", "bfloat16": "bf16"}  # exchange.wire_dtype → compression


class CompressionError(FedllmError):
    """The asked compression is not one fedllm knows."""


def check_compression(compression: str) -> None:
    if compression not in CHOICES:
        raise CompressionError(f"--compress {compression!r} unknown; use one of {', '.join(CHOICES)}")


def apply_compression(recipe, compression: str) -> None:
    """Add the filters for `compression` (one of CHOICES) to an NVFlare recipe, in both directions."""
    check_compression(compression)
    if compression == "none":
        return
    if compression in PRECISIONS:
        recipe.add_server_output_filter(PrecisionCast(compression), tasks=TASKS)
        recipe.add_client_input_filter(PrecisionRestore(), tasks=TASKS)
        recipe.add_client_output_filter(PrecisionCast(compression), tasks=TASKS)
        recipe.add_server_input_filter(PrecisionRestore(), tasks=TASKS)
        return
    # NVFlare's quantizers, built inside the participants' job processes: creating the job needs no
    # bitsandbytes or GPU here; whether the sites have GPUs is checked against the site config.
    from fedllm.flare.quantization import Dequantize, Quantize

    recipe.add_server_output_filter(Quantize(compression), tasks=TASKS)
    recipe.add_client_input_filter(Dequantize(), tasks=TASKS)
    recipe.add_client_output_filter(Quantize(compression), tasks=TASKS)
    recipe.add_server_input_filter(Dequantize(), tasks=TASKS)
