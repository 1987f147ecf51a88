"""A real federation on loopback: NVFlare server and 3 sites from provisioned mTLS kits."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedllm.config import load_site_config
from fedllm.provision import Kits, provision
from fedllm.runtime import native
from fedllm.training.demo_mlp import write_demo_data
from tests.conftest import local_config_dict, write_yaml


@pytest.fixture(scope="package")
def federation(tmp_path_factory) -> Kits:
    """Provision, start and (after the package's tests) stop a 3-site native federation."""
    root = tmp_path_factory.mktemp("federation")
    cfg = load_site_config(write_yaml(root / "site.yaml", local_config_dict(project="fedtest")))
    write_demo_data([root / "data" / s for s in cfg.site_names], root / "data" / "val.npz")
    kits = provision(cfg, root / "ws", source="site.yaml", data_root=root)
    native.up(kits, timeout=120, echo=lambda _m: None)
    yield kits
    native.down(kits, echo=lambda _m: None)
    assert not any(native.status(kits).values()), "federation processes survived `down`"


@pytest.fixture(scope="package")
def data_root(federation: Kits) -> Path:
    return federation.prod_dir.parents[2]
