"""DP-SGD at a site: the ε it reports against Opacus' RDP analysis, the ledger, Poisson batches, and that it trains."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

try:  # .venv-nemo has no opacus: there the module must still import (its tests are not selected there)
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
except ImportError:
    RDPAccountant = compute_rdp = get_privacy_spent = None

from fedllm.flare.server_models import TinyClassifier
from fedllm.training.core import run_round
from fedllm.training.dp import (
    DPError,
    DPSettings,
    PrivacyLedger,
    SiteBudget,
    calibrate_noise,
    dp_round,
    plan_budget,
    steps_per_round,
)
from fedllm.training.toy.demo_mlp import ClassifierTask

SETTINGS = DPSettings(delta=1e-5, noise_multiplier=1.1, max_grad_norm=1.0, sample_rate=0.1, epsilon=4.0)


def oracle_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    """ε straight from Opacus' RDP analysis functions (not fedllm's bookkeeping)."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    eps, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders),
                               delta=delta)  # fmt: skip
    return float(eps)


def mlp_task(seed: int = 0, n: int = 300) -> ClassifierTask:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = (np.eye(3, 8)[y] * 3 + rng.normal(size=(n, 8))).astype(np.float32)
    data = torch.from_numpy(x), torch.from_numpy(y)
    return ClassifierTask(data, data, lr=0.05, batch_size=32)


def initial_mlp_state() -> dict:
    return TinyClassifier(in_features=8, hidden=32, classes=3, seed=0).state_dict()


def test_reported_epsilon_equals_the_rdp_analysis_after_every_round(tmp_path) -> None:
    task = mlp_task()
    budget = SiteBudget(SETTINGS, tmp_path / "ledger.json")
    state = initial_mlp_state()
    per_round = steps_per_round(SETTINGS, 1)
    assert per_round == 10
    for rnd in range(3):
        state, metrics, steps = run_round(task, state, epochs=1, seed=rnd, budget=budget, round_=rnd)
        assert steps == per_round
        expected = oracle_epsilon(0.1, 1.1, per_round * (rnd + 1), 1e-5)
        assert abs(metrics["dp_epsilon"] - expected) < 1e-6
        assert metrics["dp_steps_total"] == per_round * (rnd + 1)
        assert (metrics["dp_delta"], metrics["dp_noise_multiplier"], metrics["dp_sample_rate"]) == (1e-5, 1.1, 0.1)
    # The plan job create prints is the same computation.
    plan = plan_budget(SETTINGS, 1, 3)
    assert all(abs(e - oracle_epsilon(0.1, 1.1, 10 * r, 1e-5)) < 1e-6 for r, e in enumerate(plan.epsilons, 1))


def test_ledger_survives_a_restart_and_epsilon_goes_on(tmp_path) -> None:
    path = tmp_path / "lineage" / "dp-ledger.json"
    first = SiteBudget(SETTINGS, path)
    first.spend(10, 0)
    first.spend(10, 1)
    again = SiteBudget(SETTINGS, path)  # a continuation job's new process
    assert again.ledger.steps_total == 20
    assert abs(again.metrics()["dp_epsilon"] - oracle_epsilon(0.1, 1.1, 20, 1e-5)) < 1e-6
    again.spend(10, 2)
    assert abs(SiteBudget(SETTINGS, path).metrics()["dp_epsilon"] - oracle_epsilon(0.1, 1.1, 30, 1e-5)) < 1e-6
    assert not list(path.parent.glob(".*tmp"))  # written atomically


