"""Shared fixtures: site configs written on the fly, with free loopback ports."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest
import yaml


def free_ports(n: int) -> list[int]:
    """Ports nothing listens on right now (bound together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_range(n: int = 4) -> str:
    """'first-last': n consecutive ports nothing listens on now, below Linux's ephemeral range."""
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20000, 32000)
        socks = []
        try:
            for port in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("", port))
            return f"{first}-{first + n - 1}"
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports found")


def local_config_dict(project: str = "fedtest", sites: int = 3, gpus: list[list[int]] | None = None) -> dict:
    fl_port, admin_port = free_ports(2)
    return {
        "project": project,
        "nvflare_version": "2.9.0",
        "server": {
            "name": "localhost",
            "fed_learn_port": fl_port,
            "admin_port": admin_port,
            "job_ports": free_port_range(),
        },
        "admins": [{"name": "admin@nvidia.com", "org": "nvidia", "role": "project_admin"}],
        "sites": [{"name": f"site-{i + 1}", "org": "nvidia", "gpus": (gpus[i] if gpus else [])} for i in range(sites)],
    }


def write_yaml(path: Path, data: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def local_config(tmp_path: Path) -> Path:
    """A valid 3-site, one-machine site config file with free ports."""
    return write_yaml(tmp_path / "site.yaml", local_config_dict())
