"""`fedllm cert init | request | sign` and `fedllm package`: the distributed path as users type it."""

from __future__ import annotations

import json
from pathlib import Path

from fedllm.cli.main import main
from tests.support.sites import local_config_dict, write_yaml


def test_each_party_runs_its_own_step_and_a_foreign_name_is_refused(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # NVFlare's audit records
    config = write_yaml(tmp_path / "site.yaml", local_config_dict(project="fedcli"))
    admin_ws, site_ws = tmp_path / "project-admin", tmp_path / "site-1"

    assert main(["cert", "init", "-c", str(config), "-w", str(admin_ws)]) == 0
    fingerprint = json.loads((admin_ws / "fedcli" / "ca" / "ca.json").read_text())["rootCA_fingerprint"]
    assert fingerprint in "".join(capsys.readouterr().out.split())  # whatever the terminal width wrapped

    assert main(["cert", "request", "-c", str(config), "--site", "site-1", "-w", str(site_ws)]) == 0
    request_zip = site_ws / "requests" / "site-1" / "site-1.request.zip"
    assert f"send {request_zip}" in capsys.readouterr().out.replace("\n", "")

    signed_zip = admin_ws / "outbox" / "site-1.signed.zip"
    args = ["cert", "sign", str(request_zip), "-c", str(config), "-w", str(admin_ws), "--out", str(signed_zip)]
    assert main(args) == 0
    assert "signed 'site-1' until" in capsys.readouterr().out

    assert main(["package", str(signed_zip), "--fingerprint", fingerprint, "-w", str(site_ws)]) == 0
    out = capsys.readouterr().out
    kit = site_ws / "fedcli" / "prod_00" / "site-1"
    assert "packaged" in out and (kit / "startup" / "client.key").is_file() and "docker compose up -d" in out

    # A requester whose copy of the config has a site the project admin's does not.
    rogue = local_config_dict(project="fedcli")
    rogue["sites"].append({"name": "site-9"})
    rogue_config = write_yaml(tmp_path / "rogue.yaml", rogue)
    assert main(["cert", "request", "-c", str(rogue_config), "-n", "site-9", "-w", str(tmp_path / "site-9")]) == 0
    capsys.readouterr()
    rogue_zip = tmp_path / "site-9" / "requests" / "site-9" / "site-9.request.zip"
    assert main(["cert", "sign", str(rogue_zip), "-c", str(config), "-w", str(admin_ws)]) == 1
    err = capsys.readouterr().err.replace("\n", "")
    assert "site-9.request.zip: refused, nothing was signed: 'site-9' is not in" in err and "Fix:" in err
    assert not rogue_zip.with_name("site-9.signed.zip").exists()
