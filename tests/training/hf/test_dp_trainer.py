"""Record-level DP-SGD for LoRA in TRL's SFTTrainer (fedllm.training.hf.dp_trainer), on a tiny GPT, without NVFlare.

Two rounds run the way NVFlare's patch runs them with restore_state=True: the Trainer saves a checkpoint at the
round's last step, and the next train() resumes from it with max_steps extended by one round; a third round runs
in a new Trainer, as a continuation job after a restart does. ε is checked against Opacus' RDP analysis computed
here directly (not through fedllm's ledger or Opacus' accountant object).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedllm.data.synthetic import sentiment_records
from fedllm.training.dp import LEDGER_NAME, DPError, PrivacyLedger
from fedllm.training.hf.dp_trainer import per_example_loss, shareable_log
from fedllm.training.hf.sft import build_trainer, parser, steps_per_round
from fedllm.training.hf.trainer_options import TrainerOptionError

SIGMA, CLIP, Q, DELTA = 1.0, 1.0, 0.125, 1e-5
RECORDS = 64


def _pairs(n: int, seed: int) -> list[dict[str, str]]:
    return [{"input": f"{r['sentence']} sentiment:", "output": r["label"]} for r in sentiment_records(n, seed=seed)]


def _args(tiny_gpt: Path, *extra: str, dp: str = f"noise={SIGMA},clip={CLIP},sample_rate={Q}"):
    argv = ["--model", str(tiny_gpt), "--train", "-", "--val", "-", "--max-length", "64", "--lr", "0.01"]
    args = parser("lora").parse_args([*argv, "--dp", f"{dp},delta={DELTA}", *extra])
    args.model_path = str(tiny_gpt)
    return args


def _oracle_epsilon(steps: int) -> float:
    """Opacus' RDP analysis of the sampled Gaussian mechanism, at RDPAccountant's orders."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=Q, noise_multiplier=SIGMA, steps=steps, orders=orders)
    return float(get_privacy_spent(orders=orders, rdp=rdp, delta=DELTA)[0])


