"""The Hugging Face job templates: what they require and what the server gets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.template import load_template


def test_lora_and_sft_templates_need_a_model_and_pass_it_to_the_server(tmp_path: Path) -> None:
    from fedllm.jobs.create import JobSpecError

    for name in ("hf-lora", "hf-sft"):
        with pytest.raises(JobSpecError, match="pass --model"):
            create_job(resolve_spec(load_template(name), "fedavg"), tmp_path)
    job = create_job(resolve_spec(load_template("hf-lora"), "fedavg", model="/models/m"), tmp_path)
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    assert '"model": "/models/m"' in json.dumps(server)


def test_ptuning_local_mode_trains_as_many_epochs_as_fedavg() -> None:
    template = load_template("hf-ptuning")
    fedavg, local = resolve_spec(template, "fedavg"), resolve_spec(template, "local")
    assert (fedavg.rounds, fedavg.local_epochs) == (8, 2)
    assert (local.rounds, local.train_args["epochs"]) == (1, 16)
