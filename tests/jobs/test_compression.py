"""Compression filters: precision cast/restore on real DXOs, job wiring, and refusal of 8/4-bit on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey

from fedllm.jobs.compression import BYTES_ON_WIRE, CompressionError, PrecisionCast, PrecisionRestore
from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.template import load_template


def _dxo() -> DXO:
    rng = np.random.default_rng(0)
    data = {"w": rng.normal(size=(64, 32)).astype(np.float32), "steps": np.array([3], dtype=np.int64)}
    return DXO(DataKind.WEIGHTS, data=data, meta={MetaKey.INITIAL_METRICS: {"val_loss": 1.0}})


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cast_halves_the_float_bytes_and_restore_brings_fp32_back(precision: str) -> None:
    dxo = _dxo()
    original = dxo.data["w"].copy()
    cast = PrecisionCast(precision).process_dxo(dxo, None, None)
    assert dxo.data["w"].dtype == np.float32  # the input is not modified (the server filters it once per site)
    assert cast.data["steps"].dtype == np.int64  # integers are left alone
    assert cast.get_meta_prop(MetaKey.INITIAL_METRICS)[BYTES_ON_WIRE] == 64 * 32 * 2 + 8
    restored = PrecisionRestore().process_dxo(cast, None, None)
    assert restored.data["w"].dtype == np.float32
    assert np.allclose(restored.data["w"], original, atol=1e-2 if precision == "bf16" else 1e-3)
    assert restored.get_meta_prop("fedllm_original_dtypes") is None


def test_torch_tensors_are_cast_too() -> None:
    dxo = PrecisionCast("fp16").process_dxo(DXO(DataKind.WEIGHTS, data={"w": torch.ones(4, 4)}), None, None)
    assert dxo.data["w"].dtype == torch.float16
    assert PrecisionRestore().process_dxo(dxo, None, None).data["w"].dtype == torch.float32


def test_fp16_job_has_filters_in_both_directions(tmp_path: Path) -> None:
    spec = resolve_spec(load_template("demo-mlp"), "fedavg", rounds=2, compression="fp16")
    job = create_job(spec, tmp_path)
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    text = json.dumps(server) + json.dumps(client)
    assert text.count("fedllm.jobs.compression.PrecisionCast") == 2
    assert text.count("fedllm.jobs.compression.PrecisionRestore") == 2
    # The filters come from the fedllm installed on each participant, not from copies in the job.
    assert sorted(p.name for p in (job / "app" / "custom").iterdir()) == ["fedllm_site_entry.py"]


def test_unknown_compression_and_quantization_without_cuda_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CompressionError, match="unknown"):
        create_job(resolve_spec(load_template("demo-mlp"), "fedavg", compression="zip"), tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(CompressionError, match=r"need .*CUDA GPU.*--compress fp16"):
            create_job(resolve_spec(load_template("demo-mlp"), "fedavg", compression="blockwise8"), tmp_path)
