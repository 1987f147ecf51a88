"""GPU preflight against NVML mocked at the pynvml boundary (no GPU on CI)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from fedllm.cli.main import main
from fedllm.config import ConfigError, load_site_config
from fedllm.runtime.preflight import check_container_gpus, check_sites
from tests.support.sites import write_yaml

GIB = 1024**3


class FakeNVML(types.ModuleType):
    """What nvidia-ml-py's pynvml exposes, for the functions fedllm calls."""

    class NVMLError(Exception):
        pass

    def __init__(self, gpus: list[tuple[str, float, float, tuple[int, int]]] | None, driver: str = "550.54.15"):
        super().__init__("pynvml")
        self.gpus, self.driver, self.inits, self.shutdowns = gpus, driver, 0, 0

    def nvmlInit(self):
        if self.gpus is None:
            raise self.NVMLError("NVML Shared Library Not Found")
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self):
        return self.driver.encode()

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return self.gpus[h][0]

    def nvmlDeviceGetMemoryInfo(self, h):
        _, total, free, _ = self.gpus[h]
        return types.SimpleNamespace(total=int(total * GIB), free=int(free * GIB), used=int((total - free) * GIB))

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return self.gpus[h][3]


A100 = ("NVIDIA A100-SXM4-80GB", 80.0, 79.0, (8, 0))
V100 = ("Tesla V100-SXM2-32GB", 32.0, 31.5, (7, 0))


@pytest.fixture
def nvml(monkeypatch):
    def install(gpus, **kw) -> FakeNVML:
        fake = FakeNVML(gpus, **kw)
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        return fake

    return install


def _config(tmp_path: Path, sites: list[dict], **extra) -> Path:
    """The config, with each site's data folder made (unless the site names its own)."""
    for s in sites:
        if "data_dir" not in s:
            (tmp_path / "data" / s["name"]).mkdir(parents=True, exist_ok=True)
    sites = [{"data_dir": str(tmp_path / "data" / s["name"]), **s} for s in sites]
    data = {"project": "pf", "admins": [{"name": "admin@nvidia.com"}], "sites": sites, **extra}
    return write_yaml(tmp_path / "site.yaml", data)


SITES_20B = [{"name": f"site-{i + 1}", "gpus": [2 * i, 2 * i + 1], "workload": "gpt-20b-ptuning-tp2"} for i in range(3)]


def test_six_a100s_pass_20b_tp2_with_a_message_per_site_and_gpu(nvml, tmp_path):
    fake = nvml([A100] * 6)
    report = check_sites(load_site_config(_config(tmp_path, SITES_20B)))
    assert report.ok, report.lines()
    subjects = [f.subject for f in report.findings]
    data = [f"site-{i} data" for i in (1, 2, 3)]
    assert subjects == [*data, "driver", *(f"site-{i // 2 + 1} GPU {i}" for i in range(6))]
    assert "550.54.15" in report.findings[3].message
    assert fake.inits == fake.shutdowns == 1


def test_missing_gpu_low_memory_and_old_architecture_each_fail_on_their_gpu(nvml, tmp_path):
    busy = ("NVIDIA A100-SXM4-80GB", 80.0, 40.0, (8, 0))
    nvml([A100, A100, busy, V100, A100])  # GPU 5 does not exist
    report = check_sites(load_site_config(_config(tmp_path, SITES_20B)))
    assert not report.ok
    failed = {f.subject: f.message for f in report.findings if not f.ok}
    assert set(failed) == {"site-2 GPU 2", "site-2 GPU 3", "site-3 GPU 5"}
    assert "needs 64 GiB free" in failed["site-2 GPU 2"] and "40.0/80.0" in failed["site-2 GPU 2"]
    assert "compute capability >= 8.0" in failed["site-2 GPU 3"]  # V100: 7.0, no bf16
    assert "no such GPU" in failed["site-3 GPU 5"] and "0..4" in failed["site-3 GPU 5"]


def test_no_driver_fails_clearly(nvml, tmp_path):
    nvml(None)
    report = check_sites(load_site_config(_config(tmp_path, SITES_20B)))
    (finding,) = [f for f in report.findings if not f.ok]
    assert finding.subject == "driver" and "NVIDIA driver" in finding.message


