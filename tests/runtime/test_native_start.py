"""`native.up` with real NVFlare processes: a participant that dies is reported at once, relative paths work."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from fedllm.config import load_site_config
from fedllm.provision import provision
from fedllm.runtime import native
from tests.support.sites import local_config_dict, write_yaml

pytestmark = pytest.mark.federation


def test_a_server_that_dies_at_start_is_reported_within_seconds_with_its_log(tmp_path: Path) -> None:
    cfg = load_site_config(write_yaml(tmp_path / "site.yaml", local_config_dict(sites=1)))
    kits = provision(cfg, tmp_path / "ws", source="site.yaml", data_root=tmp_path)
    (kits.server() / "startup" / "fed_server.json").write_text('{"servers": [')  # a damaged kit: NVFlare exits
    t0 = time.monotonic()
    with pytest.raises(native.NativeRuntimeError) as failed:
        native.up(kits, timeout=120, echo=lambda _m: None)
    took = time.monotonic() - t0
    assert took < 30, f"up noticed the dead server after {took:.0f}s (its connect timeout, not the process)"
    message = str(failed.value)
    assert message.startswith(f"'localhost' exited during start-up; last lines of {native.run_dir(kits)}/logs/")
    assert "JSONDecodeError" in message  # the tail of the server's own log says why
    # What up started is stopped again, and nothing is recorded as running.
    assert native.read_state(kits) == []


def test_kits_given_with_relative_paths_start_as_from_absolute_ones(tmp_path: Path, monkeypatch) -> None:
    """NVFlare runs each participant inside its kit: a path relative to where `up` ran means nothing there."""
    monkeypatch.chdir(tmp_path)
    cfg = load_site_config(write_yaml(tmp_path / "site.yaml", local_config_dict(sites=1)))
    kits = provision(cfg, Path("ws"), source="site.yaml", data_root=tmp_path)
    relative = dataclasses.replace(kits, prod_dir=kits.prod_dir.relative_to(tmp_path))
    assert not relative.prod_dir.is_absolute()
    procs = native.up(relative, timeout=120, echo=lambda _m: None)
    try:
        assert all(p.log.is_absolute() and p.log.is_file() for p in procs)
        assert all(p.log.is_absolute() for p in native.read_state(relative))
        # The server's job store is in its own workspace, named absolutely (NVFlare resolves it in the kit).
        resources = json.loads((kits.server() / "local" / "resources.json").read_text())
        (manager,) = [c for c in resources["components"] if c["id"] == "job_manager"]
        assert manager["args"]["uri_root"] == str(kits.server() / "jobs-storage")
        assert native.status(relative) == {"localhost": True, "site-1": True}
    finally:
        native.down(relative, echo=lambda _m: None)
    assert native.status(kits) == {}
