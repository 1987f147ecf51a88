"""The image's entrypoint stages a read-only kit into the writable workspace (no docker needed)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fedllm.config import load_site_config
from fedllm.provision import provision
from fedllm.runtime.container import ContainerEntryError, site_facts, stage_workspace
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
