"""Preflight: is this host ready for its sites? Data folders there; GPUs that exist, are the site's own
and can hold its workload.

`fedllm preflight -c FILE` runs it on a host before `docker compose up`; each site container runs
`check_container_gpus` as its entry check, against the GPUs the NVIDIA runtime gave it. What a site
needs is the site config's (fedllm.config.workloads, fedllm.config.readiness): `fedllm validate`
refuses too few GPUs for a workload and warns about a missing data folder; here it fails.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from fedllm.config.readiness import data_dir_problem, local_host_names
from fedllm.config.site_config import Site, SiteConfig
from fedllm.config.workloads import BF16_MIN_CC, NEEDS, gpu_shortfall
from fedllm.runtime.preflight.nvml import GpuInfo, NoDriver, query_gpus

GIB = 1024**3


@dataclass(frozen=True)
class Finding:
    ok: bool
    subject: str  # "site-1 GPU 0", "driver", ...
    message: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'}  {self.subject}: {self.message}"


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)

    def add(self, ok: bool, subject: str, message: str) -> None:
        self.findings.append(Finding(ok, subject, message))

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)

    def lines(self) -> list[str]:
        return [f.line() for f in self.findings]


def _check_gpu(report: Report, subject: str, gpu: GpuInfo, workload: str, sharers: int) -> None:
    need = NEEDS[workload]
    free_gib, total_gib = gpu.free_bytes / GIB, gpu.total_bytes / GIB
    needed = need.free_gib_per_gpu * sharers
    desc = f"{gpu.name}, {free_gib:.1f}/{total_gib:.1f} GiB free, compute capability {gpu.compute_capability[0]}.{gpu.compute_capability[1]}"
    problems = []
    if free_gib < needed:
        shared = f" ({sharers} sites share it)" if sharers > 1 else ""
        problems.append(
            f"{workload} needs {needed:.0f} GiB free{shared} — free the GPU (nvidia-smi shows who holds it) "
            "or give the site a larger GPU"
        )
    if need.bf16 and gpu.compute_capability < BF16_MIN_CC:
        problems.append(
            f"{workload} trains in bf16, which needs compute capability >= 8.0 (Ampere or later); "
            "move the site to an Ampere/Hopper GPU"
        )
    if problems:
        report.add(False, subject, f"{desc}: " + "; ".join(problems))
        return
    report.add(True, subject, f"{desc}" + (f"; {workload} needs {needed:.0f} GiB" if needed else ""))


def _check_count(report: Report, site: Site, count: int) -> bool:
    shortfall = gpu_shortfall(site.workload, count)
    if shortfall:
        report.add(False, site.name, f"{shortfall} — list more GPUs in its `gpus`")
        return False
    return True


def check_sites(
    config: SiteConfig,
    site_names: list[str] | None = None,
    hosts: set[str] | None = None,
    query=query_gpus,
    data_root: Path | None = None,
) -> Report:
    """Check the sites of `config` that run on this machine (or the named ones): data folders, then NVML.

    `data_root`: what relative data dirs resolve against (default: the current folder, as for
    `fedllm provision` and `fedllm data demo`).
    """
    report = Report()
    hosts = hosts or local_host_names()
    chosen = [config.site(n) for n in site_names] if site_names else list(config.sites)
    here = [s for s in chosen if s.host in hosts or site_names]
    for s in chosen:
        if s not in here:
            report.add(True, s.name, f"runs on host '{s.host}', not this one: run preflight there")
    base = data_root or Path.cwd()
    for s in here:
        problem = data_dir_problem(s, base)
        fix = " — put the site's data there before it starts (`fedllm data demo` writes the demo's), or correct its data_dir"
        report.add(
            problem is None, f"{s.name} data", f"{problem}{fix}" if problem else f"data folder {s.data_path(base)}"
        )
    gpu_sites = [s for s in here if s.gpus]
    for s in here:
        if not s.gpus:
            report.add(True, s.name, "no GPUs listed: the site trains on CPU")
    if not gpu_sites:
        return report
    try:
        driver, gpus = query()
    except NoDriver as exc:
        report.add(False, "driver", str(exc))
        return report
    report.add(True, "driver", f"NVIDIA driver {driver}, {len(gpus)} GPU(s) visible")

    # Sharing is checked over every site of the config on this host, not just the chosen ones.
    owners: dict[tuple[str, int], list[str]] = defaultdict(list)
    for s in config.sites:
        for g in s.gpus:
            owners[(s.host, g)].append(s.name)
    for s in gpu_sites:
        if not _check_count(report, s, len(s.gpus)):
            continue
        for g in s.gpus:
            subject = f"{s.name} GPU {g}"
            if g >= len(gpus):
                report.add(
                    False,
                    subject,
                    f"no such GPU: this machine has {len(gpus)} (indices 0..{len(gpus) - 1}); fix the site's `gpus`",
                )
                continue
            sharing = owners[(s.host, g)]
            if len(sharing) > 1 and not config.allow_gpu_sharing:
                others = ", ".join(n for n in sharing if n != s.name)
                report.add(False, subject, f"also given to {others}; give each site its own GPUs")
                continue
            _check_gpu(report, subject, gpus[g], s.workload, len(sharing))
    return report


def check_container_gpus(facts: dict, query=query_gpus) -> Report:
    """Inside a site container: the NVIDIA runtime must expose exactly the site's GPUs, each fit for its workload."""
    report = Report()
    name, host_ids, workload = facts["name"], list(facts.get("gpus", [])), facts.get("workload", "none")
    try:
        driver, gpus = query()
    except NoDriver as exc:
        report.add(
            False,
            f"{name} driver",
            f"{exc} — run the site with the NVIDIA container runtime (compose.gpu.yaml), "
            "or set FEDLLM_SKIP_GPU_PREFLIGHT=1 for a CPU run (compose.cpu.yaml)",
        )
        return report
    report.add(True, f"{name} driver", f"NVIDIA driver {driver}, {len(gpus)} GPU(s) in this container")
    if len(gpus) != len(host_ids):
        report.add(
            False,
            name,
            f"the container sees {len(gpus)} GPU(s) but the site is given {len(host_ids)} ({host_ids}); "
            "re-provision and recreate the container (`docker compose up --force-recreate`)",
        )
        return report
    shortfall = gpu_shortfall(workload if workload in NEEDS else "none", len(gpus))
    if shortfall:
        report.add(False, name, shortfall)
        return report
    for gpu, host_id in zip(gpus, host_ids, strict=True):
        _check_gpu(report, f"{name} GPU {gpu.index} (host GPU {host_id})", gpu, workload, 1)
    return report
