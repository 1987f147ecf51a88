"""A damaged record of what `fedllm up` started (run/native.json): status and down end cleanly and signal nothing.

Whatever the file holds, `fedllm status` and `fedllm down` end in success or fedllm's own error naming the
file, change nothing when they fail, and never signal a process `up` did not start: a pid in the file (this
test's own, its parent's, init's) is only acted on while it works in its participant's kit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedllm.config import load_site_config
from fedllm.provision import provision
from fedllm.runtime import native
from tests.support.cli_fuzz import (
    FUZZ_SETTINGS,
    assert_clean,
    assert_no_partial_output,
    corrupted,
    json_values,
    run_cli,
    snapshot,
)
from tests.support.sites import local_config_dict, write_yaml


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Kits of a 3-site federation (nothing running) and where `up` keeps its record."""
    root = tmp_path_factory.mktemp("state")
    config = write_yaml(root / "site.yaml", local_config_dict(project="fuzzstate"))
    kits = provision(load_site_config(config), root / "ws", source="site.yaml", data_root=root)
    return config, root / "ws", native.run_dir(kits) / native.STATE_FILE


def _valid_record(state: Path) -> bytes:
    # Real pids that are not the federation's: this process, its parent, init.
    pids = {"localhost": os.getpid(), "site-1": os.getppid(), "site-2": 1, "site-3": 2**22 + 7}
    processes = [{"name": n, "pid": p, "log": str(state.parent / "logs" / f"{n}.log")} for n, p in pids.items()]
    return json.dumps({"prod_dir": str(state.parent.parent / "prod_00"), "processes": processes}).encode()


def _check(workspace: tuple[Path, Path, Path], content: bytes) -> None:
    config, ws, state = workspace
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_bytes(content)
    for command in ("status", "down"):
        before = snapshot(ws)
        outcome = run_cli([command, "-c", config, "-w", ws, "--timeout", "1"] if command == "down" else
                          [command, "-c", config, "-w", ws])  # fmt: skip
        assert_clean(outcome)
        assert_no_partial_output(outcome, ws, before)
        if outcome.code == 1:
            assert f"{state} is damaged" in outcome.err and "delete the file" in outcome.err, outcome.err
        if command == "down" and outcome.code == 0:
            assert not state.exists()
            state.write_bytes(content)


@FUZZ_SETTINGS
@given(data=st.data())
def test_a_damaged_record_ends_cleanly(workspace, data) -> None:
    _check(workspace, data.draw(corrupted(_valid_record(workspace[2]))))


@FUZZ_SETTINGS
@given(value=json_values())
def test_a_record_of_the_wrong_shape_ends_cleanly(workspace, value) -> None:
    _check(workspace, json.dumps({"processes": [{"name": "site-1", "pid": value, "log": "x"}]}).encode())
    _check(workspace, json.dumps({"processes": value}).encode())


def test_pids_that_are_not_the_federations_are_never_signalled(workspace) -> None:
    """Every pid in the record is alive, none is a participant working in its kit: nothing runs, nothing is signalled."""
    _check(workspace, _valid_record(workspace[2]))
    outcome = run_cli(["status", "-c", workspace[0], "-w", workspace[1]])
    assert "nothing runs from this workspace" in outcome.out
