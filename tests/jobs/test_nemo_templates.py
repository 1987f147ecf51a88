"""NeMo job templates rendered through `fedllm job create` (local / central / fedavg) with the seeds' settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedllm.checkpoint.errors import CheckpointError
from fedllm.flare.server_models import PromptEncoderWeights
from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.template import load_template
from tests.support.nemo_files import gpt_config, write_nemo

NEMO_TEMPLATES = ["nemo-ptuning-345m", "nemo-ptuning-20b", "nemo-sft-1.3b", "nemo-sft-5b"]


def _client(app: Path) -> dict:
    app = app / "app" if (app / "app").is_dir() else app
    return json.loads((app / "config" / "config_fed_client.json").read_text())


def _server(job: Path) -> dict:
    return json.loads((job / "app" / "config" / "config_fed_server.json").read_text())


def _command(job: Path) -> list[str]:
    (executor,) = _client(job)["executors"]
    return executor["executor"]["args"]["command"]


def _persisted_model(job: Path) -> dict:
    """The server model the persistor builds (fedllm's lean persistor names it by class path + args)."""
    args = next(c for c in _server(job)["components"] if c["id"] == "persistor")["args"]
    return {"path": args["model_class"], "args": args.get("model_args", {})}


@pytest.mark.parametrize(
    ("name", "devices"), [("nemo-ptuning-345m", 1), ("nemo-ptuning-20b", 2), ("nemo-sft-1.3b", 1), ("nemo-sft-5b", 2)]
)
def test_sites_launch_one_trainer_process_per_gpu(tmp_path, name, devices):
    job = create_job(resolve_spec(load_template(name), "fedavg"), tmp_path)
    cmd = _command(job)
    assert cmd[:4] == ["torchrun", "--standalone", f"--nproc_per_node={devices}", "custom/fedllm_site_entry.py"]
    assert cmd[cmd.index("--devices") + 1] == str(devices)
    assert (
        (job / "app" / "custom" / "fedllm_site_entry.py")
        .read_text()
        .count(f"from {load_template(name).trainer} import main")
    )


def test_20b_seed_settings_fedavg_and_local(tmp_path):
    t = load_template("nemo-ptuning-20b")
    fedavg = resolve_spec(t, "fedavg")
    assert (fedavg.num_clients, fedavg.devices, fedavg.rounds, fedavg.local_epochs) == (3, 2, 50, 1)
    local = resolve_spec(t, "local")
    assert (local.num_clients, local.rounds, local.local_epochs) == (3, 1, 50)
    central = resolve_spec(t, "central", data=["/data/combined/train.jsonl"])
    assert (central.num_clients, central.rounds) == (1, 1)
    job = create_job(fedavg, tmp_path)
    assert _server(job)["workflows"][0]["args"]["num_rounds"] == 50


def test_ptuning_server_keeps_only_the_prompt_encoder(tmp_path):
    job = create_job(resolve_spec(load_template("nemo-ptuning-20b"), "fedavg"), tmp_path)
    model = _persisted_model(job)
    assert model["path"] == "fedllm.flare.server_models.PromptEncoderWeights"
    server = PromptEncoderWeights(**model["args"])
    # 20B: hidden 6144 → 10 virtual tokens of 6144; ~25 M parameters (100 MB), versus 20 B in the LLM.
    assert server.embedding.weight.shape == (10, 6144)
    assert sum(p.numel() for p in server.parameters()) < 30_000_000
    # Lower loss is better (of the global model the sites received): the server's model selector is told so.
    selector = next(c for c in _server(job)["components"] if c["id"] == "model_selector")
    assert selector["args"]["key_metric"] == "global_val_loss" and selector["args"]["negate_key_metric"] is True


def test_sft_server_reads_the_jobs_checkpoint_and_sites_size_data_for_all_rounds(tmp_path):
    spec = resolve_spec(load_template("nemo-sft-1.3b"), "fedavg", rounds=7, model="/models/gpt1.3b.nemo")
    job = create_job(spec, tmp_path)
    assert _persisted_model(job) == {
        "path": "fedllm.flare.server_models.NemoCheckpointWeights",
        "args": {"checkpoint": "/models/gpt1.3b.nemo"},
    }
    cmd = _command(job)
    assert cmd[cmd.index("--rounds") + 1] == "7" and cmd[cmd.index("--model") + 1] == "/models/gpt1.3b.nemo"


def test_sft_per_site_datasets(tmp_path):
    spec = resolve_spec(
        load_template("nemo-sft-1.3b"),
        "fedavg",
        data=["/d/alpaca_training.jsonl", "/d/dolly_training.jsonl", "/d/oasst1_training.jsonl"],
        validation="/d/combined_validation.jsonl",
        sites=["site-1", "site-2", "site-3"],
    )
    job = create_job(spec, tmp_path)
    for site, train in [("site-1", "/d/alpaca_training.jsonl"), ("site-3", "/d/oasst1_training.jsonl")]:
        cmd = _command(job / f"app_{site}")
        assert cmd[:3] == ["torchrun", "--standalone", "--nproc_per_node=1"]
        assert cmd[cmd.index("--train") + 1] == train
        assert cmd[cmd.index("--val") + 1] == "/d/combined_validation.jsonl"


def test_tp_mismatch_is_caught_at_job_creation_when_the_checkpoint_is_here(tmp_path):
    ckpt = write_nemo(tmp_path / "gpt20b_tp4.nemo", gpt_config(tp=4), [])
    with pytest.raises(CheckpointError, match="tensor_model_parallel_size is 4"):
        resolve_spec(load_template("nemo-ptuning-20b"), "fedavg", model=str(ckpt))
    assert resolve_spec(load_template("nemo-ptuning-20b"), "fedavg", model=str(ckpt), devices=4).devices == 4


def test_site_error_is_found_in_a_torchrun_trainers_relayed_output():
    from fedllm.jobs.submit import first_error

    p = "2026-11-24 18:41:53,201 - ExternalProcessBackend - INFO - "
    log = "\n".join(
        [
            p + "Traceback (most recent call last):",
            # The site's own log lines interleave with the relayed traceback (seen in CI).
            "2026-11-24 18:41:53,202 - AuxRunner - INFO - registered aux handler for topic fed.event",
            p + '  File "/x/nemo_ptuning.py", line 1, in main',
            p
            + "fedllm.checkpoint.errors.CheckpointError: a.nemo: model_config.yaml field tensor_model_parallel_size is 2",
            "2026-11-24 18:41:54,015 - ClientAPIExecutor - ERROR - Traceback (most recent call last):",
            "RuntimeError: trainer process group exited (rc=1) before completing the HELLO handshake",
        ]
    )
    assert first_error(log).startswith("fedllm.checkpoint.errors.CheckpointError: a.nemo: model_config.yaml field")
