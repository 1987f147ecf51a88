"""The Makefile's federation targets: `make provision` takes default.yaml, the targets after it the provisioned config."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.sites import local_config_dict, write_yaml

REPO = Path(__file__).resolve().parents[2]


def _fedllm_line(target: str, *assignments: str) -> list[str]:
    """The `fedllm …` command `make TARGET` runs (make -n prints it without running anything)."""
    printed = subprocess.run(
        ["make", "-s", "-n", "-C", str(REPO), target, *assignments], capture_output=True, text=True, check=True
    ).stdout
    (line,) = [line for line in printed.splitlines() if line.startswith(".venv/bin/fedllm ")]
    return shlex.split(line)[1:]


@pytest.mark.parametrize("target", ["up", "status", "down", "submit", "preflight"])
def test_targets_after_provision_pass_a_config_only_when_one_is_given(target: str) -> None:
    job = ("JOB=runs/jobs/demo-mlp-fedavg-3sites",) if target == "submit" else ()
    args = _fedllm_line(target, *job)
    assert "-c" not in args, f"make {target} passes {args}: it would miss the config provisioned into the workspace"
    assert args[args.index("-w") + 1] == "workspace"
    given = _fedllm_line(target, *job, "CONFIG=site_configs/local.yaml")
    assert given[given.index("-c") + 1] == "site_configs/local.yaml"
    if target == "up":
        assert "--native" not in args


def test_provision_and_validate_default_to_default_yaml() -> None:
    for target in ("provision", "validate"):
        args = _fedllm_line(target)
        assert args[args.index("-c") + 1] == "site_configs/default.yaml"
        given = _fedllm_line(target, "CONFIG=site_configs/local.yaml")
        assert given[given.index("-c") + 1] == "site_configs/local.yaml"


def test_make_status_finds_the_federation_provisioned_from_another_config(tmp_path: Path) -> None:
    """`make provision CONFIG=site_configs/x.yaml`, then `make status`: the status of that federation."""
    write_yaml(tmp_path / "site_configs" / "x.yaml", local_config_dict(project="fromx"))
    fedllm = [sys.executable, "-m", "fedllm.cli.main"]

    def run(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([*fedllm, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)

    assert run(_fedllm_line("provision", "CONFIG=site_configs/x.yaml")).returncode == 0
    status = run(_fedllm_line("status"))
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith("project 'fromx', kits workspace/fromx/prod_00"), status.stdout
