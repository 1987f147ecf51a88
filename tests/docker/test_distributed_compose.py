"""Kits made the distributed way run as containers from their own compose bundles.

Each participant (server, three sites, a lead) packages its kit in its own folder with `fedllm package`;
every kit carries a bundle with that participant alone (`<kit>/compose/`). On separate hosts each would
`docker compose up` its own; here one project includes the five bundles unchanged, so that the sites
find the server by its name on one network, as they would by DNS.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from fedllm.config import load_site_config
from fedllm.provision.distributed import init_ca, package_kit, request_certificate, sign_request
from fedllm.results.metrics import read_round_metrics
from fedllm.training.toy.demo_mlp import write_demo_data
from tests.support.compose import HEAVY_LOCK, compose_config_dict, private_keys_in_volumes, run
from tests.support.sites import write_yaml

pytestmark = [pytest.mark.docker, pytest.mark.network]

LEAD = "lead@orga.com"


def test_distributed_kits_run_the_demo_job_from_their_own_compose_bundles(fedllm_image, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # NVFlare's audit records
    data = compose_config_dict(gpus=[[0], [1], [2]])
    data["admins"] = [{"name": LEAD, "org": "orga", "role": "lead"}]
    for site, org in zip(data["sites"], ("orga", "orgb", "orgb"), strict=True):
        site["org"] = org
        site["data_dir"] = f"participants/{site['name']}/data"
    cfg = load_site_config(write_yaml(tmp_path / "site.yaml", data))
    write_demo_data([tmp_path / "participants" / s / "data" for s in cfg.site_names], tmp_path / "val.npz")
    ca = init_ca(cfg, tmp_path / "project-admin" / "ca")
    kits = {}
    for name in [cfg.server.name, *cfg.site_names, LEAD]:
        home = tmp_path / "participants" / name
        req = request_certificate(cfg, name, home / "request", source="site.yaml", data_root=tmp_path)
        signed = sign_request(cfg, req.request_zip, ca.ca_dir, out=tmp_path / "project-admin" / f"{name}.signed.zip")
        kits[name] = package_kit(signed.signed_zip, req.request_dir, home / "workspace", ca.fingerprint)

    project = f"fedllm-{cfg.project}"
    include = [
        {"path": [str(kit / "compose" / "compose.yaml"), str(kit / "compose" / "compose.cpu.yaml")]}
        for kit in kits.values()
    ]
    root = write_yaml(tmp_path / "compose.yaml", {"name": project, "include": include})
    env = {**os.environ, "FEDLLM_IMAGE": fedllm_image, "COMPOSE_FILE": str(root)}
    env.pop("COMPOSE_PROFILES", None)

    def compose(*args: str, timeout: float = 300, check: bool = True):
        return run(["docker", "compose", *args], timeout=timeout, check=check, cwd=tmp_path, env=env)

    # Each service mounts its own participant's kit, nothing else of the federation.
    services = json.loads(compose("--profile", "admin", "config", "--format", "json").stdout)["services"]
    assert set(services) == {"server", *cfg.site_names, "admin"}
    for name, service in services.items():
        kit = kits[LEAD if name == "admin" else name]
        binds = {v["target"]: v["source"] for v in service["volumes"] if v["type"] == "bind"}
        assert Path(binds["/fedllm/kit"]).resolve() == kit.resolve()
        assert "depends_on" not in service, "a participant's own bundle waits on nothing it does not hold"
        assert name not in cfg.site_names or "healthcheck" in service, "`up --wait` below waits for registration"

    try:
        with open(HEAVY_LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # three site containers + one job process each: take turns
            compose("up", "-d", "--wait", "server", timeout=180)
            # Healthy = registered with the server (each kit's RegistrationMarker, as in central kits' bundles).
            compose("up", "-d", "--wait", "--wait-timeout", "240", *cfg.site_names, timeout=300)
            admin = ["run", "--rm", "-T", "admin"]
            compose(
                *admin,
                "job",
                "create",
                "demo-mlp",
                "--mode",
                "fedavg",
                "--rounds",
                "2",
                "--out",
                "/fedllm/jobs",  # the jobs folder the admin container shares with the host (runs/jobs)
            )
            submitted = compose(
                *admin, "job", "submit", "/fedllm/jobs/demo-mlp-fedavg-3sites", "--download", "/fedllm/results",
                "--timeout", "600", timeout=700,
            )  # fmt: skip
            assert "FINISHED:COMPLETED" in submitted.stdout, submitted.stdout
            # Each participant's key stays in its own kit: no named volume holds one.
            keys = private_keys_in_volumes(project, fedllm_image)
            assert len(keys) == 1 + len(cfg.site_names) and all(v == [] for v in keys.values()), keys
        # The lead's results land on the host in runs/results of the folder its kit was packaged from.
        results = tmp_path / "runs" / "results"
        (result_dir,) = [p for p in results.iterdir() if p.is_dir()]
        rounds = read_round_metrics(result_dir)
        assert [r["round"] for r in rounds] == [0, 1] and all(len(r["sites"]) == 3 for r in rounds)
    finally:
        down = compose("--profile", "admin", "down", "-v", "--timeout", "20", check=False)
    assert down.returncode == 0, down.stderr
