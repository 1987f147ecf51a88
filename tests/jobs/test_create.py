"""Job creation: mode rules, per-site data, and the exported NVFlare job folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedllm.config import ConfigError
from fedllm.jobs.create import JobSpecError, create_job, resolve_spec
from fedllm.jobs.template import available_templates, load_template
from tests.support.sites import write_yaml


@pytest.fixture(scope="module")
def template():
    return load_template("demo-mlp")


@pytest.mark.parametrize("name", available_templates())
def test_every_shipped_template_is_valid(name: str) -> None:
    assert load_template(name).trainer


def test_fedavg_uses_rounds_and_one_epoch_by_default(template) -> None:
    spec = resolve_spec(template, "fedavg", rounds=7)
    assert (spec.num_clients, spec.rounds, spec.local_epochs) == (3, 7, 1)
    assert spec.train_args["epochs"] == 1


def test_local_is_one_round_of_as_many_epochs_as_fedavg_rounds(template) -> None:
    spec = resolve_spec(template, "local", num_clients=3)
    assert (spec.rounds, spec.local_epochs) == (1, template.defaults.rounds)
    assert resolve_spec(template, "local", local_epochs=50).local_epochs == 50


def test_central_trains_on_one_site(template) -> None:
    spec = resolve_spec(template, "central", data=["/data/combined/train.npz"])
    assert (spec.num_clients, spec.rounds) == (1, 1)
    assert spec.train_args["train"] == "/data/combined/train.npz"
    with pytest.raises(JobSpecError, match="one site"):
        resolve_spec(template, "central", num_clients=3)


def test_rounds_do_not_apply_to_local_mode(template) -> None:
    with pytest.raises(JobSpecError, match="--rounds 5 does not apply to --mode local"):
        resolve_spec(template, "local", rounds=5)


def test_per_site_data_needs_one_file_per_site(template) -> None:
    spec = resolve_spec(template, "fedavg", data=["a.npz", "b.npz", "c.npz"], sites=["site-1", "site-2", "site-3"])
    assert spec.site_args == {"site-1": {"train": "a.npz"}, "site-2": {"train": "b.npz"}, "site-3": {"train": "c.npz"}}
    with pytest.raises(JobSpecError, match="2 files for 3 sites"):
        resolve_spec(template, "fedavg", data=["a", "b"], sites=["site-1", "site-2", "site-3"])


def test_exported_job_matches_the_spec(template, tmp_path: Path) -> None:
    spec = resolve_spec(template, "fedavg", num_clients=2, rounds=4, devices=2, validation="{data_dir}/v.npz")
    job = create_job(spec, tmp_path)
    meta = json.loads((job / "meta.json").read_text())
    assert meta["min_clients"] == 2
    # The server's JobResumer may continue it after a server or site restart (fedllm.flare.resume).
    assert meta["custom_props"] == {"fedllm_resumable": True}
    server = json.loads(next(job.glob("app*/config/config_fed_server.json")).read_text())
    controller = server["workflows"][0]["args"]
    assert (controller["num_clients"], controller["num_rounds"]) == (2, 4)
    persistor = next(c for c in server["components"] if c["id"] == "persistor")
    assert persistor["args"]["model_class"] == "fedllm.flare.server_models.TinyClassifier"
    assert persistor["args"]["model_args"] == {"in_features": 8, "hidden": 32, "classes": 3, "seed": 0}
    client = json.loads(next(job.glob("app*/config/config_fed_client.json")).read_text())
    args = client["executors"][0]["executor"]["args"]
    assert args["task_script_path"] == "fedllm_site_entry.py"
    assert "--devices 2" in args["task_script_args"] and "--val {data_dir}/v.npz" in args["task_script_args"]
    # The job carries only its entry script: the trainer comes from the fedllm installed on each site.
    custom = sorted(p.name for p in job.rglob("custom/*"))
    assert custom == ["fedllm_site_entry.py"]
    assert "from fedllm.training.toy.demo_mlp import main" in next(job.rglob("fedllm_site_entry.py")).read_text()


def test_per_site_data_is_deployed_per_site(template, tmp_path: Path) -> None:
    spec = resolve_spec(
        template, "fedavg", data=["/d/a.npz", "/d/b.npz", "/d/c.npz"], sites=["site-1", "site-2", "site-3"]
    )
    job = create_job(spec, tmp_path)
    deploy = json.loads((job / "meta.json").read_text())["deploy_map"]
    assert {s for sites in deploy.values() for s in sites} >= {"site-1", "site-2", "site-3"}
    for app, sites in deploy.items():
        if sites == ["site-2"]:
            client = json.loads((job / app / "config" / "config_fed_client.json").read_text())
            assert "--train /d/b.npz" in client["executors"][0]["executor"]["args"]["task_script_args"]


def test_arguments_with_whitespace_are_refused(template, tmp_path: Path) -> None:
    spec = resolve_spec(template, "fedavg", data=["/my data/train.npz"])
    with pytest.raises(JobSpecError, match="whitespace"):
        create_job(spec, tmp_path)


def test_unknown_template_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match="demo-mlp"):
        load_template("no-such-template")


def test_bad_template_is_reported_with_its_field(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "t.yaml", {"name": "x", "trainer": "not a module", "defaults": {"rounds": 0}})
    with pytest.raises(ConfigError) as info:
        load_template(str(path))
    text = str(info.value)
    assert "trainer" in text and "defaults.rounds" in text
