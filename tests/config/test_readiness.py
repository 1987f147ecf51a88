"""`fedllm validate` on a host: faults of the file are errors, a host not ready yet for its sites is a warning."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedllm.cli.main import main
from tests.support.sites import write_yaml

CONFIG = """\
project: ready
admins:
  - {name: admin@nvidia.com}
sites:
  - {name: site-1, data_dir: /nonexistent/site-1}
  - {name: site-2}
  - {name: site-3, data_dir: data/three}
  - {name: site-4, host: node-b, data_dir: /nonexistent/site-4}
"""


def test_missing_data_folders_of_this_hosts_sites_are_warnings(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # relative data dirs resolve against the folder fedllm runs in
    config = write_yaml(tmp_path / "site.yaml", CONFIG)
    (tmp_path / "data" / "three").mkdir(parents=True)
    assert main(["validate", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("OK site.yaml: project 'ready'")
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 2, out
    assert warnings[0].startswith(
        "warning: site.yaml:5: sites[0].data_dir: site 'site-1' data folder /nonexistent/site-1 does not exist "
        "on this host. Fix: put the site's data there before it starts (`fedllm data demo -c site.yaml`"
    )
    assert warnings[1].startswith(
        "warning: site.yaml:6: sites[1]: site 'site-2' has no data_dir, and its default data folder data/site-2 "
        "does not exist on this host."
    )
    # site-3's folder is there; site-4's host is another machine: preflight checks it there.
    assert "site-3" not in "".join(warnings) and "site-4" not in "".join(warnings)
    assert "`fedllm preflight` checks them on their hosts: data folders of site-4 (node-b)" in out


@pytest.mark.parametrize("as_file", [False, True])
def test_a_ready_host_gets_no_warning_and_a_file_is_not_a_folder(tmp_path: Path, monkeypatch, capsys, as_file) -> None:
    monkeypatch.chdir(tmp_path)
    config = write_yaml(tmp_path / "site.yaml", "project: ready\nadmins: [{name: a@b.org}]\nsites: [{name: s}]\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "s").write_text("x") if as_file else (tmp_path / "data" / "s").mkdir()
    assert main(["validate", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert ("is not a folder" in out) is as_file and ("warning:" in out) is as_file


def test_a_non_utf8_config_is_a_located_error_for_validate_and_provision(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "site.yaml").write_bytes(b"project: caf\xe9\nadmins: [{name: a@b.org}]\nsites: [{name: s}]\n")
    for args in (["validate"], ["provision", "-w", str(tmp_path / "ws")]):
        assert main([*args, "-c", "site.yaml"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(
            "error: 1 problem(s) in site config site.yaml:\n  - site.yaml:1: not UTF-8 text: byte 0xe9"
        )
    assert not (tmp_path / "ws").exists()
