"""`fedllm job create --secure-agg`: defaults, the job it writes, and every create-time refusal (one line, no job)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedllm.jobs.create import resolve_spec
from fedllm.jobs.errors import JobSpecError
from fedllm.jobs.secure_agg import SecureAggregation, default_threshold
from fedllm.jobs.template import load_template
from tests.support.cli_fuzz import assert_clean, run_cli
from tests.support.sites import local_config_dict, write_yaml


@pytest.fixture(autouse=True)
def _here(tmp_path: Path, monkeypatch) -> None:
    """Run in an empty folder: no site_configs/default.yaml, no provisioned workspace, no env overrides."""
    monkeypatch.chdir(tmp_path)
    for name in ("FEDLLM_CONFIG", "FEDLLM_WORKSPACE", "FEDLLM_JOBS_DIR", "FEDLLM_HOST_JOBS_DIR"):
        monkeypatch.delenv(name, raising=False)


def _config(tmp_path: Path, sites: int) -> str:
    return str(write_yaml(tmp_path / f"sites{sites}.yaml", local_config_dict(sites=sites)))


def _json(job: Path, name: str) -> dict:
    return json.loads(next(job.rglob(name)).read_text())


def test_default_threshold_is_a_majority() -> None:
    assert [default_threshold(n) for n in (3, 4, 5, 8)] == [2, 3, 3, 5]


def test_secure_agg_job_wires_the_masking_server_and_sites(tmp_path: Path) -> None:
    outcome = run_cli(["job", "create", "demo-mlp", "-c", _config(tmp_path, 5), "--out", "jobs", "--secure-agg"])
    assert outcome.code == 0, outcome.text
    assert "secure aggregation: threshold t=3" in outcome.out and "3 site(s) or more" in outcome.out
    job = tmp_path / "jobs" / "demo-mlp-fedavg-5sites"
    # The job starts with min_sites (= t) and a dropout does not end it; each round still goes to all 5 sites.
    assert json.loads((job / "meta.json").read_text())["min_clients"] == 3
    server = _json(job, "config_fed_server.json")
    (controller,) = [w for w in server["workflows"] if w["id"] == "controller"]
    assert controller["path"] == "fedllm.flare.secagg.server.SecAggFedAvg"
    assert controller["args"]["num_clients"] == 5
    components = {c["id"]: c for c in server["components"]}
    assert components["fedllm_secagg"]["args"]["threshold"] == 3
    assert server["dead_client_grace_period"] > components["fedllm_secagg"]["args"].get("stage_timeout_s", 60.0)
    client = _json(job, "config_fed_client.json")
    assert "fedllm_secagg_client" in {c["id"] for c in client["components"]}
    (out_filters,) = client["task_result_filters"]
    paths = [f["path"].rsplit(".", 1)[1] for f in out_filters["filters"]]
    assert paths == ["SecAggMask", "WireViews"]  # the mask is the last filter but the wire's own
    # Both ends know the largest weight counted as is (default 1000; --secagg-max-weight).
    assert components["fedllm_secagg"]["args"]["max_weight"] == 1000.0
    assert {c["id"]: c for c in client["components"]}["fedllm_secagg_client"]["args"]["max_weight"] == 1000.0
    (in_filters,) = client["task_data_filters"]
    assert [f["path"].rsplit(".", 1)[1] for f in in_filters["filters"]] == ["SecAggRemember"]


def test_a_plain_job_has_no_secure_aggregation_but_the_inert_capture_hook(tmp_path: Path) -> None:
    outcome = run_cli(["job", "create", "demo-mlp", "-c", _config(tmp_path, 3), "--out", "jobs"])
    assert outcome.code == 0, outcome.text
    server = _json(tmp_path / "jobs" / "demo-mlp-fedavg-3sites", "config_fed_server.json")
    ids = {c["id"] for c in server["components"]}
    assert "fedllm_secagg" not in ids and "fedllm_result_capture" in ids
    assert "secure aggregation" not in outcome.out


@pytest.mark.parametrize(
    ("args", "sites", "message"),
    [
        (["--num-clients", "2"], 3, "--secure-agg needs at least 3 sites, and the job has 2"),
        (["--secagg-threshold", "4"], 3, "--secagg-threshold 4: the threshold is between 2 and the job's 3 sites"),
        (["--secagg-threshold", "1"], 3, "Fix: --secagg-threshold 2 (the default"),
        (["--secagg-threshold", "4", "--secagg-min-sites", "3"], 5, "--secagg-min-sites 3 is below the threshold t=4"),
        (["--secagg-min-sites", "6"], 5, "--secagg-min-sites 6: more than the job's 5 sites"),
        (["--compress", "fp16"], 3, "--secure-agg with compression fp16"),
        (["--mode", "local"], 3, "--secure-agg with --mode local: there is no aggregate to hide"),
        (["--mode", "central"], 3, "--secure-agg with --mode central"),
        (["--secagg-clip", "0"], 3, "--secagg-clip 0: a clip bound is > 0"),
        (["--secagg-max-weight", "0"], 3, "--secagg-max-weight 0: the largest FedAvg weight is > 0"),
    ],
)
def test_refused_at_create_time_with_the_numbers_and_the_fix(tmp_path: Path, args, sites, message) -> None:
    outcome = run_cli(
        ["job", "create", "demo-mlp", "-c", _config(tmp_path, sites), "--out", "jobs", "--secure-agg", *args]
    )
    assert_clean(outcome)
    assert outcome.code == 1, outcome.text
    assert message in " ".join(outcome.err.split()), outcome.err
    assert not (tmp_path / "jobs").exists()


def test_a_federation_too_small_for_secure_aggregation_is_refused(tmp_path: Path) -> None:
    outcome = run_cli(["job", "create", "demo-mlp", "-c", _config(tmp_path, 2), "--out", "jobs", "--secure-agg"])
    assert_clean(outcome)
    assert outcome.code == 1
    assert "the job has 2 (the site config has 2)" in " ".join(outcome.err.split())


def test_min_sites_is_checked_against_the_federation() -> None:
    from fedllm.config import load_site_config
    from fedllm.jobs.sites import Federation

    cfg = load_site_config(write_yaml(Path("sites4.yaml"), local_config_dict(sites=4)))
    federation = Federation(cfg, "sites4.yaml")
    spec = resolve_spec(
        load_template("demo-mlp"), "fedavg", federation=federation, secure_agg=SecureAggregation(min_sites=4)
    )
    assert spec.secure_agg == SecureAggregation(threshold=3, min_sites=4)
    with pytest.raises(JobSpecError, match="--secagg-min-sites 5: more than the job's 4 sites"):
        resolve_spec(
            load_template("demo-mlp"), "fedavg", federation=federation, secure_agg=SecureAggregation(min_sites=5)
        )


def test_a_template_whose_wire_dtype_compresses_is_refused(tmp_path: Path) -> None:
    template = load_template("demo-mlp")
    narrow = template.model_copy(update={"exchange": template.exchange.model_copy(update={"wire_dtype": "bfloat16"})})
    with pytest.raises(JobSpecError, match="compression bf16"):
        resolve_spec(narrow, "fedavg", secure_agg=SecureAggregation())


def test_secagg_settings_without_the_switch_are_a_usage_error(tmp_path: Path) -> None:
    outcome = run_cli(
        ["job", "create", "demo-mlp", "-c", _config(tmp_path, 3), "--out", "jobs", "--secagg-threshold", "2"]
    )
    assert_clean(outcome)
    assert outcome.code == 2 and "add --secure-agg" in outcome.err