class _Observer:
    """A TrainerCallback that sees each step's per-sample gradients before the DP optimizer consumes them,
    and saves a checkpoint at the round's last step (what NVFlare's patch asks for with restore_state=True)."""

    def __init__(self, round_steps: int):
        from transformers import TrainerCallback

        observer = self
        self.grad_sample_rows: list[dict[str, int]] = []

        class Callback(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                observer.grad_sample_rows.append(
                    {
                        n: (p.grad_sample.shape[0] if getattr(p, "grad_sample", None) is not None else -1)
                        for n, p in model.named_parameters()
                        if p.requires_grad
                    }
                )
                return control

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step % round_steps == 0:
                    control.should_save = True
                    control.should_training_stop = True
                return control

        self.callback = Callback()


def _SiteBoard():
    from transformers.integrations import TensorBoardCallback

    class SiteBoard(TensorBoardCallback):
        """A TensorBoardCallback that records what it is given instead of writing events."""

        def __init__(self):
            super().__init__(tb_writer=object())
            self.seen: list[dict] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.seen.append(dict(logs or {}))

        def on_train_begin(self, args, state, control, **kwargs):
            return control

        def on_train_end(self, args, state, control, **kwargs):
            return control

    return SiteBoard()


def test_dp_lora_rounds_train_the_adapter_on_poisson_batches_and_account_every_step(
    tiny_gpt, tmp_path: Path, capsys
) -> None:
    from peft import get_peft_model_state_dict

    # The template's batch size and accumulation do not apply under DP (a step is one Poisson batch).
    args = _args(tiny_gpt, "--grad-accum", "2", "--batch-size", "4", "--logging-steps", "1")
    trainer = build_trainer(args, "lora", _pairs(RECORDS, 1), _pairs(8, 2), tmp_path)
    steps = steps_per_round(trainer, 1)
    assert steps == 8 == round(1 / Q)
    assert trainer.args.max_grad_norm == 0, "the DP clip is per record; no second clip after the noise"
    assert trainer.args.gradient_accumulation_steps == 1
    observer = _Observer(steps)
    trainer.add_callback(observer.callback)
    site_board = _SiteBoard()  # the site's own TensorBoard (fedllm.training.hf.federated.site_tensorboard)
    trainer.add_callback(site_board)
    sent_keys = set(get_peft_model_state_dict(trainer.model))
    before = {k: v.clone() for k, v in get_peft_model_state_dict(trainer.model).items()}

    trainer.args.max_steps = steps  # NVFlare's patch: max_steps = steps per round × rounds, extended round by round
    trainer.train()

    after = get_peft_model_state_dict(trainer.model)
    assert set(after) == sent_keys, "non-wrapping hooks: the PEFT state-dict keys NVFlare exchanges are unchanged"
    assert all(".lora_A." in k or ".lora_B." in k for k in after)
    assert max((after[k] - before[k]).abs().max().item() for k in after) > 0, "opacus#820: LoRA must change"
    sizes = trainer.dp_batch_sizes
    assert len(sizes) == steps and len(set(sizes)) > 1, f"Poisson batches vary: {sizes}"
    # Per-sample gradients for every LoRA factor, one row per record of the step's batch.
    assert len(observer.grad_sample_rows) == steps
    for size, rows in zip(sizes, observer.grad_sample_rows, strict=True):
        assert rows and all(("lora_A" in n or "lora_B" in n) for n in rows)
        assert set(rows.values()) == {size}
    assert trainer.dp_steps_taken == steps
    ledger = PrivacyLedger.load(tmp_path / LEDGER_NAME)
    assert ledger.steps_total == steps
    assert ledger.epsilon(DELTA) == pytest.approx(_oracle_epsilon(steps), abs=1e-6)

    # Nothing computed on private records without noise is logged (NVFlare streams these logs).
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert not logged & {"loss", "grad_norm", "train_loss", "num_tokens", "mean_token_accuracy", "entropy"}
    assert all(shareable_log(k) or k == "step" for k in logged)
    printed = capsys.readouterr().out  # the Trainer prints its logs; a site's job log streams to the server
    assert "'dp_epsilon'" in printed and "'loss'" not in printed and "'grad_norm'" not in printed
    # ... except to the site's own TensorBoard, which keeps the training curve (every step: logging_steps 1).
    assert len([e for e in site_board.seen if "loss" in e]) == steps
    reported = [e for e in trainer.state.log_history if "dp_epsilon" in e]
    assert reported[-1]["dp_epsilon"] == pytest.approx(_oracle_epsilon(steps), abs=1e-6)
    assert reported[-1]["dp_steps_total"] == steps

    # Round 2 resumes the Trainer's checkpoint (restore_state=True): the optimizer and the accounting go on.
    trainer.args.max_steps = 2 * steps
    trainer.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{steps}"))
    assert trainer.state.global_step == 2 * steps
    assert trainer.dp_steps_taken == 2 * steps and len(trainer.dp_batch_sizes) == 2 * steps
    adam_steps = {int(s["step"]) for s in trainer.optimizer.optimizer.original_optimizer.state.values()}
    assert adam_steps == {2 * steps}, "AdamW's moments were restored from round 1's checkpoint"
    ledger = PrivacyLedger.load(tmp_path / LEDGER_NAME)
    assert [h[2] for h in ledger.history] == [steps, steps]
    assert ledger.epsilon(DELTA) == pytest.approx(_oracle_epsilon(2 * steps), abs=1e-6)
    assert trainer.dp_settle_round()["dp_epsilon"] == pytest.approx(_oracle_epsilon(2 * steps), abs=1e-6)

    # A continuation job after a restart: a new process (a new Trainer on the same lineage folder) resumes round
    # 2's checkpoint for round 3; its ledger goes on from the 16 steps spent, its AdamW from round 2's moments.
    resumed = build_trainer(args, "lora", _pairs(RECORDS, 1), _pairs(8, 2), tmp_path)
    resumed.add_callback(_Observer(steps).callback)
    assert resumed.dp_budget.ledger.steps_total == 2 * steps
    resumed.args.max_steps = 3 * steps
    resumed.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{2 * steps}"))
    assert resumed.state.global_step == 3 * steps and resumed.dp_steps_taken == steps
    adam_steps = {int(s["step"]) for s in resumed.optimizer.optimizer.original_optimizer.state.values()}
    assert adam_steps == {3 * steps}
    assert PrivacyLedger.load(tmp_path / LEDGER_NAME).epsilon(DELTA) == pytest.approx(
        _oracle_epsilon(3 * steps), abs=1e-6
    )


def test_an_empty_poisson_draw_is_a_counted_noise_only_step(tiny_gpt, tmp_path: Path) -> None:
    from peft import get_peft_model_state_dict

    # q = 1/64 of 8 records: most draws are empty; 64 steps a round.
    trainer = build_trainer(
        _args(tiny_gpt, dp=f"noise={SIGMA},clip={CLIP},sample_rate=0.015625"),
        "lora",
        _pairs(8, 1),
        _pairs(4, 2),
        tmp_path,
    )
    before = {k: v.clone() for k, v in get_peft_model_state_dict(trainer.model).items()}
    trainer.args.max_steps = steps_per_round(trainer, 1)
    trainer.train()
    assert trainer.args.max_steps == 64 == trainer.dp_steps_taken == len(trainer.dp_batch_sizes)
    assert 0 in trainer.dp_batch_sizes
    after = get_peft_model_state_dict(trainer.model)
    assert max((after[k] - before[k]).abs().max().item() for k in after) > 0


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the first LoRA layer: see training_step
def test_each_records_per_sample_gradient_is_the_gradient_of_its_own_loss(tiny_gpt, tmp_path: Path) -> None:
    """What DP-SGD clips must be one record's gradient: Opacus' hooks on the padded batch, with the Trainer's loss,
    against a backward pass of each record alone (lora_B made non-zero so that lora_A's gradients are too)."""
    # Answers of different lengths: a token mean over the batch would weigh the records unequally.
    pairs = [{**r, "output": r["output"] + " and more" * i} for i, r in enumerate(_pairs(3, 1))]
    trainer = build_trainer(_args(tiny_gpt), "lora", pairs, _pairs(4, 2), tmp_path)
    model = trainer.model
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    for module in model.modules():  # the same function in both passes: no dropout draws
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    trainer.create_optimizer()
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    records = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.data_collator(records)
    assert len({int(m.sum()) for m in batch["attention_mask"]}) > 1, "records of different lengths: padding matters"
    assert len({int((row != -100).sum()) for row in batch["labels"]}) == 3, "answers of different lengths"

    model.train()
    trainer.compute_loss(model, dict(batch)).backward()
    per_sample = {n: p.grad_sample.detach().clone() for n, p in lora.items()}
    trainer.optimizer.zero_grad(set_to_none=True)

    trainer._dp_hooks.disable_hooks()
    for row, record in enumerate(records):
        alone = trainer.data_collator([record])
        loss = per_example_loss(
            model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"]).logits, alone["labels"]
        ).mean()
        grads = torch.autograd.grad(loss, list(lora.values()))
        for (name, _), grad in zip(lora.items(), grads, strict=True):
            assert grad.abs().max() > 0, name
            torch.testing.assert_close(per_sample[name][row], grad, rtol=1e-4, atol=1e-6)


def test_the_loss_is_each_records_own_mean_over_its_answer() -> None:
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[-100, -100, 1, 2], [-100, 3, -100, -100]])
    ce = torch.nn.functional.cross_entropy
    expected = torch.stack(
        [
            (ce(logits[0, 1:2], labels[0, 2:3]) + ce(logits[0, 2:3], labels[0, 3:4])) / 2,
            ce(logits[1, 0:1], labels[1, 1:2]),
        ]
    )
    assert per_example_loss(logits, labels) == pytest.approx(expected.tolist(), rel=1e-5)


