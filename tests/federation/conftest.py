"""A real federation on loopback: NVFlare server and 3 sites from provisioned mTLS kits."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedllm.apps.local_federation import local_federation
from fedllm.config import load_site_config
from fedllm.provision import Kits
from fedllm.runtime import native
from fedllm.training.toy.demo_mlp import write_demo_data
from tests.support.sites import local_config_dict, write_yaml


@pytest.fixture(scope="package")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("federation")


@pytest.fixture(scope="package")
def federation(data_root: Path) -> Kits:
    """Provision, start and (after the package's tests) stop a 3-site native federation; its kits."""
    cfg = load_site_config(write_yaml(data_root / "site.yaml", local_config_dict(project="fedtest")))
    write_demo_data([data_root / "data" / s for s in cfg.site_names], data_root / "data" / "val.npz")
    with local_federation(cfg, data_root / "ws", data_root=data_root, source="site.yaml", echo=lambda _m: None) as fed:
        yield fed.kits
    assert not any(native.status(fed.kits).values()), "federation processes survived `down`"
