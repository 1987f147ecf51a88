"""Which compression filters a job gets: fp16/bf16 in both directions, 8/4-bit where the sites can run it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from fedllm.config.site_config import SiteConfig
from fedllm.flare.quantization import Dequantize, QuantizationUnavailable, Quantize
from fedllm.jobs.compression import CompressionError
from fedllm.jobs.create import JobSpecError, create_job, resolve_spec
from fedllm.jobs.sites import Federation
from fedllm.jobs.template import load_template
from tests.support.sites import local_config_dict


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


def _federation(gpus: list[list[int]]) -> Federation:
    config = SiteConfig.model_validate(local_config_dict(sites=len(gpus), gpus=gpus))
    return Federation(config, "sites.yaml")


def test_quantization_is_checked_against_the_sites_not_this_machine(tmp_path: Path) -> None:
    # This machine may have no GPU and no bitsandbytes (the admin container): the sites have GPUs, so the job is made.
    spec = resolve_spec(
        load_template("demo-mlp"), "fedavg", compression="blockwise8", federation=_federation([[0], [1]])
    )
    text = _job_text(create_job(spec, tmp_path))
    assert text.count("fedllm.flare.quantization.Quantize") == 2
    assert text.count("fedllm.flare.quantization.Dequantize") == 2
    # What the site config cannot tell is said, not left silent.
    assert any("bitsandbytes on every participant and a CUDA GPU on the server" in note for note in spec.notes)


def test_quantization_is_refused_when_a_site_has_no_gpus() -> None:
    with pytest.raises(JobSpecError, match=r"--compress normfloat4: .* site-2 list\(s\) no gpus in the site config"):
        resolve_spec(load_template("demo-mlp"), "fedavg", compression="normfloat4", federation=_federation([[0], []]))


def test_the_quantize_filter_runs_nvflares_where_it_can_and_says_what_is_missing_where_not() -> None:
    from nvflare.apis.dxo import DXO, DataKind
    from nvflare.apis.fl_context import FLContext
    from nvflare.apis.shareable import Shareable

    weights = {"w": torch.linspace(-1, 1, 4096).reshape(64, 64)}
    dxo = DXO(DataKind.WEIGHTS, data=dict(weights))
    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None:
        sent = Quantize("blockwise8").process_dxo(dxo, Shareable(), FLContext())
        assert sent.data["w"].dtype == torch.uint8
        back = Dequantize().process_dxo(sent, Shareable(), FLContext())
        assert torch.allclose(torch.as_tensor(back.data["w"]).float().cpu(), weights["w"], atol=0.02)
    else:
        missing = "a CUDA GPU" if not torch.cuda.is_available() else "bitsandbytes"
        with pytest.raises(QuantizationUnavailable, match=rf"need .*{missing}.*--compress fp16"):
            Quantize("blockwise8").process_dxo(dxo, Shareable(), FLContext())
