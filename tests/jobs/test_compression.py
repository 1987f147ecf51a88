"""Which compression filters a job gets: fp16/bf16 in both directions, 8/4-bit only where it can run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from fedllm.jobs.compression import CompressionError
from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.template import load_template


def test_fp16_job_has_filters_in_both_directions(tmp_path: Path) -> None:
    spec = resolve_spec(load_template("demo-mlp"), "fedavg", rounds=2, compression="fp16")
    job = create_job(spec, tmp_path)
    text = _job_text(job)
    assert text.count("fedllm.flare.filters.PrecisionCast") == 2
    assert text.count("fedllm.flare.filters.PrecisionRestore") == 2
    # The filters come from the fedllm installed on each participant, not from copies in the job.
    assert sorted(p.name for p in (job / "app" / "custom").iterdir()) == ["fedllm_site_entry.py"]


def _job_text(job: Path) -> str:
    return "".join(
        (job / "app" / "config" / n).read_text() for n in ("config_fed_server.json", "config_fed_client.json")
    )


def test_unknown_compression_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CompressionError, match="unknown"):
        create_job(resolve_spec(load_template("demo-mlp"), "fedavg", compression="zip"), tmp_path)


def test_quantization_runs_only_where_cuda_and_bitsandbytes_are(tmp_path: Path) -> None:
    spec = resolve_spec(load_template("demo-mlp"), "fedavg", compression="blockwise8")
    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None:
        text = _job_text(create_job(spec, tmp_path))
        assert text.count("ModelQuantizer") == 2 and text.count("ModelDequantizer") == 2
    else:
        missing = "CUDA GPU" if not torch.cuda.is_available() else "bitsandbytes"
        with pytest.raises(CompressionError, match=rf"need .*{missing}.*--compress fp16"):
            create_job(spec, tmp_path)
