"""The compose files provisioning writes, as Compose v2 itself renders them (`docker compose config`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from tests.support.compose import GPUS, REPO, compose_config_dict, provision_compose, rendered, root_compose, run

# The image build pip-installs NVFlare and fedllm's dependencies from PyPI.
pytestmark = [pytest.mark.docker, pytest.mark.network]


def _binds(service: dict) -> dict[str, tuple[str, bool]]:
    return {v["target"]: (v["source"], v.get("read_only", False)) for v in service["volumes"] if v["type"] == "bind"}


def test_each_site_is_pinned_to_its_gpus_and_follows_a_gpu_edit(docker_engine, tmp_path: Path):
    data = compose_config_dict()
    kits = provision_compose(tmp_path, data)
    services = rendered(kits)["services"]
    for i, gpus in enumerate(GPUS):
        site = services[f"site-{i + 1}"]
        (device,) = site["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert device["device_ids"] == [str(g) for g in gpus]
        assert site["environment"]["NVIDIA_VISIBLE_DEVICES"] == ",".join(map(str, gpus))
        assert site["shm_size"] in ("16g", "17179869184", 17179869184)
        assert site["ulimits"]["memlock"] in (-1, {"soft": -1, "hard": -1})
        assert site["ulimits"]["stack"] in (67108864, {"soft": 67108864, "hard": 67108864})
        assert site["init"] is True and site["depends_on"]["server"]["condition"] == "service_healthy"
    assert services["admin"]["profiles"] == ["admin"]
    assert "healthcheck" in services["server"]

    # Move site-2 to other GPUs: edit the config, re-provision, and compose follows.
    labels = {acc: _kit_labels(rendered(kits, acc)) for acc in ("gpu", "cpu")}
    data["sites"][1]["gpus"] = [6, 7]
    kits = provision_compose(tmp_path, data)
    (device,) = rendered(kits)["services"]["site-2"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["device_ids"] == ["6", "7"]
    # Under either overlay exactly site-2's service definition changes (its kit digest), so `up -d`
    # recreates it and nothing else (tests/docker/test_compose_federation.py runs that).
    for acc, before in labels.items():
        after = _kit_labels(rendered(kits, acc))
        assert {s for s in before if before[s] != after[s]} == {"site-2"}, acc


def _kit_labels(config: dict) -> dict[str, str]:
    return {n: s["labels"]["fedllm.kit-digest"] for n, s in config["services"].items() if n != "admin"}


def test_each_container_mounts_only_its_own_kit_and_data(docker_engine, tmp_path: Path):
    kits = provision_compose(tmp_path, compose_config_dict())
    services = rendered(kits)["services"]
    prod = kits.prod_dir.resolve()
    participants = {"server": "server", "admin": "admin@nvidia.com", **{s: s for s in kits.config.site_names}}
    for service, participant in participants.items():
        binds = _binds(services[service])
        kit_source, read_only = binds["/fedllm/kit"]
        assert Path(kit_source).resolve() == prod / participant and read_only
        # Nothing else from the prod dir (another participant's kit) is mounted.
        others = [s for t, (s, _) in binds.items() if t != "/fedllm/kit" and Path(s).resolve().is_relative_to(prod)]
        assert others == [], f"{service} mounts {others}"
    for site in kits.config.sites:
        source, read_only = _binds(services[site.name])["/fedllm/data"]
        assert Path(source) == site.data_path(tmp_path) and read_only


def test_cpu_overlay_drops_gpus_and_memlock(docker_engine, tmp_path: Path):
    kits = provision_compose(tmp_path, compose_config_dict())
    for name, site in rendered(kits, accelerator="cpu")["services"].items():
        if not name.startswith("site-"):
            continue
        assert "deploy" not in site and "memlock" not in site.get("ulimits", {})
        assert site["environment"]["FEDLLM_SKIP_GPU_PREFLIGHT"] == "1"


def test_repository_root_compose_file_includes_the_newest_provisioning(docker_engine, tmp_path: Path):
    data = compose_config_dict()
    kits = provision_compose(tmp_path, data)
    env = {**os.environ, "FEDLLM_WORKSPACE": str(tmp_path / "workspace"), "FEDLLM_PROJECT": data["project"]}
    out = run(["docker", "compose", "-f", str(REPO / "compose.yaml"), "config"], cwd=REPO, env=env).stdout
    services = yaml.safe_load(out)["services"]
    assert set(services) == {"server", "site-1", "site-2", "site-3"}  # admin waits behind its profile
    assert (kits.prod_dir.parent / "current").resolve() == kits.prod_dir.resolve()
    # CPU through the same root file
    env["FEDLLM_ACCELERATOR"] = "cpu"
    out = run(["docker", "compose", "-f", str(REPO / "compose.yaml"), "config"], cwd=REPO, env=env).stdout
    assert "deploy" not in yaml.safe_load(out)["services"]["site-1"]


def test_multi_host_federation_gets_one_compose_bundle_per_host(docker_engine, tmp_path: Path):
    data = compose_config_dict(gpus=[[0, 1], [0, 1], [2, 3]])
    data["server"].update({"name": "fl.example.org", "host": "fl-head"})
    data["sites"][0]["host"] = "fl-head"
    data["sites"][1]["host"] = "gpu-node-2"  # the same GPU indices on another machine are its own GPUs
    data["sites"][2]["host"] = "gpu-node-2"
    kits = provision_compose(tmp_path, data)

    head = rendered(kits)["services"]
    assert set(head) == {"fl-example-org", "site-1", "admin"}
    assert head["fl-example-org"]["networks"]["default"]["aliases"] == ["fl.example.org"]

    node_dir = kits.prod_dir / "hosts" / "gpu-node-2"
    out = run(["docker", "compose", "config", "--format", "json"], cwd=node_dir).stdout
    node = yaml.safe_load(out)["services"]
    assert set(node) == {"site-2", "site-3"}
    for name, gpus in (("site-2", ["0", "1"]), ("site-3", ["2", "3"])):
        (device,) = node[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["device_ids"] == gpus
        assert "depends_on" not in node[name]  # the server is on another machine
        assert Path(_binds(node[name])["/fedllm/kit"][0]).resolve() == (kits.prod_dir / name).resolve()


def test_under_the_gpu_overlay_up_recreates_only_the_moved_site(fedllm_image, tmp_path: Path):
    """What compose plans for existing GPU-overlay containers after a GPU edit (`create` needs no GPU)."""
    data = compose_config_dict(gpus=[[0], [1], [2]])
    kits = provision_compose(tmp_path, data, with_demo_data=True)
    root_compose(kits, "create", image=fedllm_image, accelerator="gpu")
    try:
        data["sites"][1]["gpus"] = [5]
        kits = provision_compose(tmp_path, data)
        plan = root_compose(kits, "up", "-d", "--dry-run", image=fedllm_image, accelerator="gpu", check=False)
        recreated = set(re.findall(r"Container (\S+)\s+Recreate\b", plan.stdout + plan.stderr))
        assert recreated == {f"fedllm-{data['project']}-site-2-1"}, plan.stdout + plan.stderr
    finally:
        root_compose(kits, "down", "-v", accelerator="gpu", check=False)
