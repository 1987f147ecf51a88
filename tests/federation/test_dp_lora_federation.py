"""hf-lora with record-level DP-SGD through the real federation: NVFlare's HF patch drives the DP Trainer.

Two sites, a job of three rounds whose budget holds two (restore_state=True, NVFlare's patch): every round's
result carries the site's ε, which equals Opacus' RDP analysis computed here for the same (q, σ, steps) to 1e-6;
the steps add up across rounds; the server ends the job after the second round, completed; the global adapter
moved; nothing computed on private records without noise reached the server's TensorBoard (the training loss
stays in the site's own); `fedllm report` states each site's ε; each site's ledger stays after the job.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedllm.data.io import write_jsonl_files
from fedllm.data.synthetic import sentiment_records
from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.submit import COMPLETED, submit_job
from fedllm.jobs.template import load_template
from fedllm.results.metrics import load_global_state, read_round_metrics, read_site_scalars
from fedllm.results.report import write_report
from fedllm.training.dp import LEDGER_NAME, PrivacyLedger
from fedllm.training.hf.tiny_gpt import build_tiny_gpt
from fedllm.training.lineage import STATE_ROOT

pytestmark = pytest.mark.federation

SIGMA, CLIP, Q, DELTA = 1.0, 1.0, 0.125, 1e-5
RECORDS, ROUNDS = 48, 2  # rounds run: ε after rounds 1..3 = 3.79, 4.70, 5.41, so a budget of 5 holds 2 of 3
STEPS = 8  # ceil(1 epoch / q)
BUDGET = 5.0


def _pairs(n: int, seed: int) -> list[dict[str, str]]:
    return [{"input": f"{r['sentence']} sentiment:", "output": r["label"]} for r in sentiment_records(n, seed)]


def _oracle_epsilon(steps: int) -> float:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=Q, noise_multiplier=SIGMA, steps=steps, orders=orders)
    return float(get_privacy_spent(orders=orders, rdp=rdp, delta=DELTA)[0])


def test_dp_lora_reports_the_accountants_epsilon_every_round(federation, data_root: Path, tmp_path: Path) -> None:
    root = data_root / "dp-lora"
    write_jsonl_files(
        {
            root / "validation.jsonl": _pairs(8, 2),
            root / "site-1.jsonl": _pairs(RECORDS, 3),
            root / "site-2.jsonl": _pairs(RECORDS, 4),
        }
    )
    spec = resolve_spec(
        load_template("hf-lora"), "fedavg", num_clients=2, rounds=ROUNDS + 1, local_epochs=1,
        model=str(build_tiny_gpt(log=lambda _m: None)), validation=str(root / "validation.jsonl"),
        extra_args={"lr": 0.01, "max_length": 64, "logging_steps": 1, "cpu_threads": 1},
        data=[str(root / "site-1.jsonl"), str(root / "site-2.jsonl")], sites=["site-1", "site-2"],
        dp=f"epsilon={BUDGET},noise={SIGMA},clip={CLIP},sample_rate={Q},delta={DELTA}",
    )  # fmt: skip
    assert spec.dp is not None and (spec.dp.stop_round, spec.dp.steps_per_round) == (ROUNDS, STEPS)
    result = submit_job(federation, create_job(spec, tmp_path / "jobs"), download=tmp_path / "results", timeout=600)
    assert result.status == COMPLETED

    history = read_round_metrics(result.result_dir)
    assert [r["round"] for r in history] == list(range(ROUNDS)), "the third round would exceed ε=5: none ran"
    for r in history:
        steps = STEPS * (r["round"] + 1)
        for site in ("site-1", "site-2"):
            sent = r["sites"][site]
            assert sent["dp_steps_total"] == steps
            assert sent["dp_epsilon"] == pytest.approx(_oracle_epsilon(steps), abs=1e-6)
            assert (sent["dp_delta"], sent["dp_noise_multiplier"], sent["dp_sample_rate"]) == (DELTA, SIGMA, Q)

    # The global adapter trained (PEFT starts lora_B at zero): DP's updates reached it.
    state = load_global_state(result.result_dir)
    assert max(v.abs().max().item() for k, v in state.items() if "lora_B" in k) > 0

    scalars = read_site_scalars(result.result_dir)
    for site in ("site-1", "site-2"):
        tags = set(scalars[site])
        assert not tags & {"loss", "grad_norm", "train_loss", "num_tokens", "mean_token_accuracy", "entropy"}
        assert [s for s, _ in scalars[site]["dp_epsilon"]] == [STEPS * (r + 1) for r in range(ROUNDS)]
    log = (result.result_dir / "site_logs" / "site-1.log").read_text()
    assert "'dp_epsilon'" in log and "'loss'" not in log and "train_loss" not in log  # the job log the server gets
    # The template's batch 4 × accumulation 2 do not apply: a step is one Poisson batch.
    assert (
        f"DP-SGD: {STEPS} Poisson steps per round (sample rate {Q:g}: expected batch 6 of {RECORDS} examples; "
        "--batch-size 4 and --grad-accum 2 do not apply)" in log
    )
    # The training loss stays in the site's own TensorBoard, every step of both rounds.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    own = EventAccumulator(str(federation.site("site-1") / result.job_id / "tb"), size_guidance={"scalars": 0})
    own.Reload()
    assert [e.step for e in own.Scalars("train/loss")] == list(range(1, ROUNDS * STEPS + 1))
    # fedllm report states the privacy each site spent.
    report = write_report({"dp-lora": result.result_dir}, tmp_path / "report")
    assert f"site-2 ε={_oracle_epsilon(ROUNDS * STEPS):.3f}" in report.table
    for site in ("site-1", "site-2"):  # the record of what each site spent stays after the job
        ledger = PrivacyLedger.load(federation.site(site) / STATE_ROOT / result.job_id / LEDGER_NAME)
        assert [h[2] for h in ledger.history] == [STEPS] * ROUNDS
