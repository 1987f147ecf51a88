"""End to end on loopback: submit → train on 3 sites → finished → downloaded result with metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fedllm.flare.registration import MARKER_NAME
from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.submit import COMPLETED, JobFailed, submit_job
from fedllm.jobs.template import load_template
from fedllm.provision.compose import REGISTRATION_MAX_AGE_S
from fedllm.results.metrics import (
    BEST_MODEL_NAME,
    load_global_state,
    read_final_evaluation,
    read_round_metrics,
    read_site_scalars,
)
from fedllm.runtime.admin import admin_session, connected_sites
from fedllm.training.toy import demo_mlp

pytestmark = pytest.mark.federation
SITES = ["site-1", "site-2", "site-3"]


def test_all_sites_are_registered(federation) -> None:
    with admin_session(federation) as session:
        assert connected_sites(session) >= {"site-1", "site-2", "site-3"}
    # Each site process keeps its registration marker fresh (what the site containers' healthcheck reads);
    # native sites run in their kit folder, their NVFlare workspace.
    for site in ("site-1", "site-2", "site-3"):
        marker = federation.site(site) / MARKER_NAME
        assert marker.is_file(), f"{site} wrote no registration marker"
        assert time.time() - marker.stat().st_mtime < REGISTRATION_MAX_AGE_S


def test_fedavg_job_trains_and_returns_its_result(federation, data_root: Path, tmp_path: Path) -> None:
    spec = resolve_spec(load_template("demo-mlp"), "fedavg", rounds=3)
    job = create_job(spec, tmp_path / "jobs")
    result = submit_job(federation, job, download=tmp_path / "results", timeout=600, echo=lambda _m: None)
    assert result.status == COMPLETED

    rounds = read_round_metrics(result.result_dir)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds:
        assert set(r["sites"]) == {"site-1", "site-2", "site-3"}
        assert 0.0 <= r["aggregated"]["val_accuracy"] <= 1.0
    # The global model each site receives gets better as rounds go by (round 0 gets the random init).
    global_acc = [r["aggregated"]["global_val_accuracy"] for r in rounds]
    assert global_acc[-1] > global_acc[0] + 0.3

    # The downloaded global model really learned: well above chance (1/3) on the shared validation set.
    val = demo_mlp.load_split(data_root / "data" / "val.npz", "validation")
    task = demo_mlp.ClassifierTask(val, val)
    task.load_exchanged_state(load_global_state(result.result_dir))
    final_acc = task.evaluate()["val_accuracy"]
    assert final_acc > 0.8

    # The best global model is the round whose RECEIVED model scored best (global_val_accuracy, the key metric).
    task.load_exchanged_state(load_global_state(result.result_dir, best=True))
    assert task.evaluate()["val_accuracy"] == pytest.approx(max(global_acc), abs=1e-9)
    # After the last round every site evaluated the final global model (and the best one): the same numbers.
    final = read_final_evaluation(result.result_dir)
    assert {s: m["global_val_accuracy"] for s, m in final.items()} == dict.fromkeys(SITES, pytest.approx(final_acc))
    best = read_final_evaluation(result.result_dir, model=BEST_MODEL_NAME)
    assert {s: m["global_val_accuracy"] for s, m in best.items()} == dict.fromkeys(
        SITES, pytest.approx(max(global_acc))
    )
    # Every site's per-round curves reached the server's TensorBoard (NVFlare experiment tracking).
    scalars = read_site_scalars(result.result_dir)
    assert [step for step, _ in scalars["site-2"]["val_accuracy"]] == [0, 1, 2]

    # Each site's own job log came back with the result.
    assert sorted(p.name for p in (result.result_dir / "site_logs").iterdir()) == [
        "site-1.log",
        "site-2.log",
        "site-3.log",
    ]
    assert "round 2" in (result.result_dir / "site_logs" / "site-3.log").read_text()
    # The job is stored in this federation's own server workspace, not in a machine-wide /tmp store.
    assert (federation.server() / "jobs-storage" / result.job_id).is_dir()


def test_local_mode_trains_each_site_alone_for_one_round(federation, tmp_path: Path) -> None:
    spec = resolve_spec(load_template("demo-mlp"), "local", local_epochs=2)
    result = submit_job(
        federation, create_job(spec, tmp_path), download=tmp_path / "results", timeout=600, echo=lambda _m: None
    )
    rounds = read_round_metrics(result.result_dir)
    assert len(rounds) == 1 and len(rounds[0]["sites"]) == 3


def test_failing_site_fails_the_job_and_names_its_error(federation, tmp_path: Path) -> None:
    spec = resolve_spec(
        load_template("demo-mlp"),
        "fedavg",
        rounds=2,
        data=["{data_dir}/train.npz", "/nonexistent/train.npz", "{data_dir}/train.npz"],
        sites=["site-1", "site-2", "site-3"],
    )
    with pytest.raises(JobFailed) as info:
        submit_job(federation, create_job(spec, tmp_path), download=tmp_path / "results", echo=lambda _m: None)
    failure = info.value
    assert failure.status.startswith("FINISHED:") and failure.status != COMPLETED
    first_site, first_error = next(iter(failure.site_errors.items()))
    assert first_site == "site-2"
    assert first_error.startswith("fedllm.data.io.DataError: training file /nonexistent/train.npz not found")
    assert "Fix:" in first_error and "site-2: fedllm.data.io.DataError" in str(failure)
    assert json.loads((failure.result_dir / "meta.json").read_text())["status"] == failure.status
