"""`job create --dp`: the calibrated σ, ε after each round, and the refusals that name the numbers and the fix."""

from __future__ import annotations

import pytest

try:  # .venv-nemo has no opacus: there the module must still import (its tests are not selected there)
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
except ImportError:
    RDPAccountant = compute_rdp = get_privacy_spent = None

from fedllm.jobs.create import resolve_spec
from fedllm.jobs.errors import JobSpecError
from fedllm.jobs.template import load_template
from fedllm.training.dp import DPSettings


def oracle_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    return float(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


def test_noise_is_calibrated_for_the_whole_job_and_travels_to_the_sites() -> None:
    spec = resolve_spec(load_template("demo-mlp"), "fedavg", rounds=4, local_epochs=2, dp="epsilon=8")
    plan = spec.dp
    assert plan is not None and plan.steps_per_round == 40  # ceil(2 epochs / q=0.05)
    sigma = plan.settings.noise_multiplier
    assert oracle_epsilon(0.05, sigma, 160, 1e-5) <= 8.0 < oracle_epsilon(0.05, sigma * 0.97, 160, 1e-5)
    assert plan.stop_round == 4
    assert all(abs(e - oracle_epsilon(0.05, sigma, 40 * r, 1e-5)) < 1e-6 for r, e in enumerate(plan.epsilons, 1))
    assert DPSettings.from_arg(spec.train_args["dp"]) == plan.settings


def test_given_noise_states_the_stop_round() -> None:
    spec = resolve_spec(load_template("demo-mlp"), "fedavg", rounds=4, dp="epsilon=4.5,noise=1,sample_rate=0.1")
    assert spec.dp is not None and spec.dp.stop_round == 2


@pytest.mark.parametrize(
    ("dp", "kwargs", "message"),
    [
        ("epsilon=3,noise=1.0,sample_rate=0.1", {}, r"first round already spends ε₁=3\.441 > epsilon=3 \(σ=1, q=0\.1, "
         r"10 steps a round, δ=1e-05\); one round within ε=3 needs σ ≥ 1\.07"),
        ("epsilon=abc", {}, r"--dp epsilon='abc': not a number"),
        ("delta=2,epsilon=1", {}, r"--dp delta=2\.0: δ is a probability in \(0, 1\)"),
        ("sample_rate=0", {}, r"give the budget \(epsilon=E\) or the noise"),
        ("epsilon=8,sample_rate=1.5", {}, r"sample_rate=1\.5: q is a probability"),
        ("epsilon=8", {"extra_args": {"dp": "noise=1"}}, r"-a dp=\.\.\.: job create sets dp from the mode and --dp"),
        ("epsilon=1e-9", {}, r"privacy budget is too low"),
    ],
)  # fmt: skip
def test_bad_dp_settings_are_refused_with_the_fix(dp: str, kwargs: dict, message: str) -> None:
    with pytest.raises(JobSpecError, match=message):
        resolve_spec(load_template("demo-mlp"), "fedavg", rounds=4, dp=dp, **kwargs)


def test_dp_is_refused_for_nemo_and_trainers_without_dp_sgd() -> None:
    with pytest.raises(JobSpecError, match=r"NeMo .* has no DP-SGD in fedllm"):
        resolve_spec(load_template("nemo-ptuning-345m"), "fedavg", dp="epsilon=8")
    with pytest.raises(JobSpecError, match=r"trainer fedllm\.training\.hf\.sft has no DP-SGD"):
        resolve_spec(load_template("hf-sft"), "fedavg", model="/m", dp="epsilon=8")


def test_dp_is_refused_on_more_than_one_device_per_site() -> None:
    from fedllm.jobs.privacy import resolve_dp
    from fedllm.jobs.trainer_args import trainer_arguments

    template = load_template("demo-mlp")
    trainer = trainer_arguments(template.trainer)
    common = {"rounds": 2, "local_epochs": 1, "extra_args": {}}
    with pytest.raises(JobSpecError, match=r"--dp with --devices 2: DP-SGD runs on one device per site"):
        resolve_dp("epsilon=8", template, trainer, devices=2, site_args={}, **common)
    with pytest.raises(JobSpecError, match=r"--dp with site-2: devices=4"):
        resolve_dp("epsilon=8", template, trainer, devices=1, site_args={"site-2": {"devices": 4}}, **common)
