"""Fuzzing the site config: whatever the file holds, `validate` and `provision` succeed or say what is wrong.

Malformed site configs — a valid one damaged byte-wise, each field given a value of another type,
other encodings, huge values, YAML's anchors, tags and other oddities — fed to `fedllm validate` and
`fedllm provision`: each ends in success or in fedllm's own error (the located problem list), never in
a traceback, and a failed `provision` leaves the workspace as it was (no partial kit).
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from tests.support.cli_fuzz import (
    FUZZ_SETTINGS,
    assert_clean,
    assert_no_partial_output,
    corrupted,
    json_values,
    run_cli,
    snapshot,
)

BASE = {
    "project": "fedfuzz",
    "server": {"name": "localhost", "fed_learn_port": 18002, "admin_port": 18003, "job_ports": "18004-18005"},
    "admins": [{"name": "admin@nvidia.com", "org": "nvidia", "role": "project_admin"}],
    "sites": [
        {"name": "site-1", "gpus": [0], "data_dir": "data/one", "workload": "gpt-345m-ptuning"},
        {"name": "site-2", "org": "orgb", "gpus": [1], "host": "localhost", "shm_size": "1g"},
    ],
    "allow_gpu_sharing": False,
    "container": {"image": "fedllm:latest", "uid": 10001, "ulimits": {"memlock": -1, "stack": 67108864}},
}
VALID = yaml.safe_dump(BASE, sort_keys=False).encode()

# Where a wrong value can go: every field of the base config, each list item, and each whole section.
FIELDS: list[tuple[str | int, ...]] = [()]


def _paths(node, path: tuple[str | int, ...]) -> None:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        FIELDS.append((*path, key))
        _paths(value, (*path, key))


_paths(BASE, ())


def _set(data: dict, path: tuple[str | int, ...], value) -> object:
    if not path:
        return value
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


def check(text: bytes, tmp: Path) -> None:
    """`validate` and `provision` of this file: clean outcomes; a failed provision changed nothing."""
    config = tmp / "site.yaml"
    config.write_bytes(text)
    validated = run_cli(["validate", "-c", config])
    assert_clean(validated, allowed=(0, 1))
    workspace = tmp / "workspace"
    before = snapshot(workspace)
    provisioned = run_cli(["provision", "-c", config, "-w", workspace])
    assert_clean(provisioned, allowed=(0, 1))
    assert_no_partial_output(provisioned, workspace, before)
    if validated.code == 1:  # one loader: what validate refuses, provision refuses with the same problems
        assert provisioned.code == 1 and provisioned.err == validated.err, (validated.err, provisioned.err)


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch):
    """A fresh folder per example (relative data dirs resolve against it)."""
    monkeypatch.chdir(tmp_path)

    def make() -> Path:
        return Path(tempfile.mkdtemp(dir=tmp_path))

    return make


def test_the_base_config_provisions(scratch) -> None:
    tmp = scratch()
    check(VALID, tmp)
    assert (tmp / "workspace" / "fedfuzz" / "prod_00" / "site-1" / "startup").is_dir()


@FUZZ_SETTINGS
@given(data=corrupted(VALID))
def test_a_damaged_config(scratch, data: bytes) -> None:
    check(data, scratch())


@FUZZ_SETTINGS
@given(field=st.sampled_from(FIELDS), value=json_values())
def test_a_field_of_another_type(scratch, field, value) -> None:
    data = _set(copy.deepcopy(BASE), field, value)
    check(yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode(), scratch())


@FUZZ_SETTINGS
@given(field=st.sampled_from(FIELDS), key=st.text(max_size=20))
def test_an_unknown_key(scratch, field, key) -> None:
    data = copy.deepcopy(BASE)
    parent = data
    for part in field:
        parent = parent[part]
    if not isinstance(parent, dict):
        parent = data
    parent[key] = 1
    check(yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode(), scratch())


def _laughs() -> str:
    lines = ["  l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    return "laughs:\n" + "\n".join(lines) + "\ndescription: *l9\n"


TEXT = VALID.decode()
ODDITIES = {
    "utf-16": VALID.decode().encode("utf-16"),
    "utf-32": VALID.decode().encode("utf-32"),
    "latin-1": TEXT.replace("fedllm:latest", "fédllm:latest").encode("latin-1"),
    "cp1252 quotes": TEXT.replace("data/one", "“data/one”").encode("cp1252"),
    "empty": b"",
    "only a comment": b"# nothing here\n",
    "null document": b"~\n",
    "a list": b"- project\n- sites\n",
    "a scalar": b"fedfuzz\n",
    "two documents": (TEXT + "---\n" + TEXT).encode(),
    "NUL": TEXT.replace("site-2", "site\x002").encode(),
    "control character": TEXT.replace("site-2", "site\x072").encode(),
    "tab indentation": TEXT.replace("  - name: site-1", "\t- name: site-1").encode(),
    "python tag": TEXT.replace("project: fedfuzz", "project: !!python/object/apply:os.system [echo]").encode(),
    "custom tag": TEXT.replace("project: fedfuzz", "project: !vault fedfuzz").encode(),
    "binary tag": TEXT.replace("project: fedfuzz", "project: !!binary aGVsbG8=").encode(),
    "set tag": TEXT.replace("project: fedfuzz", "project: !!set {a, b}").encode(),
    "timestamp": TEXT.replace("project: fedfuzz", "project: 2024-01-01").encode(),
    "anchor and alias": TEXT.replace("- name: site-2", "- &s2\n  name: site-2").encode() + b"extra: *s2\n",
    "merge key": TEXT.replace("container:", "base: &b {uid: 5}\ncontainer:\n  <<: *b").encode(),
    "recursive alias": TEXT.replace("project: fedfuzz", "project: &p [*p]").encode(),
    "recursive mapping": TEXT.replace("container:", "container: &c\n  self: *c\nold:").encode(),
    "billion laughs": (TEXT + _laughs()).encode(),
    "complex key": TEXT.replace("project: fedfuzz", "? [a, b]\n: fedfuzz").encode(),
    "null key": TEXT.replace("project: fedfuzz", "~: fedfuzz\nproject: fedfuzz").encode(),
    "numeric key": TEXT.replace("project: fedfuzz", "1: fedfuzz\nproject: fedfuzz").encode(),
    "duplicate key": (TEXT + "project: other\n").encode(),
    "deep nesting": TEXT.replace("project: fedfuzz", "project: " + "[" * 400 + "]" * 400).encode(),
    "huge string": TEXT.replace("project: fedfuzz", "project: " + "a" * 300_000).encode(),
    "huge description": TEXT.replace("project: fedfuzz", "project: fedfuzz\ndescription: " + "d" * 50_000).encode(),
    "huge number": TEXT.replace("18002", "1" + "0" * 5000).encode(),
    "float port": TEXT.replace("18002", "1.8e4").encode(),
    "infinity": TEXT.replace("18002", ".inf").encode(),
    "many gpus": TEXT.replace("gpus:\n    - 0", "gpus: [" + ", ".join(map(str, range(5000))) + "]").encode(),
    "too large a file": TEXT.encode() + b"# " + b"x" * (5 << 20) + b"\n",
}


@pytest.mark.parametrize("name", list(ODDITIES))
def test_an_odd_file(scratch, name: str) -> None:
    check(ODDITIES[name], scratch())


def test_a_config_that_cannot_be_read(scratch) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    tmp = scratch()
    config = tmp / "site.yaml"
    config.write_bytes(VALID)
    config.chmod(0)
    outcome = run_cli(["validate", "-c", config])
    assert_clean(outcome, allowed=(1,))
    assert "cannot be read" in outcome.err
