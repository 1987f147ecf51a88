"""Fuzzing `fedllm job create` (issue 28): malformed templates, `-a` values, job names and `--out` targets.

Every run ends in a job folder or in fedllm's own one-line error, never a traceback; a run that fails
leaves the output folder as it was (no partial job folder, no staging folder), and an existing job
folder is replaced only with --overwrite.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedllm.resources import resource_dir
from tests.support.cli_fuzz import (
    FUZZ_SETTINGS,
    Outcome,
    assert_clean,
    assert_no_partial_output,
    corrupted,
    run_cli,
    snapshot,
)
from tests.support.sites import local_config_dict, write_yaml

TEMPLATES = {
    name: (resource_dir("jobs") / f"{name}.yaml").read_bytes()
    for name in ("demo-mlp", "hf-ptuning", "hf-lora", "nemo-ptuning-345m")
}
NEEDS_MODEL = {"hf-ptuning", "hf-lora"}

KEYS = st.sampled_from(["lr", "batch_size", "seed", "tb_dir", "train", "val", "lerning_rate", "devices", "epochs"])
VALUES = st.sampled_from(
    ["0.01", "{bad", "[1, 2]", "{a: 1}", "true", "null", "1e-4", "-1", "0x10", "nan", "", "'q'", "a b", "{data_dir}/x"]
)
NAMES = st.sampled_from(["ok-name", "my job", "a/b", "..", ".hidden", "-dash", "x" * 300, "naïve", "a\nb"])
OUTS = st.sampled_from(["new", "file", "under-file", "existing-job"])


@pytest.fixture(scope="module")
def site_config(tmp_path_factory) -> Path:
    return write_yaml(tmp_path_factory.mktemp("sites") / "sites.yaml", local_config_dict(sites=3))


def _checked_run(args: list[str], work: Path, out: Path) -> Outcome:
    """One `fedllm job create`, held to the rules: clean outcome, `work` untouched on failure, a whole job on success."""
    before = snapshot(work)
    outcome = run_cli(args)
    assert_clean(outcome)
    assert_no_partial_output(outcome, work, before)
    if outcome.code == 0:
        jobs = [p for p in out.iterdir() if (p / "meta.json").is_file()]
        assert jobs, outcome.text
        for job in jobs:
            json.loads((job / "meta.json").read_text())
    return outcome


@FUZZ_SETTINGS
@given(name=st.sampled_from(sorted(TEMPLATES)), data=st.data())
def test_a_malformed_template_ends_in_a_job_or_fedllms_error(tmp_path: Path, site_config: Path, name, data) -> None:
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    template = work / "template.yaml"
    template.write_bytes(data.draw(corrupted(TEMPLATES[name]), label="template"))
    out = work / "jobs"
    args = ["job", "create", str(template), "-c", str(site_config), "--out", str(out), "--name", "fuzzed"]
    _checked_run([*args, "--model", "/models/m"] if name in NEEDS_MODEL else args, work, out)


@FUZZ_SETTINGS
@given(
    assignments=st.lists(st.tuples(KEYS | st.text(max_size=10), VALUES | st.text(max_size=16)), max_size=3),
    name=st.none() | NAMES | st.text(min_size=1, max_size=20),
    target=OUTS,
    overwrite=st.booleans(),
)
def test_malformed_options_end_in_a_job_or_fedllms_error(
    tmp_path: Path, site_config: Path, assignments, name, target, overwrite
) -> None:
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    out = work / "jobs"
    create = ["job", "create", "demo-mlp", "-c", str(site_config)]
    mine = out / "demo-mlp-fedavg-3sites" / "mine.txt"
    if target == "file":
        out.write_text("not a folder")
    elif target == "under-file":
        (work / "a-file").write_text("")
        out = work / "a-file" / "jobs"
    elif target == "existing-job":  # a job folder is there already, with a file of the user's in it
        assert run_cli([*create, "--out", str(out)]).code == 0
        mine.write_text("mine")
    args = [*create, "--out", str(out), *(["--overwrite"] if overwrite else [])]
    args += [] if name is None else [f"--name={name}"]
    for key, value in assignments:
        args += ["-a", f"{key}={value}"]
    outcome = _checked_run(args, work, out)
    if target == "existing-job":
        replaced = outcome.code == 0 and name in (None, "demo-mlp-fedavg-3sites")
        assert mine.exists() is not replaced, outcome.text
        assert not replaced or overwrite, outcome.text
