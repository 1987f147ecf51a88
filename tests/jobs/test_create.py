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
    spec = resolve_spec(template, "fedavg", num_clients=2, rounds=4, devices=1, validation="{data_dir}/v.npz")
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
    assert "--devices 1" in args["task_script_args"] and "--val {data_dir}/v.npz" in args["task_script_args"]
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


def test_arguments_with_whitespace_are_refused(template) -> None:
    with pytest.raises(JobSpecError, match="whitespace"):
        resolve_spec(template, "fedavg", data=["/my data/train.npz"])


def test_unknown_template_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match="demo-mlp"):
        load_template("no-such-template")


def test_bad_template_is_reported_with_its_field(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "t.yaml", {"name": "x", "trainer": "not a module", "defaults": {"rounds": 0}})
    with pytest.raises(ConfigError) as info:
        load_template(str(path))
    text = str(info.value)
    assert "trainer" in text and "defaults.rounds" in text


def _server_config(job: Path) -> dict:
    return json.loads(next(job.glob("app*/config/config_fed_server.json")).read_text())


@pytest.mark.parametrize("name", available_templates())
def test_every_template_selects_the_best_received_global_model_and_tracks_live_metrics(
    name: str, tmp_path: Path
) -> None:
    template = load_template(name)
    model = None if name == "demo-mlp" else "/models/m.nemo" if name.startswith("nemo") else "/models/m"
    spec = resolve_spec(template, "fedavg", model=model)
    server = _server_config(create_job(spec, tmp_path))
    components = {c["id"]: c for c in server["components"]}
    selector = components["model_selector"]["args"]
    # NVFlare's selector reads FLModel.metrics as the evaluation of the model the sites RECEIVED.
    assert selector["key_metric"].startswith("global_val_")
    assert selector.get("negate_key_metric", False) is selector["key_metric"].endswith("loss")
    assert components["receiver"]["path"] == "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver"
    workflows = [w["path"].rsplit(".", 1)[1] for w in server["workflows"]]
    assert workflows == ["LeanFedAvg", "CrossSiteModelEval"]  # the final global model, evaluated by every site


def test_local_mode_has_no_final_evaluation_of_a_meaningless_average(template, tmp_path: Path) -> None:
    server = _server_config(create_job(resolve_spec(template, "local"), tmp_path))
    assert [w["path"].rsplit(".", 1)[1] for w in server["workflows"]] == ["LeanFedAvg"]


def test_a_key_metric_after_local_training_is_refused(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "t.yaml", {"name": "x", "trainer": "m.n", "key_metric": "val_loss"})
    with pytest.raises(ConfigError, match="global_val_loss"):
        load_template(str(path))


def test_hf_sft_and_lora_run_one_trainer_process_per_device(tmp_path: Path) -> None:
    for name in ("hf-sft", "hf-lora"):
        spec = resolve_spec(load_template(name), "fedavg", devices=2, model="/models/m")
        client = next(create_job(spec, tmp_path / name).glob("app*/config/config_fed_client.json")).read_text()
        command = json.loads(client)["executors"][0]["executor"]["args"]["command"]
        assert command[:4] == ["torchrun", "--standalone", "--nproc_per_node=2", "custom/fedllm_site_entry.py"]


def test_devices_a_single_process_template_cannot_use_are_refused(template) -> None:
    with pytest.raises(JobSpecError, match=r"--devices 2: template demo-mlp trains in the site's job process"):
        resolve_spec(template, "fedavg", devices=2)


@pytest.mark.parametrize(
    ("metric", "negated"),
    [("global_val_perplexity", True), ("global_val_loss", True), ("global_val_macro_f1", False)],
)
def test_the_best_model_direction_is_the_metrics_own_never_guessed_from_its_name(
    tmp_path: Path, metric: str, negated: bool
) -> None:
    """A perplexity is minimised although its name has no 'loss' in it (issue 25)."""
    path = write_yaml(tmp_path / "t.yaml", {**_demo_template(), "key_metric": metric})
    server = _server_config(create_job(resolve_spec(load_template(str(path)), "fedavg"), tmp_path))
    selector = next(c for c in server["components"] if c["id"] == "model_selector")["args"]
    assert selector["key_metric"] == metric and selector.get("negate_key_metric", False) is negated


def test_a_key_metric_fedllm_does_not_know_needs_its_direction(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "t.yaml", {**_demo_template(), "key_metric": "global_val_bleu"})
    with pytest.raises(ConfigError, match=r"key_metric_mode: min .* or max"):
        load_template(str(path))
    write_yaml(path, {**_demo_template(), "key_metric": "global_val_bleu", "key_metric_mode": "max"})
    assert load_template(str(path)).key_metric_direction == "max"


def _demo_template() -> dict:
    """demo-mlp's template as data, without its key_metric_mode (the tests set the metric)."""
    import yaml

    from fedllm.resources import resource_dir

    data = yaml.safe_load((resource_dir("jobs") / "demo-mlp.yaml").read_text())
    del data["key_metric_mode"]
    return data


def test_a_template_that_is_not_utf8_yaml_is_reported_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_bytes(b"name: x\ntrainer: \xff\n")
    with pytest.raises(ConfigError, match=r"t.yaml:2: not UTF-8 text"):
        load_template(str(path))
    path.write_bytes(b"name: x\ntrainer: a\x1fb\n")
    with pytest.raises(ConfigError, match=r"t.yaml:2: malformed YAML: .*character 31"):
        load_template(str(path))


def test_a_server_model_class_that_is_not_there_is_refused(tmp_path: Path) -> None:
    data = _demo_template()
    data["initial_model"]["class_path"] = "fedllm.flare.server_models.TinyClasifier"
    path = write_yaml(tmp_path / "t.yaml", data)
    with pytest.raises(JobSpecError, match="has no class TinyClasifier, so the server could not build"):
        resolve_spec(load_template(str(path)), "fedavg")


def test_what_job_create_sets_itself_is_not_set_with_a(template) -> None:
    with pytest.raises(JobSpecError, match=r"-a epochs=...: job create sets epochs .* Fix: use --local-epochs"):
        resolve_spec(template, "fedavg", extra_args={"epochs": 3})
    with pytest.raises(JobSpecError, match=r"-a train=... and --data both set train"):
        resolve_spec(template, "fedavg", extra_args={"train": "a.npz"}, data=["b.npz"])
