"""fp16 message compression through the real federation: half the bytes on the wire, training still converges."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedllm.flare.server_models import TinyClassifier
from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.submit import COMPLETED, submit_job
from fedllm.jobs.template import load_template
from fedllm.results.metrics import load_global_state, read_round_metrics
from fedllm.training.toy import demo_mlp

pytestmark = pytest.mark.federation


def test_fp16_halves_the_bytes_and_the_model_still_learns(federation, data_root: Path, tmp_path: Path) -> None:
    spec = resolve_spec(load_template("demo-mlp"), "fedavg", rounds=3, compression="fp16")
    result = submit_job(
        federation, create_job(spec, tmp_path / "jobs"), download=tmp_path / "r", timeout=600, echo=lambda _m: None
    )
    assert result.status == COMPLETED
    fp32_bytes = sum(v.numel() * 4 for v in TinyClassifier().state_dict().values())
    for rnd in read_round_metrics(result.result_dir):
        assert {m["bytes_on_wire"] for m in rnd["sites"].values()} == {fp32_bytes / 2}
    state = load_global_state(result.result_dir)
    assert all(str(v.dtype) == "torch.float32" for v in state.values())  # the server restored fp32
    assert _accuracy(state, data_root) > 0.8


def _accuracy(state: dict, data_root) -> float:
    """Validation accuracy of global weights, evaluated by the demo trainer's own task."""
    val = demo_mlp.load_split(data_root / "data" / "val.npz", "validation")
    task = demo_mlp.ClassifierTask(val, val)
    task.load_exchanged_state(state)
    return task.evaluate()["val_accuracy"]
