"""Shared steps of the docker tests: provision a compose federation into a temporary folder."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from fedllm.config import load_site_config
from fedllm.provision import Kits, provision
from fedllm.training.demo_mlp import write_demo_data
from tests.conftest import free_port_range, free_ports, write_yaml
from tests.docker.conftest import run

GPUS = [[0, 1], [2, 3], [4, 5]]


def compose_config_dict(project: str | None = None, gpus: list[list[int]] = GPUS) -> dict:
    fl_port, admin_port = free_ports(2)
    return {
        "project": project or f"ci-{secrets.token_hex(3)}",
        "server": {
            "name": "server",
            "fed_learn_port": fl_port,
            "admin_port": admin_port,
            "job_ports": free_port_range(),
        },
        "admins": [{"name": "admin@nvidia.com"}],
        "sites": [{"name": f"site-{i + 1}", "gpus": g} for i, g in enumerate(gpus)],
    }


def provision_compose(root: Path, data: dict, with_demo_data: bool = False) -> Kits:
    cfg_path = write_yaml(root / "site.yaml", data)
    cfg = load_site_config(cfg_path)
    if with_demo_data:
        write_demo_data([root / "data" / s for s in cfg.site_names], root / "data" / "val.npz")
    return provision(cfg, root / "workspace", source="site.yaml", data_root=root)


def compose(kits: Kits, *args: str, accelerator: str = "gpu", timeout: float = 600, check: bool = True, image=None):
    """`docker compose` in the kits' compose folder with the base file and the chosen overlay."""
    env = {**os.environ, "COMPOSE_FILE": f"compose.yaml:compose.{accelerator}.yaml"}
    if image:
        env["FEDLLM_IMAGE"] = image
    return run(["docker", "compose", *args], timeout=timeout, check=check, cwd=kits.prod_dir / "compose", env=env)


def rendered(kits: Kits, accelerator: str = "gpu") -> dict:
    return json.loads(compose(kits, "--profile", "admin", "config", "--format", "json", accelerator=accelerator).stdout)
