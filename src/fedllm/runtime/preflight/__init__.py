"""Preflight: checks run before a federation (or a site container) starts: data folders, driver, GPUs (NVML)."""

from fedllm.runtime.preflight.checks import Finding, Report, check_container_gpus, check_sites
from fedllm.runtime.preflight.nvml import GpuInfo, NoDriver, query_gpus

__all__ = [
    "Finding",
    "GpuInfo",
    "NoDriver",
    "Report",
    "check_container_gpus",
    "check_sites",
    "query_gpus",
]
