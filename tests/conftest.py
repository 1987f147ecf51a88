"""Shared fixtures: site configs written on the fly, with free loopback ports."""

from __future__ import annotations

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


def local_config_dict(project: str = "fedtest", sites: int = 3, gpus: list[list[int]] | None = None) -> dict:
    fl_port, admin_port = free_ports(2)
    return {
        "project": project,
        "nvflare_version": "2.9.0",
        "server": {"name": "localhost", "fed_learn_port": fl_port, "admin_port": admin_port},
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