def test_a_round_past_the_budget_is_refused_before_it_trains(tiny_gpt, tmp_path: Path) -> None:
    dp = f"noise=0.5,clip={CLIP},sample_rate={Q},epsilon=1"
    trainer = build_trainer(_args(tiny_gpt, dp=dp), "lora", _pairs(RECORDS, 1), _pairs(4, 2), tmp_path)
    trainer.args.max_steps = steps_per_round(trainer, 1)
    with pytest.raises(
        DPError,
        match=r"round -1 NOT trained: its 8 DP-SGD steps would take this site's ε from 0 to "
        r".* over the job's budget epsilon=1 .* Fix: create a new job with a larger budget",
    ):
        trainer.train()
    assert trainer.dp_steps_taken == 0 and trainer.state.global_step == 0
    assert not (tmp_path / LEDGER_NAME).exists()


def test_under_nvflare_a_refused_round_is_answered_as_stopped_with_no_weights(tiny_gpt, tmp_path: Path) -> None:
    """What DPReportingClientAPI hands to NVFlare's Client API (here a recorder in its place; the federation
    test runs the real one): a trained round's result with dp_* and FedAvg's weight, a refused one stopped."""
    from nvflare.app_common.abstract.fl_model import FLModel

    from fedllm.training.dp import STOPPED_META
    from fedllm.training.hf.dp_trainer import DPReportingClientAPI

    class Recorder:
        def __init__(self):
            self.sent: list = []

        def send(self, model, clear_cache=True):
            self.sent.append(model)

    # A budget that fits one round of σ=1 (8 steps of q=1/8: ε≈3.79 at δ=1e-5) and not two (ε≈4.70).
    dp = f"noise={SIGMA},clip={CLIP},sample_rate={Q},epsilon=4"
    trainer = build_trainer(_args(tiny_gpt, dp=dp), "lora", _pairs(RECORDS, 1), _pairs(4, 2), tmp_path)
    recorder, said = Recorder(), []
    api = DPReportingClientAPI(recorder, trainer, said.append)
    steps = steps_per_round(trainer, 1)
    trainer.args.max_steps = steps
    trainer.train()
    api.send(FLModel(params={"w": torch.zeros(1)}, metrics={"global_val_loss": 1.0}))
    trained = recorder.sent[-1]
    assert trained.metrics["global_val_loss"] == 1.0 and trained.metrics["dp_steps_total"] == steps
    assert trained.metrics["dp_epsilon"] == pytest.approx(_oracle_epsilon(steps), abs=1e-6)
    assert trained.metrics["dp_epsilon"] < 4
    assert trained.meta["NUM_STEPS_CURRENT_ROUND"] == steps * round(Q * RECORDS)

    trainer.args.max_steps = 2 * steps
    assert trainer.train() is None and trainer.dp_stopped
    assert trainer.dp_steps_taken == steps and trainer.state.global_step == steps
    assert said and f"NOT trained: its {steps} DP-SGD steps would take this site's ε from" in said[-1]
    api.send(FLModel(params={"w": torch.zeros(1)}, metrics={"global_val_loss": 1.0}))
    stopped = recorder.sent[-1]
    assert not stopped.params and stopped.meta[STOPPED_META] is True
    assert stopped.meta["NUM_STEPS_CURRENT_ROUND"] == 0
    assert stopped.metrics["dp_epsilon"] == trained.metrics["dp_epsilon"]
    assert PrivacyLedger.load(tmp_path / LEDGER_NAME).steps_total == steps


