"""How every fedllm job moves model weights between the server and the sites.

NVFlare 2.9 ships several exchange paths and leaves the choice to the job; fedllm makes
the choice once, here, from measurements (benchmarks/exchange.py, docs/exchange.md), and
every job template gets it through `create_job`. Each setting below says what it does
and why fedllm picks its value. `profile: stock` keeps NVFlare's FedAvgRecipe defaults
(the benchmark's baseline).
"""

from __future__ import annotations

from typing import Any, Literal

from nvflare.apis.dxo_filter import DXOFilter
from pydantic import BaseModel, ConfigDict, Field, model_validator

# Timeouts safe for multi-GB payloads on slow links: a 20 GB fp32 state at 100 MB/s takes
# ~200 s per direction, so every limit that can fire during one transfer is ≥ 10 minutes.
MULTI_GB_TIMEOUT_S = 1800.0
TRAIN_TASK = "train"  # FedAvgRecipe's task name


class ExchangeOptions(BaseModel):
    """The `exchange:` section of a job template (every key optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # fedllm: the settings below; stock: NVFlare's FedAvgRecipe defaults (numpy on the wire,
    # default timeouts), kept for comparison and debugging.
    profile: Literal["fedllm", "stock"] = "fedllm"
    # Format of the weights on the server and the wire. "pytorch" keeps torch tensors end to end
    # (no tensor→numpy→tensor copies, bf16 survives); "numpy" is NVFlare's default.
    format: Literal["pytorch", "numpy"] = "pytorch"
    # NVFlare's TensorServerStreamer/TensorClientStreamer: tensors sent one by one outside the task
    # message. Measured slower than FOBS's own download path on loopback (docs/exchange.md).
    tensor_streaming: bool = False
    # Incoming streamed tensors land in files and are aggregated from there (server RAM ~1× model
    # instead of ~N×). Needs format pytorch.
    disk_offload: bool = True
    # Chunk size (MiB) FOBS's tensor/array downloader asks for per request (NVFlare default: 2 MiB
    # for tensors, 1 MiB for arrays). Larger chunks cut per-chunk Python overhead.
    download_chunk_mib: int = Field(default=64, ge=1, le=1024)
    # Seconds without progress before a download or a request is declared dead.
    transfer_timeout_s: float = Field(default=MULTI_GB_TIMEOUT_S, gt=0)
    # Narrow fp32 weights to 16 bits on the wire (both directions) and widen them back on arrival:
    # half the bytes, lossy (bf16: relative error ≤ 2⁻⁸ per crossing). None keeps weights bit-exact.
    wire_dtype: Literal["bfloat16", "float16"] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ExchangeOptions:
        if self.profile == "fedllm" and self.format == "numpy":
            if self.wire_dtype == "bfloat16":
                raise ValueError("wire_dtype bfloat16 needs format pytorch (numpy has no bfloat16); use float16")
            if self.disk_offload:
                raise ValueError("disk_offload only applies to format pytorch; set disk_offload: false")
        return self


def recipe_kwargs(options: ExchangeOptions) -> dict[str, Any]:
    """FedAvgRecipe constructor arguments that fix the exchange path (they are baked in at construction)."""
    if options.profile == "stock":
        return {}
    from nvflare.client.config import ExchangeFormat

    fmt = ExchangeFormat.PYTORCH if options.format == "pytorch" else ExchangeFormat.NUMPY
    return {"server_expected_format": fmt, "enable_tensor_disk_offload": options.disk_offload}


def apply_exchange_settings(recipe, options: ExchangeOptions | None = None) -> None:
    """Configure an already-built FedAvgRecipe's exchange: streaming, chunk sizes, timeouts."""
    options = options or ExchangeOptions()
    if options.profile == "stock":
        return
    if options.tensor_streaming:
        recipe.enable_tensor_streaming(
            format=options.format,
            tensor_send_timeout=options.transfer_timeout_s,
            wait_send_task_data_all_clients_timeout=options.transfer_timeout_s,
        )
    chunk = options.download_chunk_mib * 2**20
    timeout = options.transfer_timeout_s
    config = {
        # FOBS ViaDownloader settings, per decomposer prefix ("tensor_" torch, "np_" numpy).
        **{f"{p}download_chunk_size": chunk for p in ("tensor_", "np_")},
        **{f"{p}min_download_timeout": timeout for p in ("tensor_", "np_")},
        **{f"{p}streaming_per_request_timeout": timeout for p in ("tensor_", "np_")},
        # Client: how long a task fetch / result submission may take (includes the payload transfer).
        "get_task_timeout": timeout,
        "submit_task_result_timeout": timeout,
    }
    recipe.add_client_config(config)
    recipe.add_server_config(config)
    if options.wire_dtype:
        recipe.add_server_output_filter(CastToWireDtype(options.wire_dtype), tasks=[TRAIN_TASK])
        recipe.add_client_input_filter(RestoreDtype(), tasks=[TRAIN_TASK])
        recipe.add_client_output_filter(CastToWireDtype(options.wire_dtype), tasks=[TRAIN_TASK])
        recipe.add_server_input_filter(RestoreDtype(), tasks=[TRAIN_TASK])


