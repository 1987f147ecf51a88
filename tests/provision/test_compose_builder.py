"""ComposeBuilder output read as YAML (no docker needed; tests/docker render it with Compose itself)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from fedllm.config import load_site_config
from fedllm.provision import provision
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
    assert site2["volumes"][:2] == ["../site-2:/fedllm/kit:ro", f"{tmp_path / 'data' / 'site-2'}:/fedllm/data:ro"]
    assert base["services"]["admin"]["profiles"] == ["admin"]
    assert set(base["volumes"]) == {f"{n}-workspace" for n in ("localhost", "site-1", "site-2", "site-3", "admin")}

    assert gpu["services"]["site-1"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["0", "1"]
    assert gpu["services"]["site-2"]["environment"]["NVIDIA_VISIBLE_DEVICES"] == "2"
    assert "deploy" not in gpu["services"]["site-3"]  # a CPU site reserves no GPU
    assert all(s["environment"]["FEDLLM_SKIP_GPU_PREFLIGHT"] == "1" for s in cpu["services"].values())

    env = dict(line.split("=", 1) for line in (bundle / ".env").read_text().splitlines())
    assert env["FEDLLM_IMAGE"] == "registry.example.org/fedllm:2"
    assert env["COMPOSE_FILE"] == "compose.yaml:compose.gpu.yaml"
    # The containers' user can read the kits (private keys are 0600).
    key = kits.site("site-1") / "startup" / "client.key"
    assert os.stat(key).st_uid == int(env["FEDLLM_UID"])
    assert (kits.prod_dir.parent / "current").resolve() == kits.prod_dir.resolve()
