"""An admin kit on its own (the admin container's view): user name from its certificate, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedllm.config import load_site_config
from fedllm.provision import provision
from fedllm.runtime.admin import AdminError, AdminKit, admin_session
from tests.support.sites import local_config_dict, write_yaml


def test_admin_kit_reads_user_from_certificate_and_names_server(tmp_path: Path):
    data = local_config_dict()
    cfg = load_site_config(write_yaml(tmp_path / "site.yaml", data))
    kits = provision(cfg, tmp_path / "ws", source="site.yaml", data_root=tmp_path)
    kit = AdminKit.open(kits.admin())
    assert kit.username == "admin@nvidia.com"
    assert kit.server_address() == f"localhost:{data['server']['admin_port']}"
    assert AdminKit.open(kits.admin(), "someone@else.org").username == "someone@else.org"
    # Nothing listens on the admin port: the error names the address and what to check.
    expected = f"localhost:{data['server']['admin_port']}.*is the federation up"
    with pytest.raises(AdminError, match=expected), admin_session(kit, timeout=1.0):
        pass


def test_a_site_kit_is_not_an_admin_kit(tmp_path: Path):
    cfg = load_site_config(write_yaml(tmp_path / "site.yaml", local_config_dict()))
    kits = provision(cfg, tmp_path / "ws", source="site.yaml", data_root=tmp_path)
    with pytest.raises(AdminError, match="not an admin startup kit"):
        AdminKit.open(kits.site("site-1"))