# ---- wire dtype: LLM weights cross in 16 bits, training sees its own dtype -------------------------

WIRE_CAST_META = "fedllm_wire_cast"  # DXO meta: {param name: original dtype} of what was narrowed


def _torch_dtype(name: str):
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


class CastToWireDtype(DXOFilter):
    """Narrows floating-point weights wider than `wire_dtype` before they are sent (fp32 → bf16 halves the bytes).

    Put on the sender's side (server task-data output, site task-result output); `RestoreDtype`
    on the receiver's side widens them back, so the trainer and the aggregator see their own dtype.
    Lossy by design: bf16 keeps 8 bits of mantissa (relative error ≤ 2⁻⁸), fp16 keeps 11 bits but
    overflows above 65504. Only used when a template asks for it (`exchange.wire_dtype`).
    """

    def __init__(self, wire_dtype: str = "bfloat16"):
        super().__init__(supported_data_kinds=None, data_kinds_to_filter=None)
        _torch_dtype(wire_dtype)  # fails early on a bad name
        self.wire_dtype = wire_dtype

    def process_dxo(self, dxo, shareable, fl_ctx):
        import numpy as np
        import torch

        wire = _torch_dtype(self.wire_dtype)
        narrowed: dict[str, str] = {}
        data = dict(dxo.data)
        for name, value in data.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.element_size() > wire.itemsize:
                narrowed[name] = str(value.dtype).removeprefix("torch.")
                data[name] = value.to(wire)
            elif isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.dtype.itemsize > 2:
                if self.wire_dtype != "float16":
                    raise ValueError("numpy weights can only cross as float16; use exchange.format pytorch for bf16")
                narrowed[name] = str(value.dtype)
                data[name] = value.astype(np.float16)
        if not narrowed:
            return None
        dxo.data = data
        dxo.set_meta_prop(WIRE_CAST_META, narrowed)
        return dxo


class RestoreDtype(DXOFilter):
    """Widens weights that `CastToWireDtype` narrowed back to their original dtype (see there)."""

    def __init__(self):
        super().__init__(supported_data_kinds=None, data_kinds_to_filter=None)

    def process_dxo(self, dxo, shareable, fl_ctx):
        import numpy as np
        import torch

        narrowed = dxo.get_meta_prop(WIRE_CAST_META)
        if not narrowed:
            return None
        data = dict(dxo.data)
        for name, dtype in narrowed.items():
            value = data[name]
            if hasattr(value, "materialize"):  # a disk-offloaded tensor (NVFlare's _LazyRef)
                value = value.materialize()
            if isinstance(value, torch.Tensor):
                data[name] = value.to(getattr(torch, dtype))
            else:
                data[name] = np.asarray(value).astype(dtype)
        dxo.data = data
        dxo.remove_meta_props([WIRE_CAST_META])
        return dxo
