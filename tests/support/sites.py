"""Site configs for tests, written on the fly with ports free right now."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import yaml

from fedllm.apps.local_federation import free_port_range, free_ports, loopback_config_dict

__all__ = ["environment", "free_port_range", "free_ports", "local_config_dict", "write_yaml"]


def local_config_dict(project: str = "fedtest", sites: int = 3, gpus: list[list[int]] | None = None) -> dict:
    """A valid one-machine site config: `sites` sites (GPU ids per site, none by default) and free ports."""
    return loopback_config_dict(project, sites, gpus=gpus)


def write_yaml(path: Path, data: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`values` set in os.environ (processes started meanwhile inherit them), then every key restored or removed."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
