"""Each participant of a distributed federation starts its own kit natively, from its own folder (docs/security.md).

The project admin makes the root CA and signs; the server, two sites and a lead each request a certificate and
package their kit in their own folder. Then, typed in each participant's folder with the default, relative
`-w workspace` as the docs write them: the server and each site run `fedllm up` where their kit is, the lead
submits the demo job from its folder, and `status` and `down` in a site's folder concern that site alone.

    root/project-admin/            site.yaml, ca/ (the root CA), the request zips it signs
    root/<participant>/            site.yaml, workspace/requests/<name>/ (its key), workspace/<project>/prod_00/<name>/
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from fedllm.config import load_site_config
from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.template import load_template
from fedllm.provision.distributed import init_ca, package_kit, request_certificate, sign_request
from fedllm.results.metrics import read_round_metrics
from fedllm.training.toy.demo_mlp import write_demo_data
from tests.support.sites import local_config_dict, write_yaml

pytestmark = pytest.mark.federation

FEDLLM = str(Path(sys.executable).parent / "fedllm")
LEAD = "lead@orga.com"


def _fedllm(folder: Path, *args: str, env: dict[str, str], timeout: float = 300) -> str:
    proc = subprocess.run([FEDLLM, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"fedllm {' '.join(args)} in {folder.name}/ exited {proc.returncode}:\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc.stdout


def _pids(folder: Path, project: str) -> list[int]:
    """The processes `fedllm up` recorded in this participant's workspace."""
    import json

    state = folder / "workspace" / project / "run" / "native.json"
    return [p["pid"] for p in json.loads(state.read_text())["processes"]] if state.is_file() else []


def test_server_and_sites_each_start_their_own_kit_and_run_a_job(tmp_path: Path) -> None:
    data = local_config_dict(project="fedparts", sites=2)
    data["admins"] = [{"name": LEAD, "org": "nvidia", "role": "lead"}]
    config = write_yaml(tmp_path / "site.yaml", data)
    server, sites = "localhost", ["site-1", "site-2"]
    names = [server, *sites, LEAD]
    env = {**os.environ, "HOME": str(tmp_path / "home")}  # NVFlare's own records (~/.nvflare)

    # Distributed provisioning as `fedllm cert init | request | sign` and `fedllm package` do it (their commands
    # are tested in tests/cli/test_cert_cli.py): each key made and kept in its participant's folder, relative
    # data dirs resolved there, only the zips travelling.
    cfg = load_site_config(config)
    ca = init_ca(cfg, tmp_path / "project-admin" / "ca")
    homes = {name: tmp_path / name for name in names}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", env["HOME"])
        for name, home in homes.items():
            home.mkdir()
            shutil.copy(config, home / "site.yaml")  # everyone holds the same site config
            req = request_certificate(cfg, name, home / "workspace" / "requests" / name, source="site.yaml",
                                      data_root=home)  # fmt: skip
            signed = sign_request(cfg, Path(shutil.copy(req.request_zip, ca.ca_dir.parent)), ca.ca_dir)
            package_kit(Path(shutil.copy(signed.signed_zip, home)), req.request_dir, home / "workspace", ca.fingerprint)
    write_demo_data([homes[site] / "data" / site for site in sites], per_site=60)  # each in its own folder

    # An admin's folder holds nothing to start.
    refused = subprocess.run(
        [FEDLLM, "up", "-c", "site.yaml"], cwd=homes[LEAD], env=env, capture_output=True, text=True
    )
    assert refused.returncode == 1 and f"only the admin kit of {LEAD}" in refused.stderr, refused.stderr

    started: list[int] = []
    try:
        out = _fedllm(homes[server], "up", "-c", "site.yaml", env=env)
        assert f"started server '{server}'" in out and f"server '{server}' listening" in out, out
        started += _pids(homes[server], "fedparts")
        for site in sites:
            out = _fedllm(homes[site], "up", "-c", "site.yaml", env=env)
            assert f"started site '{site}'" in out and "server" not in out.split("\n")[0], out
            assert f"{site} registered with the server localhost:{data['server']['fed_learn_port']}" in out, out
            started += _pids(homes[site], "fedparts")
        assert len(started) == 3

        # In site-1's folder: site-1 runs and is registered; the server runs elsewhere, and answers.
        status = _fedllm(homes["site-1"], "status", "-c", "site.yaml", env=env)
        rows = {line.split()[0]: line for line in status.splitlines()[1:]}
        assert "running (pid" in rows["site-1"] and rows["site-1"].endswith("registered"), status
        assert "not started here" in rows[server] and "reachable" in rows[server], status
        assert "not started here" in rows["site-2"] and "registration unknown here" in rows["site-2"], status

        # The lead submits from its own folder, with its own kit.
        spec = resolve_spec(load_template("demo-mlp"), "fedavg", num_clients=2, rounds=2)
        create_job(spec, homes[LEAD] / "runs" / "jobs")
        out = _fedllm(homes[LEAD], "job", "submit", "runs/jobs/demo-mlp-fedavg-2sites", "-c", "site.yaml",
                      "--download", "runs/results", env=env)  # fmt: skip
        assert "FINISHED:COMPLETED" in out, out
        (result,) = (homes[LEAD] / "runs" / "results").iterdir()
        assert [set(r["sites"]) for r in read_round_metrics(result)] == [set(sites)] * 2

        # `down` in site-2's folder stops site-2 alone.
        out = _fedllm(homes["site-2"], "down", "-c", "site.yaml", env=env)
        assert "stopping site-2 (the rest of the federation does not run from here)" in out, out
        assert _pids(homes["site-2"], "fedparts") == []
        assert all(psutil.pid_exists(p) for p in _pids(homes[server], "fedparts") + _pids(homes["site-1"], "fedparts"))
        for name in (server, "site-1"):
            _fedllm(homes[name], "down", "-c", "site.yaml", env=env)
    finally:
        for name in (server, *sites):
            subprocess.run([FEDLLM, "down", "-c", "site.yaml"], cwd=homes[name], env=env, capture_output=True)
    assert not [p for p in started if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
