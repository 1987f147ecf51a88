"""Fuzzing what `report`, `infer` and `export-hf` read from a job result: round_metrics.jsonl and the global models.

A small SFT job result, written by the job's own writers (NVFlare's MetricsArtifactWriter, fedllm's
persistor), is damaged one way per example (tests/support/cli_fuzz.py: truncated, bit-flipped, bytes
inserted or overwritten, emptied, noise; for the metrics also a field of the wrong type or a missing
key). Each command ends in success or in fedllm's own error naming the file, never in a traceback, and
leaves no partial output. What success means is checked too:

- report: every line of the file is either drawn or listed as left out (line number and why);
- infer/export-hf: the weights used are exactly the ones the job saved (every record passed its CRC-32),
  so a damaged checkpoint is never used as if it were whole.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedllm.results.metrics import BEST_GLOBAL_MODEL, GLOBAL_MODEL, ROUND_METRICS, load_round_metrics
from tests.support.cli_fuzz import (
    FUZZ_SETTINGS,
    assert_clean,
    assert_no_partial_output,
    corrupted,
    json_values,
    run_cli,
    snapshot,
)
from tests.support.job_results import write_job_result

ROUNDS = [
    {
        "site-1": {"global_val_loss": 3.0 - r, "val_loss": 2.5 - r},
        "site-2": {"global_val_loss": 3.2 - r, "val_loss": 2.7 - r},
    }
    for r in range(3)
]


@pytest.fixture(scope="module")
def sft_result(tiny_gpt, tmp_path_factory) -> Path:
    return write_job_result(
        tmp_path_factory.mktemp("fuzz") / "result",
        "fedllm.flare.server_models.CausalLMWeights",
        {"model": str(tiny_gpt)},
        ROUNDS,
    )


# ---- round_metrics.jsonl ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def undamaged_report(sft_result: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("undamaged") / "report"
    assert run_cli(["report", f"run={sft_result}", "--out", out]).code == 0
    return out


def _field_paths(record) -> list[tuple]:
    """Every key and index of a round record, as paths from its root (what a wrong type may replace)."""
    paths: list[tuple] = []

    def walk(value, path: tuple) -> None:
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, child in items:
            paths.append((*path, key))
            walk(child, (*path, key))

    walk(record, ())
    return paths


@st.composite
def damaged_fields(draw, data: bytes) -> bytes:
    """One field of one round given a value of another type, or removed."""
    lines = data.decode().splitlines()
    index = draw(st.integers(0, len(lines) - 1))
    record = json.loads(lines[index])
    path = draw(st.sampled_from(_field_paths(record)))
    parent = record
    for key in path[:-1]:
        parent = parent[key]
    if draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(json_values())
    lines[index] = json.dumps(record)
    return ("\n".join(lines) + "\n").encode()


def _metrics_damage(data: bytes):
    return st.one_of(corrupted(data), damaged_fields(data))


@FUZZ_SETTINGS
@given(data=st.data())
def test_report_on_damaged_round_metrics(sft_result: Path, undamaged_report: Path, tmp_path_factory, data) -> None:
    result = tmp_path_factory.mktemp("report") / "result"
    shutil.copytree(sft_result, result, ignore=shutil.ignore_patterns("*.pt"))  # report reads no model
    out = shutil.copytree(undamaged_report, result.parent / "report")  # a failed run must leave it as it was
    before = snapshot(out)
    path = result / ROUND_METRICS
    damaged = data.draw(_metrics_damage(path.read_bytes()), label="round_metrics.jsonl")
    path.write_bytes(damaged)

    outcome = run_cli(["report", f"run={result}", "--out", out])
    assert_clean(outcome, allowed=(0, 1))
    assert_no_partial_output(outcome, out, before)
    if outcome.code == 1:
        assert str(path) in outcome.err or str(result) in outcome.err, outcome.err
        return
    # Success: every line is drawn or listed as left out, with its number, on the console and in report.md.
    read = load_round_metrics(result)
    blank = sum(1 for line in damaged.split(b"\n") if not line.strip())
    assert len(read.rounds) + len(read.damaged) == read.lines == len(damaged.split(b"\n")) - blank
    for number, line in enumerate(damaged.split(b"\n"), start=1):
        try:
            json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):  # not UTF-8 or not JSON by any reader's measure: it must be listed
            assert not line.strip() or number in {d.number for d in read.damaged}, line
    if read.damaged:
        summary = read.damage_summary()
        assert summary in outcome.err and summary in (out / "report.md").read_text()
        assert all(f"line {d.number}: " in outcome.err for d in read.damaged[:5])


# ---- FL_global_model.pt / best_FL_global_model.pt -------------------------------------------------------------


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@FUZZ_SETTINGS
@given(data=st.data())
def test_infer_and_export_on_a_damaged_global_model(sft_result: Path, tiny_gpt: Path, tmp_path_factory, data) -> None:
    best = data.draw(st.booleans(), label="best")
    command = data.draw(st.sampled_from(["infer", "export-hf"]), label="command")
    result = tmp_path_factory.mktemp("model") / "result"
    shutil.copytree(sft_result, result)
    checkpoint = result / (BEST_GLOBAL_MODEL if best else GLOBAL_MODEL)
    original = checkpoint.read_bytes()
    damaged = data.draw(corrupted(original), label=checkpoint.name)
    checkpoint.write_bytes(damaged)

    exports = result.parent / "exports"
    exports.mkdir()
    before = snapshot(exports)
    flags = ["--best"] if best else []
    if command == "infer":
        args = ["infer", "--model", tiny_gpt, "--sft", result, "--sentence", "x", "--max-new-tokens", "1", *flags]
    else:
        args = ["export-hf", result, "--model", tiny_gpt, "--out", exports / f"e-{uuid.uuid4().hex[:6]}", *flags]
    outcome = run_cli(args)
    assert_clean(outcome, allowed=(0, 1))
    assert_no_partial_output(outcome, exports, before)
    if outcome.code == 1:
        assert str(checkpoint) in outcome.err, outcome.err
        return
    # Success: the damage missed every byte that matters (the zip's padding, say): the weights are the job's.
    saved, used = _original_weights(sft_result, best), _weights(checkpoint)
    assert set(saved) == set(used) and all(torch.equal(saved[k], used[k]) for k in saved)


def _original_weights(sft_result: Path, best: bool) -> dict[str, torch.Tensor]:
    return _weights(sft_result / (BEST_GLOBAL_MODEL if best else GLOBAL_MODEL))