def test_shared_gpu_on_one_host_fails_unless_sharing_is_allowed(nvml, tmp_path):
    nvml([A100] * 2)
    sites = [
        {"name": "a", "gpus": [0], "workload": "gpt-1.3b-sft"},
        {"name": "b", "gpus": [0], "workload": "gpt-1.3b-sft"},
    ]
    report = check_sites(load_site_config(_config(tmp_path, sites, allow_gpu_sharing=True)))
    assert report.ok  # 2 × 25 GiB fit in 79 GiB
    assert "needs 50 GiB" in report.findings[-1].message
    # The same GPU shared by two sites on different hosts is not sharing; only sites on this host are checked.
    sites[1]["host"] = "node-2"
    report = check_sites(load_site_config(_config(tmp_path, sites)))
    assert report.ok and any("runs on host 'node-2'" in f.message for f in report.findings)


def test_config_refuses_a_gpu_given_to_two_sites_on_one_host(nvml, tmp_path):
    # Caught before preflight runs: the site config validator names the GPU and the other site.
    nvml([A100] * 2)
    sites = [{"name": "a", "gpus": [0], "host": "gpu-1"}, {"name": "b", "gpus": [0], "host": "gpu-1"}]
    with pytest.raises(Exception, match="already assigned"):
        load_site_config(_config(tmp_path, sites))


def test_too_few_gpus_for_tensor_parallel_are_refused_by_the_config_and_in_the_container(nvml, tmp_path):
    # One rule (fedllm.config.workloads): the site config refuses it, so preflight never meets such a site ...
    with pytest.raises(ConfigError, match=r"sites\[0\].workload: gpt-20b-ptuning-tp2 needs 2 GPU\(s\) per site"):
        load_site_config(_config(tmp_path, [{"name": "s", "gpus": [0], "workload": "gpt-20b-ptuning-tp2"}]))
    # ... and a container given fewer GPUs than its kit's workload needs fails its entry check with the same words.
    nvml([A100])
    report = check_container_gpus({"name": "s", "gpus": [0], "workload": "gpt-20b-ptuning-tp2"})
    assert not report.ok and "gpt-20b-ptuning-tp2 needs 2 GPU(s) per site" in report.findings[-1].message


def test_a_missing_data_folder_fails_on_its_host_only(nvml, tmp_path):
    nvml([A100] * 2)
    sites = [
        {"name": "here", "gpus": [0], "data_dir": str(tmp_path / "absent")},
        {"name": "file", "gpus": [1], "data_dir": str(tmp_path / "a-file")},
        {"name": "away", "gpus": [0], "host": "node-2", "data_dir": str(tmp_path / "absent")},
        {"name": "relative", "data_dir": "rel/data"},
    ]
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "base" / "rel" / "data").mkdir(parents=True)
    report = check_sites(load_site_config(_config(tmp_path, sites)), data_root=tmp_path / "base")
    by_subject = {f.subject: f for f in report.findings}
    assert not by_subject["here data"].ok and "does not exist on this host" in by_subject["here data"].message
    assert not by_subject["file data"].ok and "is not a folder" in by_subject["file data"].message
    assert "away data" not in by_subject and "runs on host 'node-2'" in by_subject["away"].message
    assert by_subject["relative data"].ok, "a relative data_dir resolves against data_root"


def test_cli_exits_non_zero_on_failure_and_zero_on_success(nvml, tmp_path, capsys):
    cfg = _config(tmp_path, SITES_20B)
    nvml([A100] * 5)
    assert main(["preflight", "-c", str(cfg)]) == 1
    out = capsys.readouterr()
    assert "FAIL  site-3 GPU 5" in out.out and "preflight failed (1 check(s))" in out.err
    nvml([A100] * 6)
    assert main(["preflight", "-c", str(cfg), "--site", "site-2"]) == 0
    out = capsys.readouterr().out
    assert "PASS  site-2 GPU 2" in out and "site-1" not in out


def test_container_check_wants_exactly_the_sites_gpus(nvml):
    facts = {"name": "site-2", "gpus": [2, 3], "workload": "gpt-20b-ptuning-tp2"}
    nvml([A100, A100])  # inside the container the runtime renumbers host GPUs 2,3 as 0,1
    report = check_container_gpus(facts)
    assert report.ok and report.findings[-1].subject == "site-2 GPU 1 (host GPU 3)"
    nvml([A100] * 6)  # runtime without device_ids: every GPU of the host leaks in
    report = check_container_gpus(facts)
    assert not report.ok and "sees 6 GPU(s)" in report.findings[-1].message
    nvml(None)
    report = check_container_gpus(facts)
    assert not report.ok and "FEDLLM_SKIP_GPU_PREFLIGHT=1" in report.findings[0].message
