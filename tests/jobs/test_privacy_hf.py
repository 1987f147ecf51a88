"""`job create --dp` with the Hugging Face SFT templates: hf-lora takes it (its trainer has DP-SGD), hf-sft is refused."""

from __future__ import annotations

import pytest

from fedllm.jobs.create import resolve_spec
from fedllm.jobs.errors import JobSpecError
from fedllm.jobs.template import load_template
from fedllm.training.dp import DPSettings


def test_hf_lora_takes_dp_and_its_sites_get_the_settings() -> None:
    spec = resolve_spec(load_template("hf-lora"), "fedavg", rounds=2, model="m", dp="epsilon=8,sample_rate=0.1")
    assert spec.dp is not None and spec.dp.steps_per_round == 10
    assert DPSettings.from_arg(spec.train_args["dp"]) == spec.dp.settings


def test_hf_sft_is_refused_at_create_time() -> None:
    with pytest.raises(JobSpecError, match=r"--dp: template hf-sft's trainer fedllm\.training\.hf\.sft has no DP-SGD"):
        resolve_spec(load_template("hf-sft"), "fedavg", rounds=2, model="m", dp="epsilon=8")