@pytest.mark.parametrize(
    "damage",
    [
        lambda t: t.replace('"history"', '"hist"'),
        lambda t: t.replace("10", "1", 1),  # fewer steps: the CRC no longer matches
        lambda t: t[: len(t) // 2],
        lambda t: "",
    ],
)
def test_a_damaged_ledger_is_refused_not_reset(tmp_path, damage) -> None:
    path = tmp_path / "dp-ledger.json"
    budget = SiteBudget(SETTINGS, path)
    budget.spend(10, 0)
    path.write_text(damage(path.read_text()))
    with pytest.raises(DPError, match=r"privacy ledger .* (cannot be read|fails its check)"):
        PrivacyLedger.load(path)


def test_poisson_batches_vary_and_empty_batches_are_noise_only_steps() -> None:
    model = torch.nn.Linear(4, 2)
    x, y = torch.randn(50, 4), torch.randint(0, 2, (50,))
    before = model.weight.detach().clone()
    settings = DPSettings(delta=1e-5, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.04)
    outcome = dp_round(model, torch.optim.SGD(model.parameters(), lr=0.1),
                       lambda i: torch.nn.functional.cross_entropy(model(x[i]), y[i]),
                       num_records=50, settings=settings, steps=120)  # fmt: skip
    assert outcome.steps == 120 == len(outcome.batch_sizes)
    assert len(set(outcome.batch_sizes)) >= 3  # Poisson: the size varies around q·n = 2
    assert 0 in outcome.batch_sizes  # and is sometimes empty: still a step, counted
    assert abs(np.mean(outcome.batch_sizes) - 2) < 1
    assert (model.weight - before).abs().max() > 0
    assert not hasattr(model.weight, "grad_sample") or model.weight.grad_sample is None  # hooks removed


def test_the_noise_and_the_draws_cannot_be_replayed() -> None:
    """Two rounds from the same weights, data and job seed differ: the noise and the Poisson draws come from the OS."""
    torch.manual_seed(0)
    x, y = torch.randn(50, 4), torch.randint(0, 2, (50,))
    settings = DPSettings(delta=1e-5, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.2)
    results = []
    for _ in range(2):
        torch.manual_seed(0)  # what a job's --seed would fix
        model = torch.nn.Linear(4, 2)
        outcome = dp_round(model, torch.optim.SGD(model.parameters(), lr=0.1),
                           lambda i, m=model: torch.nn.functional.cross_entropy(m(x[i]), y[i]),
                           num_records=50, settings=settings, steps=5)  # fmt: skip
        results.append((model.weight.detach().clone(), outcome.batch_sizes))
    assert (results[0][0] - results[1][0]).abs().max() > 0


def test_a_dp_round_changes_the_demo_mlp_weights() -> None:
    task = mlp_task()
    state = initial_mlp_state()
    out, metrics, _ = run_round(task, state, epochs=1, seed=0, budget=SiteBudget(SETTINGS, None))
    assert max((out[k] - state[k]).abs().max().item() for k in state) > 0
    assert metrics["val_accuracy"] > 0.5  # three well-separated classes: one DP round already learns


def test_settings_travel_exactly_and_bad_values_name_the_fix() -> None:
    assert DPSettings.from_arg(SETTINGS.to_arg()) == SETTINGS
    with pytest.raises(DPError, match=r"delta=2\.0: δ is a probability"):
        DPSettings(delta=2.0, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1)
    with pytest.raises(DPError, match="noise=SIGMA"):
        DPSettings.from_arg("epsilon=8")
    with pytest.raises(DPError, match="'foo=1' is not KEY=VALUE"):
        DPSettings.from_arg("foo=1,noise=1")


def test_calibrated_noise_meets_the_budget_at_the_end_of_the_job() -> None:
    sigma = calibrate_noise(8.0, 1e-5, 0.05, 200)
    assert oracle_epsilon(0.05, sigma, 200, 1e-5) <= 8.0
    assert oracle_epsilon(0.05, sigma * 0.98, 200, 1e-5) > 8.0 - 0.05  # and is not much larger than needed
    assert math.isfinite(sigma)


def test_the_site_refuses_a_round_over_its_budget(tmp_path) -> None:
    budget = SiteBudget(SETTINGS, tmp_path / "ledger.json")
    assert budget.would_exceed(10) is None
    for rnd in range(plan_budget(SETTINGS, 1, 20).stop_round):
        budget.spend(10, rnd)
    over = budget.would_exceed(10)
    assert over is not None and over > SETTINGS.epsilon
    assert json.loads((tmp_path / "ledger.json").read_text())["format"] == 1
