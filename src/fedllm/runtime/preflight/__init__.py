"""GPU preflight through NVML: checks run before a federation (or a site container) starts."""

from fedllm.runtime.preflight.checks import Finding, Report, check_container_gpus, check_sites
from fedllm.runtime.preflight.nvml import GpuInfo, NoDriver, query_gpus
from fedllm.runtime.preflight.workloads import NEEDS, Need

__all__ = [
    "NEEDS",
    "Finding",
    "GpuInfo",
    "Need",
    "NoDriver",
    "Report",
    "check_container_gpus",
    "check_sites",
    "query_gpus",
]
