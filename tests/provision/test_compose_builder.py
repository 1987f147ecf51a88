"""ComposeBuilder output read as YAML (no docker needed; tests/docker render it with Compose itself)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from fedllm.config import load_site_config
from fedllm.provision import provision
from fedllm.provision.compose import KIT_DIGEST_LABEL, kit_digest
from tests.support.sites import local_config_dict, write_yaml


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_compose_bundle_follows_the_site_config(tmp_path: Path):
    data = local_config_dict(gpus=[[0, 1], [2], []])
    data["container"] = {"image": "registry.example.org/fedllm:2", "ulimits": {"stack": 33554432}}
    data["sites"][1]["shm_size"] = "8g"
    cfg = load_site_config(write_yaml(tmp_path / "site.yaml", data))
    kits = provision(cfg, tmp_path / "ws", source="site.yaml", data_root=tmp_path)
    bundle = kits.prod_dir / "compose"
    base, gpu, cpu = (_load(bundle / f) for f in ("compose.yaml", "compose.gpu.yaml", "compose.cpu.yaml"))

    assert set(base["services"]) == {"localhost", "site-1", "site-2", "site-3", "admin"}
    server = data["server"]
    # The server publishes its two ports and the job ports its running jobs listen on; sites publish nothing.
    assert base["services"]["localhost"]["ports"] == [
        f"{server['fed_learn_port']}:{server['fed_learn_port']}",
        f"{server['admin_port']}:{server['admin_port']}",
        f"{server['job_ports']}:{server['job_ports']}",
    ]
    assert not any("ports" in base["services"][s] for s in ("site-1", "site-2", "site-3", "admin"))
    site2 = base["services"]["site-2"]
    assert site2["shm_size"] == "8g" and site2["ulimits"] == {"stack": 33554432}
    kit, data = site2["volumes"][:2]
    assert (kit["source"], kit["target"], kit["read_only"]) == ("../site-2", "/fedllm/kit", True)
    assert (data["source"], data["target"], data["read_only"]) == (
        str(tmp_path / "data" / "site-2"),
        "/fedllm/data",
        True,
    )
    # Docker must not create a missing kit or data dir (empty, root-owned): the site fails and names it.
    assert kit["bind"] == data["bind"] == {"create_host_path": False}
    admin = base["services"]["admin"]
    assert admin["profiles"] == ["admin"]
    # The admin has no named volume (`down -v` without its profile would leave it): a tmpfs, and the shared folders.
    assert set(base["volumes"]) == {f"{n}-workspace" for n in ("localhost", "site-1", "site-2", "site-3")}
    assert admin["tmpfs"] == ["/fedllm/workspace:uid=${FEDLLM_UID:-10001},gid=${FEDLLM_GID:-10001},mode=0700"]
    shared = {v["target"]: v["source"] for v in admin["volumes"] if v["target"] != "/fedllm/kit"}
    assert shared == {
        "/fedllm/jobs": "${FEDLLM_JOBS_DIR:?is set in the bundle's .env by fedllm provision}",
        "/fedllm/results": "${FEDLLM_RESULTS_DIR:?is set in the bundle's .env by fedllm provision}",
    }

    assert gpu["services"]["site-1"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["0", "1"]
    assert gpu["services"]["site-2"]["environment"]["NVIDIA_VISIBLE_DEVICES"] == "2"
    assert "deploy" not in gpu["services"]["site-3"]  # a CPU site reserves no GPU
    assert all(s["environment"]["FEDLLM_SKIP_GPU_PREFLIGHT"] == "1" for s in cpu["services"].values())

    env = dict(line.split("=", 1) for line in (bundle / ".env").read_text().splitlines())
    assert env["FEDLLM_IMAGE"] == "registry.example.org/fedllm:2"
    assert env["COMPOSE_FILE"] == "compose.yaml:compose.gpu.yaml"
    # The admin's shared folders are runs/jobs and runs/results of the folder provisioned from, made here.
    assert env["FEDLLM_JOBS_DIR"] == str(tmp_path / "runs" / "jobs")
    assert env["FEDLLM_RESULTS_DIR"] == str(tmp_path / "runs" / "results")
    for folder in ("jobs", "results"):
        assert os.stat(tmp_path / "runs" / folder).st_uid == int(env["FEDLLM_UID"])
    # The containers' user can read the kits (private keys are 0600).
    key = kits.site("site-1") / "startup" / "client.key"
    assert os.stat(key).st_uid == int(env["FEDLLM_UID"])
    assert (kits.prod_dir.parent / "current").resolve() == kits.prod_dir.resolve()


def test_sites_get_a_registration_healthcheck_and_its_component(tmp_path: Path):
    cfg = load_site_config(write_yaml(tmp_path / "site.yaml", local_config_dict()))
    kits = provision(cfg, tmp_path / "ws", source="site.yaml", data_root=tmp_path)
    services = _load(kits.prod_dir / "compose" / "compose.yaml")["services"]
    for site in cfg.site_names:
        health = services[site]["healthcheck"]
        assert health["test"][:3] == ["CMD", "python3", "-c"] and "fedllm_registered" in health["test"][3]
        resources = json.loads((kits.site(site) / "local" / "resources.json.default").read_text())
        (marker,) = [c for c in resources["components"] if c["path"].endswith("RegistrationMarker")]
        assert marker["args"] == {"file_name": "fedllm_registered"}
    assert "healthcheck" not in services["admin"]


def test_a_gpu_edit_changes_the_kit_digest_of_that_site_only(tmp_path: Path):
    data = local_config_dict(gpus=[[0], [1], [2]])
    cfg_path = write_yaml(tmp_path / "site.yaml", data)
    first = provision(load_site_config(cfg_path), tmp_path / "ws", source="site.yaml", data_root=tmp_path)
    data["sites"][1]["gpus"] = [3]
    cfg_path = write_yaml(tmp_path / "site.yaml", data)
    second = provision(load_site_config(cfg_path), tmp_path / "ws", source="site.yaml", data_root=tmp_path)

    def digests(kits) -> dict[str, str]:
        services = _load(kits.prod_dir / "compose" / "compose.yaml")["services"]
        return {n: s["labels"][KIT_DIGEST_LABEL] for n, s in services.items() if "labels" in s}

    before, after = digests(first), digests(second)
    assert set(before) == {"localhost", "site-1", "site-2", "site-3"}
    assert {n for n in before if before[n] != after[n]} == {"site-2"}
    assert after["site-2"] == kit_digest(second.site("site-2"))  # the label is the kit as it lies in prod_NN
