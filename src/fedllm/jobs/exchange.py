"""How every fedllm job moves model weights between the server and the sites.

NVFlare 2.9 ships several exchange paths and leaves the choice to the job; fedllm makes
the choice once, here, from measurements (benchmarks/exchange.py, docs/exchange.md), and
every job template gets it through `create_job`. Each setting below says what it does
and why fedllm picks its value. `profile: stock` keeps NVFlare's FedAvgRecipe defaults
(the benchmark's baseline).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Timeouts safe for multi-GB payloads on slow links: a 20 GB fp32 state at 100 MB/s takes
# ~200 s per direction, so every limit that can fire during one transfer is ≥ 10 minutes.
MULTI_GB_TIMEOUT_S = 1800.0


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
    # How torch tensors are itemized for FOBS's downloader. "views": raw slices of each tensor's
    # own memory, written straight into the receiver's tensor (fedllm.flare.tensor_wire, through an
    # NVFlare output filter); "safetensors": NVFlare's TensorDecomposer, one safetensors blob per
    # tensor, serialized by the sender and parsed by the receiver (two extra passes per byte).
    tensor_items: Literal["views", "safetensors"] = "views"
    # Run NVFlare's memory cleanup (gc.collect + malloc_trim) every N rounds on the server and
    # the sites (0: never, NVFlare's default). Round objects that sit in reference cycles hold
    # whole models until Python's cyclic GC happens to run: without it the server peaked at 6.3 GB
    # instead of 5.0 GB for a 1 GiB model (docs/exchange.md).
    memory_gc_rounds: int = Field(default=1, ge=0)
    # fedllm.flare.fedavg: a FedAvg controller and persistor that keep ONE global model in server
    # RAM between rounds (stock: + the initial weights for the whole job + older rounds' models pinned
    # by long-lived contexts) and skip the broadcast's deep copy of the weights (docs/exchange.md).
    lean_server: bool = True
    # With lean_server: write each round's checkpoint (torch.save + fsync + rename, read back) on a
    # background thread instead of on the round's critical path (1.4–2.9 s of a ~10 s round at 1 GiB);
    # the job waits for the last one before it ends, and a failed write fails the job.
    background_checkpoint: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> ExchangeOptions:
        if self.profile == "fedllm" and self.format == "numpy":
            if self.wire_dtype == "bfloat16":
                raise ValueError("wire_dtype bfloat16 needs format pytorch (numpy has no bfloat16); use float16")
            if self.disk_offload:
                raise ValueError("disk_offload only applies to format pytorch; set disk_offload: false")
        return self


def recipe_kwargs(options: ExchangeOptions) -> dict[str, Any]:
    """FedllmFedAvgRecipe constructor arguments that fix the exchange path (baked in at construction)."""
    if options.profile == "stock":
        return {"lean_server": False}
    from nvflare.client.config import ExchangeFormat

    fmt = ExchangeFormat.PYTORCH if options.format == "pytorch" else ExchangeFormat.NUMPY
    return {
        "server_expected_format": fmt,
        "enable_tensor_disk_offload": options.disk_offload,
        "server_memory_gc_rounds": options.memory_gc_rounds,
        "client_memory_gc_rounds": options.memory_gc_rounds,
        "lean_server": options.lean_server,
        "background_checkpoint": options.background_checkpoint,
    }


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


def apply_tensor_items(recipe, options: ExchangeOptions | None = None) -> None:
    """Send torch weights as raw slices (`tensor_items: views`); last filter on each sending side."""
    options = options or ExchangeOptions()
    if options.profile == "stock" or options.tensor_items != "views" or options.format != "pytorch":
        return
    from fedllm.flare.tensor_wire import WireViews
    from fedllm.jobs.compression import TASKS

    recipe.add_server_output_filter(WireViews(), tasks=TASKS)
    recipe.add_client_output_filter(WireViews(), tasks=TASKS)


def wire_compression(options: ExchangeOptions) -> str:
    """The compression (fedllm.jobs.compression) that `wire_dtype` asks for; "none" keeps weights bit-exact."""
    from fedllm.jobs.compression import WIRE_DTYPES

    return WIRE_DTYPES[options.wire_dtype] if options.wire_dtype else "none"
