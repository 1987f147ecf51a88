"""Shared steps of the docker tests: run commands, provision a compose federation into a temporary folder."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path

import pytest

from fedllm.config import load_site_config
from fedllm.provision import Kits, provision
from fedllm.training.toy.demo_mlp import write_demo_data
from tests.support.sites import free_port_range, free_ports, write_yaml

REPO = Path(__file__).resolve().parents[2]
TEST_IMAGE = os.environ.get("FEDLLM_TEST_IMAGE", "fedllm:test")
TEST_BASE = "fedllm-test-base"
# Image builds and `docker compose up` need several GB; helpers and CI runs take turns through this lock.
HEAVY_LOCK = "/tmp/fedllm-heavy.lock"


def run(cmd: list[str], timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


GPUS = [[0, 1], [2, 3], [4, 5]]


def compose_config_dict(project: str | None = None, gpus: list[list[int]] = GPUS) -> dict:
    fl_port, admin_port = free_ports(2)
    return {
        "project": project or f"ci-{secrets.token_hex(3)}",
        "server": {
            "name": "server",
            "fed_learn_port": fl_port,
            "admin_port": admin_port,
            "job_ports": free_port_range(avoiding=(fl_port, admin_port)),
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


def root_compose_env(kits: Kits, image: str | None = None, accelerator: str = "cpu") -> dict[str, str]:
    """The environment under which the repository's root compose.yaml runs these kits (the README's commands)."""
    env = {
        **os.environ,
        "FEDLLM_WORKSPACE": str(kits.prod_dir.parent.parent),
        "FEDLLM_PROJECT": kits.config.project,
        "FEDLLM_ACCELERATOR": accelerator,
    }
    env.pop("COMPOSE_FILE", None)
    if image:
        env["FEDLLM_IMAGE"] = image
    return env


def root_compose(
    kits: Kits, *args: str, image=None, accelerator: str = "cpu", timeout: float = 600, check: bool = True, **kw
):
    """`docker compose ARGS` from the repository root, as an operator types it (CPU overlay unless told)."""
    cmd = ["docker", "compose", "-f", str(REPO / "compose.yaml"), *args]
    env = root_compose_env(kits, image, accelerator)
    return run(cmd, timeout=timeout, check=check, cwd=REPO, env=env, **kw)


def project_resources(project_name: str) -> dict[str, list[str]]:
    """Containers, volumes and networks Docker still holds for a compose project."""
    label = f"label=com.docker.compose.project={project_name}"
    return {
        kind: run(["docker", *cmd, "--filter", label, "-q"]).stdout.split()
        for kind, cmd in (("containers", ["ps", "-a"]), ("volumes", ["volume", "ls"]), ("networks", ["network", "ls"]))
    }


def private_keys_in_volumes(project_name: str, image: str) -> dict[str, list[str]]:
    """Every file holding a PEM private key in each named volume of a compose project (as root, links not followed).

    A volume outlives its containers (`docker compose down` without -v): what it holds stays on the host's disk.
    """
    found = {}
    for volume in project_resources(project_name)["volumes"]:
        proc = run(
            ["docker", "run", "--rm", "--user", "0", "--network", "none", "--entrypoint", "grep",
             "-v", f"{volume}:/volume:ro", image, "-rlI", "--", "PRIVATE KEY-----", "/volume"],
            check=False,
        )  # fmt: skip
        # grep: 0 = found, 1 = nothing found, anything else = it could not read something.
        assert proc.returncode in (0, 1), f"grep over volume {volume} failed: {proc.stderr}"
        found[volume] = proc.stdout.split()
    return found
