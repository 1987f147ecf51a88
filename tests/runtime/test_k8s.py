"""`fedllm k8s render`: NVFlare's Helm charts per participant, GPU requests from the site config, linted by helm."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fedllm.config import load_site_config
from fedllm.provision import provision
from fedllm.runtime.k8s import render
from tests.support.sites import local_config_dict, write_yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def helm() -> str:
    """helm from the repository's installer (CI has none); a failure to install fails the test."""
    if not shutil.which("helm"):
        proc = subprocess.run(["bash", str(REPO / "scripts" / "install-helm.sh")], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    return shutil.which("helm") or "/usr/local/bin/helm"


def test_render_lint_and_template_carry_each_sites_gpu_count(helm, tmp_path: Path):
    data = local_config_dict(gpus=[[0, 1], [2], []])
    data["server"]["name"] = "server"
    cfg = load_site_config(write_yaml(tmp_path / "site.yaml", data))
    kits = provision(cfg, tmp_path / "ws", source="site.yaml", data_root=tmp_path)
    charts = render(kits, image="registry.example.org/fedllm:1.0", namespace="fl", echo=lambda _m: None)
    assert [c.name for c in charts] == ["server", "site-1", "site-2", "site-3"]
    # Job pods sit behind no Service of their own: the prepared server kit keeps NVFlare's internal
    # section but not the job ports (sites would dial a port the server's Service does not front).
    comm = json.loads((charts[0].prepared_kit / "local" / "comm_config.json").read_text())
    assert comm["allow_adhoc_conns"] is False and "adhoc" not in comm and "internal" in comm
    for chart in charts:
        lint = subprocess.run([helm, "lint", str(chart.helm_chart)], capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr
        out = subprocess.run(
            [helm, "template", chart.name, str(chart.helm_chart), "--namespace", "fl"], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        docs = [d for d in yaml.safe_load_all(out.stdout) if d]
        (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["image"] == "registry.example.org/fedllm:1.0"
        limits = container["resources"].get("limits", {})
        expected = {"server": 0, "site-1": 2, "site-2": 1, "site-3": 0}[chart.name]
        assert limits.get("nvidia.com/gpu", 0) == expected
    # Sites dial the server by its name: the server's Service carries it.
    server_docs = subprocess.run(
        [helm, "template", "server", str(charts[0].helm_chart)], capture_output=True, text=True
    )
    services = [d for d in yaml.safe_load_all(server_docs.stdout) if d and d["kind"] == "Service"]
    assert "server" in {s["metadata"]["name"] for s in services}


def test_a_distributed_kit_renders_its_own_chart_only(helm, tmp_path: Path, monkeypatch):
    """A site's workspace from `fedllm package` holds its kit alone: its chart, and the others named as absent."""
    from fedllm.provision import latest_kits
    from fedllm.provision.distributed import init_ca, package_kit, request_certificate, sign_request

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # NVFlare's audit records
    data = local_config_dict(gpus=[[0], [1, 2], []])
    data["server"]["name"] = "server"
    cfg = load_site_config(write_yaml(tmp_path / "site.yaml", data))
    ca = init_ca(cfg, tmp_path / "admin" / "ca")
    req = request_certificate(cfg, "site-2", tmp_path / "site-2" / "request", source="site.yaml", data_root=tmp_path)
    signed = sign_request(cfg, req.request_zip, ca.ca_dir)
    package_kit(signed.signed_zip, req.request_dir, tmp_path / "site-2" / "ws", ca.fingerprint)

    said: list[str] = []
    charts = render(latest_kits(tmp_path / "site-2" / "ws", cfg), image="fedllm:1.0", namespace="fl", echo=said.append)
    assert [c.name for c in charts] == ["site-2"] and charts[0].gpus == 2
    assert "server, site-1, site-3" in said[0]
    assert (charts[0].prepared_kit / "startup" / "client.key").read_bytes() == (
        req.request_dir / "site-2.key"
    ).read_bytes()
    lint = subprocess.run([helm, "lint", str(charts[0].helm_chart)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
