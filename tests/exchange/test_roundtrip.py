"""Weights cross the real exchange path intact: bit-identical on fp32, within cast tolerance on 16-bit wires."""

from __future__ import annotations

import pytest
import torch

from fedllm.jobs.exchange import ExchangeOptions
from fedllm.jobs.submit import submit_job
from fedllm.training.echo import EchoModel, max_abs_diff, state_digest

from .conftest import echo_job

pytestmark = pytest.mark.federation

SIZE_MIB = 48  # several tensors (64 MiB each would make one); small enough for a quick round


def _global_model(result_dir) -> dict:
    path = result_dir / "workspace" / "app_server" / "FL_global_model.pt"
    saved = torch.load(path, map_location="cpu", weights_only=False)
    return saved.get("model", saved)


def test_fp32_weights_are_bit_identical_after_a_round(federation_2, tmp_path):
    job = echo_job(tmp_path / "jobs", SIZE_MIB, sites=2, name="echo-fp32")
    result = submit_job(federation_2, job, download=tmp_path / "results", echo=lambda _m: None)
    assert result.ok, result.status
    expected = EchoModel(SIZE_MIB).state_dict()
    got = _global_model(result.result_dir)
    # Sites check what they received (--verify) and fail the job on any difference; the server's
    # aggregate of two identical fp32 echoes must equal the initial weights bit for bit.
    assert state_digest(got) == state_digest(expected)


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_16bit_wire_stays_within_cast_tolerance(federation_2, tmp_path, wire):
    # Two casts per round (server → site, site → server); values in [-1, 1).
    tolerance = 2**-8 if wire == "bfloat16" else 2**-11
    job = echo_job(
        tmp_path / "jobs",
        SIZE_MIB,
        sites=2,
        exchange=ExchangeOptions(wire_dtype=wire),
        tolerance=tolerance,
        name=f"echo-{wire}",
    )
    result = submit_job(federation_2, job, download=tmp_path / "results", echo=lambda _m: None)
    assert result.ok, result.status
    expected = EchoModel(SIZE_MIB).state_dict()
    got = _global_model(result.result_dir)
    assert all(v.dtype == torch.float32 for v in got.values()), "weights must come back in their own dtype"
    diff = max_abs_diff(expected, got)
    assert 0 < diff <= tolerance, f"max |Δ| {diff} after a {wire} round trip"


def test_bf16_model_crosses_bit_identical(federation_2, tmp_path):
    job = echo_job(tmp_path / "jobs", SIZE_MIB, sites=2, dtype="bfloat16", name="echo-bf16-model")
    result = submit_job(federation_2, job, download=tmp_path / "results", echo=lambda _m: None)
    assert result.ok, result.status
    got = _global_model(result.result_dir)
    assert state_digest(got) == state_digest(EchoModel(SIZE_MIB, dtype="bfloat16").state_dict())
