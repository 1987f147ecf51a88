"""The image's entrypoint stages a read-only kit into the writable workspace (no docker needed)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from fedllm.config import load_site_config
from fedllm.provision import provision
from fedllm.runtime.container import (
    ContainerEntryError,
    check_admin_user,
    configure_console,
    site_facts,
    stage_workspace,
)
from tests.support.sites import local_config_dict, write_yaml


def test_stage_workspace_copies_kit_and_keeps_the_kit_untouched(tmp_path: Path):
    cfg = load_site_config(write_yaml(tmp_path / "site.yaml", local_config_dict(gpus=[[0, 1], [2], []])))
    kits = provision(cfg, tmp_path / "ws", source="site.yaml", data_root=tmp_path)
    kit = kits.site("site-1")
    before = sorted(p.relative_to(kit) for p in kit.rglob("*"))
    ws = stage_workspace(kit, tmp_path / "run")
    assert (ws / "startup" / "client.key").read_bytes() == (kit / "startup" / "client.key").read_bytes()
    assert stat.S_IMODE(os.stat(ws / "startup").st_mode) == 0o700
    assert (ws / "local" / "resources.json.default").is_file() and (ws / "transfer").is_dir()
    assert sorted(p.relative_to(kit) for p in kit.rglob("*")) == before
    # Staging again (a container restart) replaces the copy instead of failing.
    stage_workspace(kit, tmp_path / "run")
    facts = site_facts(kit)
    assert facts["gpus"] == [0, 1] and facts["name"] == "site-1" and facts["workload"] == "none"


def test_stage_workspace_without_a_kit_says_what_to_mount(tmp_path: Path):
    with pytest.raises(ContainerEntryError, match="mount the participant's kit"):
        stage_workspace(tmp_path / "nothing", tmp_path / "run")


def test_the_console_logs_in_by_certificate_and_uses_the_shared_folders(tmp_path: Path):
    """What NVFlare's own admin-config loader makes of the staged kit (the console reads the same)."""
    from nvflare.apis.workspace import Workspace
    from nvflare.fuel.hci.client.config import secure_load_admin_config

    cfg = load_site_config(write_yaml(tmp_path / "site.yaml", local_config_dict()))
    kits = provision(cfg, tmp_path / "ws", source="site.yaml", data_root=tmp_path)
    staged = stage_workspace(kits.admin(), tmp_path / "run" / "admin-kit")
    jobs, results = tmp_path / "runs" / "jobs", tmp_path / "runs" / "results"
    configure_console(staged, jobs, results)

    admin = secure_load_admin_config(Workspace(root_dir=str(staged))).get_admin_config()
    assert admin["uid_source"] == "cert"  # NVFlare's AdminClient asks for no user name
    assert (admin["upload_dir"], admin["download_dir"]) == (str(jobs), str(results))
    # The kit itself keeps NVFlare's defaults.
    assert json.loads((kits.admin() / "startup" / "fed_admin.json").read_text())["admin"]["uid_source"] == "user_input"

    # Folders that are not mounted: the kit's own transfer/ stays.
    other = stage_workspace(kits.admin(), tmp_path / "run2")
    configure_console(other, tmp_path / "absent", tmp_path / "absent")
    admin = secure_load_admin_config(Workspace(root_dir=str(other))).get_admin_config()
    assert admin["upload_dir"] == admin["download_dir"] == str(other / "transfer")


def test_a_wrong_admin_name_is_one_clear_error(tmp_path: Path, monkeypatch):
    cfg = load_site_config(write_yaml(tmp_path / "site.yaml", local_config_dict()))
    kits = provision(cfg, tmp_path / "ws", source="site.yaml", data_root=tmp_path)
    monkeypatch.delenv("FEDLLM_ADMIN_USER", raising=False)
    assert check_admin_user(kits.admin()) == cfg.admin.name
    monkeypatch.setenv("FEDLLM_ADMIN_USER", "someone@else.org")
    with pytest.raises(ContainerEntryError, match=r"FEDLLM_ADMIN_USER is 'someone@else.org' but the admin kit"):
        check_admin_user(kits.admin())
