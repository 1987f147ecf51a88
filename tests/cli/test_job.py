"""`fedllm job create` and `fedllm job args`: sized by the site config, checked, one-line errors, nothing replaced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.cli_fuzz import assert_clean, run_cli
from tests.support.sites import local_config_dict, write_yaml


@pytest.fixture(autouse=True)
def _here(tmp_path: Path, monkeypatch) -> None:
    """Run in an empty folder: no site_configs/default.yaml, no provisioned workspace, no env overrides."""
    monkeypatch.chdir(tmp_path)
    for name in ("FEDLLM_CONFIG", "FEDLLM_WORKSPACE", "FEDLLM_JOBS_DIR", "FEDLLM_HOST_JOBS_DIR"):
        monkeypatch.delenv(name, raising=False)


def _config(tmp_path: Path, sites: int, gpus: list[list[int]] | None = None) -> str:
    return str(write_yaml(tmp_path / f"sites{sites}.yaml", local_config_dict(sites=sites, gpus=gpus)))


def _min_clients(job: Path) -> int:
    return json.loads((job / "meta.json").read_text())["min_clients"]


def test_every_site_of_the_site_config_trains_by_default(tmp_path: Path) -> None:
    outcome = run_cli(["job", "create", "demo-mlp", "-c", _config(tmp_path, 2), "--out", "jobs"])
    assert outcome.code == 0, outcome.text
    assert _min_clients(tmp_path / "jobs" / "demo-mlp-fedavg-2sites") == 2


def test_more_sites_than_the_site_config_has_is_refused(tmp_path: Path) -> None:
    outcome = run_cli(["job", "create", "demo-mlp", "-c", _config(tmp_path, 3), "--num-clients", "4", "--out", "jobs"])
    assert_clean(outcome)
    assert outcome.code == 1
    assert "--num-clients 4: the site config sites3.yaml has 3 site(s) (site-1, site-2, site-3)" in outcome.err
    assert not (tmp_path / "jobs").exists()


def test_without_a_site_config_the_job_says_what_went_unchecked(tmp_path: Path) -> None:
    """As in the admin container, which holds its kit only: the template's sites, and a note that says so."""
    outcome = run_cli(["job", "create", "demo-mlp", "--out", "jobs", "--compress", "blockwise8"])
    assert outcome.code == 0, outcome.text
    assert _min_clients(tmp_path / "jobs" / "demo-mlp-fedavg-3sites") == 3
    assert "note: no site config: the job waits for 3 site(s) with GPUs (--compress blockwise8)" in outcome.err
    assert "pass -c SITE_CONFIG" in outcome.err


def test_a_named_site_config_that_is_missing_is_an_error(tmp_path: Path) -> None:
    outcome = run_cli(["job", "create", "demo-mlp", "-c", "missing.yaml", "--out", "jobs"])
    assert_clean(outcome)
    assert outcome.code == 1 and "missing.yaml" in outcome.err


def test_quantization_is_checked_against_the_sites_gpus(tmp_path: Path) -> None:
    cpu_sites = _config(tmp_path, 2)
    outcome = run_cli(["job", "create", "demo-mlp", "-c", cpu_sites, "--compress", "blockwise8", "--out", "jobs"])
    assert outcome.code == 1 and "site-1, site-2 list(s) no gpus" in outcome.err
    gpu_sites = _config(tmp_path, 3, gpus=[[0], [1], [2]])
    outcome = run_cli(["job", "create", "demo-mlp", "-c", gpu_sites, "--compress", "blockwise8", "--out", "jobs"])
    assert outcome.code == 0, outcome.text


def test_an_existing_job_folder_is_replaced_only_with_overwrite(tmp_path: Path) -> None:
    create = ["job", "create", "demo-mlp", "-c", _config(tmp_path, 3), "--out", "jobs"]
    assert run_cli(create).code == 0
    mine = tmp_path / "jobs" / "demo-mlp-fedavg-3sites" / "my-notes.txt"
    mine.write_text("keep me")
    outcome = run_cli([*create, "--rounds", "9"])
    assert_clean(outcome)
    assert outcome.code == 1 and "exists. Fix: --overwrite to replace it" in outcome.err
    assert mine.read_text() == "keep me"
    assert run_cli([*create, "--rounds", "9", "--overwrite"]).code == 0
    assert not mine.exists()
    server = (tmp_path / "jobs" / "demo-mlp-fedavg-3sites" / "app" / "config" / "config_fed_server.json").read_text()
    assert json.loads(server)["workflows"][0]["args"]["num_rounds"] == 9
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == ["demo-mlp-fedavg-3sites"]  # no staging left


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--name", "my job"], "--name 'my job': a job name is the job's folder"),
        (["--name", "a/b"], "Fix: e.g. --name a-b"),
        (["--out", "a-file"], "a-file is a file, not a folder"),
        (["-a", "lr={bad"], "argument --lr: invalid float value: '{bad'"),
        (["-a", "lerning_rate=0.1"], "did you mean lr?"),
        (["-a", "lr"], "-a 'lr' is not KEY=VALUE"),
        (["--compress", "zip"], "--compress 'zip' unknown"),
    ],
)
def test_bad_options_are_one_line_errors_with_the_fix(tmp_path: Path, options: list[str], says: str) -> None:
    (tmp_path / "a-file").write_text("")
    outcome = run_cli(["job", "create", "demo-mlp", "-c", _config(tmp_path, 3), *options])
    assert_clean(outcome)
    assert outcome.code == 1 and says in outcome.err, outcome.text
    assert len(outcome.err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_job_args_lists_a_templates_trainer_arguments() -> None:
    outcome = run_cli(["job", "args", "hf-lora"])
    assert outcome.code == 0, outcome.text
    rows = {line.split()[0]: line for line in outcome.out.splitlines()[2:]}
    assert "0.0003 (template)" in rows["lr"] and "float" in rows["lr"]
    assert "switch" in rows["packing"] and "false (default)" in rows["packing"]
    assert "switch" in rows["chat_template"]
    assert "none|4bit" in rows["quantize"]
    assert "[job create --model]" in rows["model"]


def test_create_help_says_where_the_template_arguments_are_listed() -> None:
    outcome = run_cli(["job", "create", "--help"])
    assert outcome.code == 0
    assert "fedllm job args TEMPLATE" in " ".join(outcome.out.split())
