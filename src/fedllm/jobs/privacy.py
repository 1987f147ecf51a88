"""`fedllm job create --dp`: the job's DP-SGD settings, its privacy budget per round, and the refusals.

The sites' schedule is job-wide (fedllm.training.dp): σ, q and `ceil(local_epochs / q)` steps a round, so the
privacy each site spends after round r is known here. Without `noise`, σ is calibrated so that the whole job
(rounds × steps) ends within ε; with it, the plan shows after which round the budget ends, and the server stops
there (fedllm.flare.dp_budget). A job whose first round already exceeds ε is refused, with the σ one round needs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fedllm.jobs.errors import JobSpecError
from fedllm.jobs.template import JobTemplate
from fedllm.training.dp import (
    DEFAULT_CLIP,
    DEFAULT_DELTA,
    DEFAULT_SAMPLE_RATE,
    GRAMMAR,
    BudgetPlan,
    DPError,
    DPSettings,
    calibrate_noise,
    parse_assignments,
    plan_budget,
    steps_per_round,
)

DP_KEY = "dp"  # the trainer argument the settings travel in
NEMO_PREFIX = "fedllm.training.nemo"


def check_dp_template(template: JobTemplate, trainer: Any) -> None:
    """Only trainers with DP-SGD take --dp; NeMo's do not (out of scope), nor one that cannot be checked here."""
    if template.trainer.startswith(NEMO_PREFIX):
        raise JobSpecError(
            f"--dp: template {template.name} trains with NeMo (Megatron), which has no DP-SGD in fedllm: per-record "
            "gradients through Megatron's tensor-parallel layers are not what Opacus supports. Fix: drop --dp, or "
            "use an HF template (hf-ptuning; demo-mlp for a smoke test)"
        )
    if trainer is None or not trainer.takes(DP_KEY):
        raise JobSpecError(
            f"--dp: template {template.name}'s trainer {template.trainer} "
            + ("cannot be loaded here to check that it has DP-SGD" if trainer is None else "has no DP-SGD")
            + ". Fix: drop --dp, or use a template whose trainer takes --dp (`fedllm job args TEMPLATE` lists dp)"
        )


def resolve_dp(
    text: str,
    template: JobTemplate,
    trainer: Any,
    *,
    rounds: int,
    local_epochs: int,
    devices: int,
    site_args: dict[str, dict[str, Any]],
    extra_args: dict[str, Any],
) -> BudgetPlan:
    """The job's DP settings and budget plan from `--dp TEXT`; refused (JobSpecError) where they cannot hold."""
    check_dp_template(template, trainer)
    if DP_KEY in extra_args:
        raise JobSpecError("-a dp=...: the DP settings are set by --dp (which also plans the budget). Fix: use --dp")
    for site, overrides in site_args.items():
        if DP_KEY in overrides:
            raise JobSpecError(f"--site {site}:dp=...: DP settings are job-wide (one schedule for all). Fix: use --dp")
    spread = {site: int(o["devices"]) for site, o in site_args.items() if int(o.get("devices", 1)) > 1}
    if devices > 1 or spread:
        who = f"--devices {devices}" if devices > 1 else ", ".join(f"{s}: devices={d}" for s, d in spread.items())
        raise JobSpecError(
            f"--dp with {who}: DP-SGD runs on one device per site in this version (several ranks would need "
            "Opacus' distributed optimizer and a distributed Poisson sampler, which fedllm does not wire). "
            "Fix: --devices 1 (and no per-site devices), or drop --dp"
        )
    try:
        values = parse_assignments(text)
        epsilon, noise = values.get("epsilon"), values.get("noise_multiplier")
        if epsilon is None and noise is None:
            raise DPError(f"--dp {text!r}: give the budget (epsilon=E) or the noise (noise=SIGMA). Use {GRAMMAR}")
        delta = values.get("delta", DEFAULT_DELTA)
        q = values.get("sample_rate", DEFAULT_SAMPLE_RATE)
        base = DPSettings(delta=delta, noise_multiplier=noise or 1.0, max_grad_norm=values.get("max_grad_norm",
                          DEFAULT_CLIP), sample_rate=q, epsilon=epsilon, accountant=values.get("accountant", "rdp"))  # fmt: skip
        steps = steps_per_round(base, local_epochs)
        if noise is None:
            assert epsilon is not None
            noise = calibrate_noise(epsilon, delta, q, rounds * steps, base.accountant)
        settings = dataclasses.replace(base, noise_multiplier=noise)
    except DPError as exc:
        raise JobSpecError(str(exc)) from None
    plan = plan_budget(settings, local_epochs, rounds)
    if plan.stop_round == 0:
        assert epsilon is not None
        try:
            needed = f"σ ≥ {calibrate_noise(epsilon, delta, q, steps):.4g}"
        except DPError:
            needed = "no σ at all"
        raise JobSpecError(
            f"--dp: the first round already spends ε₁={plan.epsilons[0]:.4g} > epsilon={epsilon:g} (σ={noise:.4g}, "
            f"q={q:g}, {steps} steps a round, δ={delta:g}); one round within ε={epsilon:g} needs {needed}. Fix: a "
            "larger noise (or leave noise out to calibrate it), a larger epsilon, a smaller sample_rate, or fewer "
            "--local-epochs"
        )
    return plan


def plan_rows(plan: BudgetPlan) -> list[str]:
    """What `job create` prints about the budget: the schedule, ε after each round, and where the job stops."""
    s = plan.settings
    lines = [
        f"DP-SGD at every site: σ={s.noise_multiplier:.4g}, clip C={s.max_grad_norm:g}, Poisson sample rate "
        f"q={s.sample_rate:g} (expected batch q × a site's records), {plan.steps_per_round} steps a round, "
        f"δ={s.delta:g} ({s.accountant.upper()} accountant)",
        "ε after each round: " + ", ".join(f"{r}: {e:.3f}" for r, e in enumerate(plan.epsilons)),
    ]
    if s.epsilon is None:
        lines.append(f"no budget given: ε is reported, the job runs all {plan.rounds} rounds")
    elif plan.stop_round < plan.rounds:
        lines.append(
            f"budget ε={s.epsilon:g}: the job stops after round {plan.stop_round - 1} ({plan.stop_round} of "
            f"{plan.rounds} rounds, ε={plan.epsilon_after_stop:.3f}); round {plan.stop_round} would reach "
            f"ε={plan.epsilons[plan.stop_round]:.3f}"
        )
    else:
        lines.append(f"budget ε={s.epsilon:g}: all {plan.rounds} rounds fit (ε={plan.epsilons[-1]:.3f} at the end)")
    return lines
