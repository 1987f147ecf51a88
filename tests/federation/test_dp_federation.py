"""A --dp job through the real federation: each site's ε in round_metrics.jsonl is the RDP analysis', and the
server ends the job at the round the plan stated, completed, with its global model; no train_loss leaves a site."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

try:  # .venv-nemo has no opacus: there the module must still import (its tests are not selected there)
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
except ImportError:
    RDPAccountant = compute_rdp = get_privacy_spent = None

from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.submit import COMPLETED, submit_job
from fedllm.jobs.template import load_template
from fedllm.results.metrics import load_global_state, read_final_evaluation, read_round_metrics, read_site_scalars
from fedllm.results.report import write_report

pytestmark = pytest.mark.federation
SITES = ["site-1", "site-2", "site-3"]


def oracle_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    return float(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


def test_dp_job_reports_the_accountants_epsilon_and_stops_at_the_planned_round(federation, tmp_path: Path) -> None:
    # σ=1, q=0.1, 10 steps a round: ε after rounds 1..4 = 3.44, 4.22, 4.85, 5.39, so a budget of 4.5 holds 2 rounds.
    spec = resolve_spec(load_template("demo-mlp"), "fedavg", rounds=4,
                        dp="epsilon=4.5,delta=1e-5,noise=1.0,clip=1.0,sample_rate=0.1")  # fmt: skip
    assert spec.dp is not None and (spec.dp.stop_round, spec.dp.steps_per_round) == (2, 10)
    result = submit_job(federation, create_job(spec, tmp_path / "jobs"), download=tmp_path / "results", timeout=600,
                        echo=lambda _m: None)  # fmt: skip
    assert result.status == COMPLETED

    rounds = read_round_metrics(result.result_dir)
    assert [r["round"] for r in rounds] == [0, 1]  # rounds 2 and 3 would exceed ε=4.5: the server ran none
    for r in rounds:
        expected = oracle_epsilon(0.1, 1.0, 10 * (r["round"] + 1), 1e-5)
        assert set(r["sites"]) == set(SITES)
        for site, metrics in r["sites"].items():
            assert abs(metrics["dp_epsilon"] - expected) < 1e-6, site
            assert metrics["dp_steps_total"] == 10 * (r["round"] + 1)
            assert (metrics["dp_delta"], metrics["dp_noise_multiplier"], metrics["dp_sample_rate"]) == (1e-5, 1.0, 0.1)
            assert "train_loss" not in metrics  # computed on private records without noise: it stays at the site
    scalars = read_site_scalars(result.result_dir)  # the server's TensorBoard (experiment tracking)
    assert all("train_loss" not in scalars[site] and len(scalars[site]["dp_epsilon"]) == 2 for site in SITES)
    for site in SITES:
        assert "train_loss" not in (result.result_dir / "site_logs" / f"{site}.log").read_text()
        ledgers = list(federation.site(site).glob(f"fedllm-state/{result.job_id}/dp-ledger.json"))
        assert len(ledgers) == 1 and sum(h[2] for h in json.loads(ledgers[0].read_text())["history"]) == 20

    server_log = (result.result_dir / "workspace" / "log.txt").read_text(errors="replace")
    assert "round 2 would take it to ε=4.848" in server_log and "the job ends after round 1 of 4" in server_log
    # It ended as any job does: its global model saved and evaluated by every site.
    assert load_global_state(result.result_dir)
    assert set(read_final_evaluation(result.result_dir)) == set(SITES)
    # fedllm report states the privacy each site spent.
    report = write_report({"dp": result.result_dir}, tmp_path / "report")
    assert f"site-2 ε={oracle_epsilon(0.1, 1.0, 20, 1e-5):.3f}" in report.table
