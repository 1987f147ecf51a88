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
