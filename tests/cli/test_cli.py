"""The `fedllm` command line: exit codes and the messages users see."""

from __future__ import annotations

import json
from pathlib import Path

from fedllm.cli.main import main
from tests.support.sites import local_config_dict, write_yaml


def test_validate_ok(local_config: Path, capsys) -> None:
    assert main(["validate", "-c", str(local_config)]) == 0
    assert "OK" in capsys.readouterr().out


def test_validate_reports_every_problem_and_exits_1(tmp_path: Path, capsys) -> None:
    data = local_config_dict()
    data["sites"][1]["name"] = "site-1"
    data["sites"][2]["gpus"] = [-1]
    path = write_yaml(tmp_path / "bad.yaml", data)
    assert main(["validate", "-c", str(path)]) == 1
    err = capsys.readouterr().err
    assert "2 problem(s) in site config" in err
    assert "duplicate site name 'site-1'" in err and "sites[2].gpus[0]" in err


def test_provision_then_create_a_job(local_config: Path, tmp_path: Path, capsys) -> None:
    ws = tmp_path / "ws"
    assert main(["provision", "-c", str(local_config), "-w", str(ws)]) == 0
    assert "provisioned 3 sites" in capsys.readouterr().out
    assert (ws / "fedtest" / "prod_00" / "site-1" / "startup" / "client.crt").is_file()

    out = tmp_path / "jobs"
    args = [
        "job",
        "create",
        "demo-mlp",
        "--mode",
        "fedavg",
        "--rounds",
        "2",
        "--out",
        str(out),
        "-c",
        str(local_config),
    ]
    assert main(args) == 0
    meta = json.loads((out / "demo-mlp-fedavg-3sites" / "meta.json").read_text())
    assert meta["min_clients"] == 3


def test_job_create_rejects_a_bad_mode(tmp_path: Path, capsys) -> None:
    assert main(["job", "create", "demo-mlp", "--mode", "swarm", "--out", str(tmp_path)]) == 2
    assert "not a mode" in capsys.readouterr().err


def test_up_without_kits_says_to_provision(local_config: Path, tmp_path: Path, capsys) -> None:
    assert main(["up", "--native", "-c", str(local_config), "-w", str(tmp_path / "empty")]) == 1
    assert "run `fedllm provision" in capsys.readouterr().err


def test_submit_refuses_a_folder_that_is_not_a_job(local_config: Path, tmp_path: Path, capsys) -> None:
    ws = tmp_path / "ws"
    assert main(["provision", "-c", str(local_config), "-w", str(ws)]) == 0
    assert main(["job", "submit", str(tmp_path), "-c", str(local_config), "-w", str(ws)]) == 1
    assert "not an NVFlare job folder" in capsys.readouterr().err


def test_job_create_names_what_to_type_in_the_admin_console(tmp_path: Path, monkeypatch, capsys) -> None:
    """Provisioned from tmp_path, the console's jobs folder is tmp_path/runs/jobs (FEDLLM_JOBS_DIR in .env)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEDLLM_JOBS_DIR", raising=False)
    config = write_yaml(tmp_path / "site.yaml", local_config_dict())
    assert main(["provision", "-c", str(config), "-w", "ws"]) == 0
    create = ["job", "create", "demo-mlp", "--rounds", "2", "-c", str(config), "-w", "ws"]
    capsys.readouterr()

    assert main([*create, "--out", "runs/jobs"]) == 0
    out = capsys.readouterr().out
    assert "created runs/jobs/demo-mlp-fedavg-3sites" in out
    assert "submit_job demo-mlp-fedavg-3sites" in out
    assert "fedllm job submit runs/jobs/demo-mlp-fedavg-3sites --download runs/results" in out

    assert main([*create, "--out", "elsewhere"]) == 0
    out = capsys.readouterr().out
    assert "submit_job" not in out.replace("submit_job reads", "")
    assert "cannot see it (submit_job reads runs/jobs only); to submit it there, create it with --out runs/jobs" in out

    # In the admin container FEDLLM_JOBS_DIR is the console's folder there, and no site config is needed.
    monkeypatch.setenv("FEDLLM_JOBS_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("FEDLLM_HOST_JOBS_DIR", "/srv/fl/runs/jobs")
    assert main(["job", "create", "demo-mlp", "--out", "elsewhere", "--name", "in-admin", "-w", "no-workspace"]) == 0
    out = capsys.readouterr().out
    assert "submit_job in-admin" in out and "on the host: /srv/fl/runs/jobs/in-admin" in out
    assert "--download /fedllm/results" in out


def test_data_demo_writes_every_sites_data_dir(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    data = local_config_dict()
    data["sites"][2]["data_dir"] = str(tmp_path / "elsewhere" / "s3")
    config = write_yaml(tmp_path / "site.yaml", data)
    assert main(["data", "demo", "-c", str(config), "--per-site", "40"]) == 0
    for site_dir in (tmp_path / "data" / "site-1", tmp_path / "data" / "site-2", tmp_path / "elsewhere" / "s3"):
        import numpy as np

        with np.load(site_dir / "train.npz") as train, np.load(site_dir / "val.npz") as val:
            assert len(train["y"]) == 40 and len(val["y"]) > 0
    assert "wrote data/site-1/train.npz" in capsys.readouterr().out
