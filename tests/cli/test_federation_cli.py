"""`fedllm provision | up | status` as typed: help that says what the command does, clean errors, a quick status."""

from __future__ import annotations

import time
from pathlib import Path

from tests.support.cli_fuzz import assert_clean, run_cli, snapshot
from tests.support.sites import local_config_dict, write_yaml


def test_up_starts_local_processes_without_a_flag_and_its_help_says_so(local_config: Path, tmp_path: Path) -> None:
    help_text = run_cli(["up", "--help"]).out
    assert "--native" not in help_text  # nothing to choose: `up` always starts local processes
    assert "as local processes" in help_text and "docker compose up" in help_text
    for extra in ([], ["--native"]):  # --native, as older scripts type it, is still accepted
        outcome = run_cli(["up", *extra, "-c", local_config, "-w", tmp_path / "empty"])
        assert_clean(outcome, allowed=(1,))
        assert "no startup kits for project 'fedtest'" in outcome.err and "run `fedllm provision" in outcome.err


def test_provision_into_a_file_is_a_usage_error_that_names_it(local_config: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # typer's error box: no path broken across its lines
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder\n")
    for workspace, named in (
        (a_file, f"{a_file} is a file"),
        (a_file / "ws", f"ws cannot be created: {a_file} is a file"),
    ):
        before = snapshot(tmp_path)
        outcome = run_cli(["provision", "-c", local_config, "-w", workspace])
        assert_clean(outcome, allowed=(2,))
        message = " ".join(outcome.err.replace("│", " ").split())  # as one line, out of typer's box
        assert named in message and "not a folder; pass a folder for the kits" in message, outcome.err
        assert snapshot(tmp_path) == before


def test_status_with_nothing_running_is_quick_quiet_and_names_every_participant(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_yaml(tmp_path / "site.yaml", local_config_dict())
    assert run_cli(["provision", "-c", "site.yaml"]).code == 0
    t0 = time.monotonic()
    outcome = run_cli(["status"])  # the workspace remembers site.yaml
    took = time.monotonic() - t0
    assert_clean(outcome, allowed=(0,))
    assert took < 5.0, f"status took {took:.1f}s with nothing running"
    lines = outcome.out.splitlines()
    assert lines[0] == "project 'fedtest', kits workspace/fedtest/prod_00"
    server_line = next(line for line in lines if line.split()[:2] == ["localhost", "server"])
    assert "not running" in server_line and "not reachable" in server_line
    for site in ("site-1", "site-2", "site-3"):
        line = next(line for line in lines if line.split()[:2] == [site, "site"])
        assert "not running" in line and "not registered" in line
    assert "nothing runs from this workspace; `fedllm up` starts it" in outcome.out
    # No NVFlare chatter: connection attempts are fedllm's business, said in its own words.
    assert "Connector" not in outcome.text and "ConnectionRefused" not in outcome.text and "[ME=" not in outcome.text


def test_job_create_hints_carry_the_workspace_the_job_submit_needs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEDLLM_JOBS_DIR", raising=False)
    monkeypatch.delenv("FEDLLM_HOST_JOBS_DIR", raising=False)
    write_yaml(tmp_path / "site.yaml", local_config_dict())
    write_yaml(tmp_path / "other.yaml", local_config_dict(project="other"))
    assert run_cli(["provision", "-c", "site.yaml", "-w", "kits"]).code == 0
    created = run_cli(["job", "create", "demo-mlp", "--rounds", "2", "-w", "kits", "--out", "runs/jobs"])
    assert "fedllm job submit runs/jobs/demo-mlp-fedavg-3sites --download runs/results -w kits" in created.out
    # A config other than the one provisioned there goes into the hint too; the defaults add nothing.
    created = run_cli(["job", "create", "demo-mlp", "-c", "other.yaml", "--out", "runs/jobs", "--overwrite"])
    assert "--download runs/results -c other.yaml\n" in created.out
    assert run_cli(["provision", "-c", "site.yaml"]).code == 0
    created = run_cli(["job", "create", "demo-mlp", "--out", "runs/jobs", "--overwrite"])
    assert "fedllm job submit runs/jobs/demo-mlp-fedavg-3sites --download runs/results\n" in created.out
