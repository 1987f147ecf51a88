"""The one place fedllm talks to NVML (nvidia-ml-py's `pynvml`); tests mock this boundary."""

from __future__ import annotations

from dataclasses import dataclass


class NoDriver(Exception):
    """NVML could not be loaded or initialised: no NVIDIA driver, or no GPU visible."""


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    compute_capability: tuple[int, int]


def query_gpus() -> tuple[str, list[GpuInfo]]:
    """(driver version, every GPU NVML sees), or NoDriver."""
    try:
        import pynvml
    except ImportError as exc:  # the package is a dependency; a broken install still gets a clear message
        raise NoDriver(f"nvidia-ml-py is not installed ({exc}); pip install nvidia-ml-py") from exc
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise NoDriver(f"NVML could not start ({exc}): is the NVIDIA driver installed and a GPU visible?") from exc
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(
                GpuInfo(i, _text(pynvml.nvmlDeviceGetName(handle)), int(mem.total), int(mem.free), (major, minor))
            )
        return driver, gpus
    finally:
        pynvml.nvmlShutdown()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