@pytest.mark.parametrize(
    ("extra", "method", "match"),
    [
        (["--packing"], "lora", r"--packing packs several records"),
        (["--gradient-checkpointing"], "lora", r"--gradient-checkpointing recomputes"),
        (["--devices", "2"], "lora", r"--devices 2: .* use --devices 1"),
        (["--precision", "fp16"], "lora", r"--precision fp16 scales the loss"),
        ([], "full", r"--dp on full SFT is not supported: .* Fix: use the hf-lora template"),
    ],
)
def test_what_breaks_record_level_dp_is_refused_with_the_fix(tiny_gpt, tmp_path, extra, method, match) -> None:
    data = _pairs(4, 1)
    with pytest.raises(TrainerOptionError, match=match):
        build_trainer(_args(tiny_gpt, *extra), method, data, data, tmp_path)


def test_full_sft_takes_no_dp_and_auto_precision_never_trains_dp_in_fp16() -> None:
    from fedllm.training.hf.dp_trainer import dp_precision

    with pytest.raises(SystemExit):  # argparse: unrecognized argument (job create refuses --dp for hf-sft)
        parser("full").parse_args(["--model", "m", "--train", "-", "--val", "-", "--dp", "noise=1"])
    assert [dp_precision(p) for p in ("fp16", "bf16", "fp32")] == ["fp32", "bf16", "fp32"]


def test_the_noise_cannot_be_replayed_from_the_jobs_seed(tiny_gpt, tmp_path: Path) -> None:
    """Two sites with the same --seed and the same records draw other batches and other noise: whoever knows the
    job's arguments cannot regenerate a site's noise and subtract it, nor tell which records a step used."""
    from peft import get_peft_model_state_dict

    from fedllm.training.hf.dp_trainer import EmptyBatchCollator

    draws, noise = [], []
    for run in range(2):
        trainer = build_trainer(
            _args(tiny_gpt, "--seed", "7"), "lora", _pairs(RECORDS, 1), _pairs(4, 2), tmp_path / f"{run}"
        )
        draws.append([list(batch) for batch in trainer.get_train_dataloader().batch_sampler])
        # One noise-only step (an empty draw): what the optimizer adds is the noise alone.
        trainer.create_optimizer()
        before = {k: v.clone() for k, v in get_peft_model_state_dict(trainer.model).items()}
        trainer.training_step(trainer.model, EmptyBatchCollator(trainer.data_collator, trainer.train_dataset[0])([]))
        trainer.optimizer.step()
        after = get_peft_model_state_dict(trainer.model)
        noise.append({k: after[k] - before[k] for k in after})
    assert len(draws[0]) == len(draws[1]) == 8 and draws[0] != draws[1]
    assert all(d.abs().max() > 0 for d in noise[0].values())
    assert all(not torch.equal(noise[0][k], noise[1][k]) for k in noise[0])
