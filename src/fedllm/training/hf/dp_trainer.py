"""Record-level DP-SGD inside TRL's SFTTrainer (hf-lora with `--dp`): Opacus' per-sample clipping and noise.

The Trainer stays the one NVFlare's Hugging Face integration patches (fedllm.training.hf.federated); DP changes
four of its parts, each where the Trainer lets a subclass change it:
- the batches: Poisson sampling (each record independently with probability q, Opacus'
  `UniformWithReplacementSampler`), `ceil(local_epochs / q)` steps a round whatever the draws; accelerate keeps
  a batch sampler as it is in a single process. An empty draw is a step too: noise only, counted;
- the loss: each record's mean token loss over its completion (TRL's completion mask, labels -100), averaged
  over the batch, so a record's gradient is its own (the Trainer's token mean over the batch is not);
- the optimizer: Opacus' non-wrapping `GradSampleHooks` on the model (a `GradSampleModule` would prefix the
  PEFT state-dict keys NVFlare exchanges) and `DPOptimizer` around the Trainer's AdamW, attached once the
  Trainer has put the model on its device (opacus#820, peft#3409: hooks attached before leave LoRA unchanged);
- what leaves the site: the training loss, gradient norm, token counts and TRL's token accuracy are computed on
  private records without noise, so they go to the site's own TensorBoard only; the Trainer logs (NVFlare
  streams them) the LR, the epoch, runtimes, evaluations on the validation set and the `dp_*` numbers. `DPReportingClientAPI` adds the `dp_*` numbers to
  each round's result (round_metrics.jsonl, `fedllm report`) once the round is in the site's ledger.

The accounting is fedllm.training.dp's: the site's `SiteBudget` (its `PrivacyLedger` beside the lineage's
trainer state) records each round's steps, durably, before the update leaves the site, and a round that would
take the site past the job's budget is refused before it starts (the backstop of the server's planned stop).

The noise and the sampling draw from generators seeded by the operating system, never by the job's `--seed`:
anyone who knows a seed could replay the noise and subtract it, and subsampling only amplifies privacy while
the sample stays secret. DP rounds therefore do not repeat bit for bit.
"""

from __future__ import annotations

import argparse
import copy
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from fedllm.training.dp import (
    LEDGER_NAME,
    STOPPED_META,
    DPError,
    DPSettings,
    SiteBudget,
    os_seeded_generator,
    steps_per_round,
)
from fedllm.training.hf.trainer_options import TrainerOptionError

# What a DP trainer may log (and NVFlare may stream): nothing computed from private records without noise.
_SHAREABLE_KEYS = frozenset({"learning_rate", "epoch"})
_SHAREABLE_PREFIXES = ("val_", "global_val_", "eval_", "dp_")
_SHAREABLE_SUFFIXES = ("_runtime",)


def shareable_log(key: str) -> bool:
    """Whether a Trainer log entry may leave the site under DP (validation metrics, the schedule, DP's numbers)."""
    return key in _SHAREABLE_KEYS or key.startswith(_SHAREABLE_PREFIXES) or key.endswith(_SHAREABLE_SUFFIXES)


def check_dp_options(args: argparse.Namespace, method: str) -> None:
    """Refuse what breaks record-level DP-SGD, naming the setting and the fix, before any weight is loaded."""
    fix = "drop it from the job (job create -a ...) or create the job without --dp"
    if method != "lora":
        raise TrainerOptionError(
            "--dp on full SFT is not supported: per-sample gradients of every weight take a copy of the model per "
            "record of a batch, and Opacus' hooks get GPT-2's position embeddings wrong (they see a batch of one, "
            "shared by every record). Fix: use the hf-lora template, whose per-sample gradients are the adapter's"
        )
    refusals = [
        (
            args.packing,
            "--packing packs several records into one sequence, so a sample is no longer one record",
        ),
        (
            args.gradient_checkpointing,
            "--gradient-checkpointing recomputes activations in backward, which Opacus' "
            "per-sample gradient hooks do not support",
        ),
        (
            args.devices > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1,
            f"--devices {args.devices}: DP-SGD on "
            "several ranks needs a distributed Poisson sampler and DistributedDPOptimizer, which fedllm does not set up; "
            "use --devices 1",
        ),
        (
            args.precision == "fp16",
            "--precision fp16 scales the loss (GradScaler) outside the per-sample clipping; "
            "use --precision bf16 or fp32",
        ),
        (
            args.quantize != "none",
            "--quantize 4bit: per-sample gradients through a 4-bit base are not verified; use plain LoRA",
        ),
    ]
    for refused, reason in refusals:
        if refused:
            raise TrainerOptionError(f"--dp: {reason}. Fix: {fix}")


# TrainingArguments a DP trainer overrides: a step is one Poisson batch (the template's batch size and accumulation
# do not apply: the expected batch is q × the site's records), and the clip is per record (--dp clip=C), not a
# second clip of the noised sum.
DP_TRAINER_OPTIONS = {"gradient_accumulation_steps": 1, "max_grad_norm": 0.0}


def dp_precision(resolved: str) -> str:
    """The precision a DP site trains in: "auto" resolved to fp16 (a GPU without bf16) becomes fp32.

    fp16's loss scaling acts on the summed gradient, outside Opacus' per-sample clipping; an explicit fp16 is
    refused by check_dp_options, this covers "auto".
    """
    return "fp32" if resolved == "fp16" else resolved


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each record's mean next-token loss over its scored tokens (labels -100 carry none): shape (batch,)."""
    shifted_logits = logits[:, :-1, :]
    shifted_labels = labels[:, 1:]
    tokens = torch.nn.functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]).float(),
        shifted_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(shifted_labels.shape)
    scored = (shifted_labels != -100).to(tokens.dtype)
    return (tokens * scored).sum(dim=1) / scored.sum(dim=1).clamp(min=1)


class EmptyBatchCollator:
    """The Trainer's collator, and for an empty Poisson draw the same keys with zero rows (a noise-only step)."""

    def __init__(self, collate: Callable[[list], Mapping[str, Any]], template: Any):
        self._collate = collate
        self._template = template  # one record: the empty batch's keys and dtypes

    def __call__(self, examples: list) -> Mapping[str, Any]:
        if examples:
            return self._collate(examples)
        return {k: v[:0] if isinstance(v, torch.Tensor) else v for k, v in self._collate([self._template]).items()}


def dp_trainer_class(base: type) -> type:
    """`base` (fedllm's SFTTrainer) with DP-SGD: Poisson batches, per-record loss, Opacus' clipping and noise."""
    from transformers import TrainerCallback

    class FedllmDPSFTTrainer(base):
        """The site's SFTTrainer under record-level DP; `dp_settle_round()` records a trained round in the ledger."""

        def __init__(self, *args: Any, dp: DPSettings, budget: SiteBudget, epochs: float, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.dp = dp
            self.dp_budget = budget
            self.dp_steps_per_round = steps_per_round(dp, epochs)
            self.dp_expected_batch = max(1, round(dp.sample_rate * len(self.train_dataset)))
            self.dp_round = -1  # the federated round being trained (the ledger's label); run_federated sets it
            self.dp_steps_taken = 0  # noised optimizer steps of this process (Opacus' step hook counts them)
            self.dp_batch_sizes: list[int] = []  # the Poisson draws, in order (tests check they vary)
            self._dp_optimizer = None
            self._dp_hooks = None
            self._dp_round_start = 0
            self._dp_settled = True
            self._dp_sampler_generator = os_seeded_generator()
            self.dp_stopped = False  # the last train() was refused (over the budget): no step was taken
            self.dp_answer_refusals = False  # raise on a refused round; DPReportingClientAPI answers it instead
            self.dp_log: Callable[[str], None] = print
            self.add_callback(_SettleAtTrainEnd(self))

        # -- the batches ---------------------------------------------------------------------------------------
        def get_train_dataloader(self):
            from opacus.utils.uniform_sampler import UniformWithReplacementSampler
            from torch.utils.data import DataLoader

            dataset = self.train_dataset
            sampler = UniformWithReplacementSampler(
                num_samples=len(dataset),
                sample_rate=self.dp.sample_rate,
                generator=self._dp_sampler_generator,
                steps=self.dp_steps_per_round,
            )
            collate = EmptyBatchCollator(self.data_collator, dataset[0])
            # One process: accelerate keeps this batch sampler as it is ("No change if no multiprocess").
            return self.accelerator.prepare(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate))

        # -- the optimizer -------------------------------------------------------------------------------------
        def create_optimizer(self, model=None):
            optimizer = super().create_optimizer(model)
            if self._dp_optimizer is not None:
                return optimizer  # a later round: the Trainer keeps its (DP) optimizer and reloads its state
            from opacus.grad_sample import GradSampleHooks
            from opacus.optimizers import DPOptimizer

            self.model.train()  # Opacus validates train mode; the Trainer has put the model on its device by now
            self._dp_hooks = GradSampleHooks(self.model, batch_first=True, loss_reduction="mean")
            device = next(p for p in self.model.parameters() if p.requires_grad).device
            self._dp_optimizer = DPOptimizer(
                self.optimizer,
                noise_multiplier=self.dp.noise_multiplier,
                max_grad_norm=self.dp.max_grad_norm,
                expected_batch_size=self.dp_expected_batch,
                loss_reduction="mean",
                generator=os_seeded_generator(device),
            )
            self._dp_optimizer.attach_step_hook(self._count_step)
            self.optimizer = self._dp_optimizer
            return self.optimizer

        def _count_step(self, _optimizer: Any) -> None:
            self.dp_steps_taken += 1

        # -- one step ------------------------------------------------------------------------------------------
        def training_step(self, model, inputs, num_items_in_batch=None):
            # The Trainer clears p.grad only; Opacus' per-sample gradients of the last step go here.
            self._dp_optimizer.zero_grad(set_to_none=True)
            rows = int(inputs["input_ids"].shape[0])
            self.dp_batch_sizes.append(rows)
            if rows == 0:  # an empty Poisson draw: zero per-sample gradients, the optimizer adds the noise
                for p in self._dp_optimizer.params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                return torch.zeros((), device=self.args.device)
            with warnings.catch_warnings():
                # The frozen embeddings' output needs no gradient: torch warns that the first LoRA layer's full
                # backward hook fires on its output only, which is all Opacus' hooks use.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                return super().training_step(model, inputs, num_items_in_batch)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not model.training:  # evaluation: TRL's loss and metrics, as without DP
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
            loss = per_example_loss(outputs.logits, inputs["labels"]).mean()
            return (loss, outputs) if return_outputs else loss

        # -- a round -------------------------------------------------------------------------------------------
        def train(self, *args: Any, **kwargs: Any):
            over = self.dp_budget.would_exceed(self.dp_steps_per_round)
            self._dp_round_start = self.dp_steps_taken
            self._dp_settled = False
            self.dp_stopped = over is not None
            if over is None:
                return super().train(*args, **kwargs)
            spent = self.dp_budget.ledger.epsilon(self.dp.delta)
            message = (
                f"DP budget: round {self.dp_round} NOT trained: its {self.dp_steps_per_round} DP-SGD steps would take "
                f"this site's ε from {spent:.4g} to {over:.4g}, over the job's budget epsilon={self.dp.epsilon:g} "
                f"(δ={self.dp.delta:g}); its privacy ledger is {self.dp_budget.path}"
            )
            if not self.dp_answer_refusals:
                raise DPError(f"{message}. Fix: create a new job with a larger budget to train further")
            # Under NVFlare the task is answered like a round without steps: the Trainer's train-end callbacks run
            # (NVFlare's sends the result), and DPReportingClientAPI turns it into a stopped result with no weights.
            self.dp_log(message)
            self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
            return None

        def dp_settle_round(self) -> dict[str, float]:
            """Record the round just trained in the ledger (once, durably), and return the dp_* metrics."""
            if not self._dp_settled:
                self._dp_settled = True
                steps = self.dp_steps_taken - self._dp_round_start
                if steps:
                    self.dp_budget.spend(steps, self.dp_round)
            return self.dp_budget.metrics()

        def dp_weight(self) -> int:
            """FedAvg's weight of this site's last round: its steps × its expected batch (records seen)."""
            return self.dp_steps_per_round * self.dp_expected_batch

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            """Only shareable entries go through the Trainer's log (its history, NVFlare's stream); the training
            loss and the like reach the site's own TensorBoard alone (the Trainer's only TensorBoardCallback is
            the site-local one, fedllm.training.hf.federated.site_tensorboard: report_to is none)."""
            from transformers.integrations import TensorBoardCallback

            private = {k: v for k, v in logs.items() if not shareable_log(k)}
            if private:
                for callback in self.callback_handler.callbacks:
                    if isinstance(callback, TensorBoardCallback):
                        callback.on_log(self.args, self.state, self.control, logs=private)
            super().log({k: v for k, v in logs.items() if shareable_log(k)}, start_time)

    class _SettleAtTrainEnd(TrainerCallback):
        """Ledger first, then the dp_* numbers into the Trainer's log (the site's TensorBoard, NVFlare's stream)."""

        def __init__(self, trainer: Any):
            self.trainer = trainer

        def on_train_end(self, args, state, control, **kwargs):
            self.trainer.log(self.trainer.dp_settle_round())
            return control

    return FedllmDPSFTTrainer


def dp_trainer_kwargs(args: argparse.Namespace, output_dir: Path) -> dict[str, Any]:
    """The DP trainer's own constructor arguments: the job's settings and the site's budget in `output_dir`."""
    settings = DPSettings.from_arg(args.dp)
    return {"dp": settings, "budget": SiteBudget(settings, Path(output_dir) / LEDGER_NAME), "epochs": args.epochs}


class DPReportingClientAPI:
    """NVFlare's Client API of a DP site: a train result carries the dp_* metrics and FedAvg's weight.

    NVFlare's patch sends the round's result from the Trainer's train-end callback; this wrapper first has the
    trainer record the round in its ledger (`dp_settle_round`), so no update leaves the site unaccounted. A round
    the trainer refused (over the budget) goes out as fedllm's loop sends one: no weights, the dp_* metrics and
    `STOPPED_META` (FedAvg skips it). Every other call goes to the wrapped API unchanged.
    """

    def __init__(self, api: Any, trainer: Any, log: Callable[[str], None] = print):
        self._api = api
        self._trainer = trainer
        trainer.dp_answer_refusals = True  # a round over the budget is answered as stopped, not raised
        trainer.dp_log = log

    def __getattr__(self, name: str) -> Any:
        return getattr(self._api, name)

    def send(self, model: Any, clear_cache: bool = True) -> Any:
        from nvflare.app_common.abstract.fl_model import FLModel, MetaKey

        if self._trainer.dp_stopped and model.params:  # a refused round: the site's numbers, no weights
            model = FLModel(
                metrics=self._trainer.dp_settle_round(),
                meta={STOPPED_META: True, MetaKey.NUM_STEPS_CURRENT_ROUND: 0},
                current_round=model.current_round,
                total_rounds=model.total_rounds,
            )
        elif model.params:
            model = copy.copy(model)
            model.metrics = {**(model.metrics or {}), **self._trainer.dp_settle_round()}
            model.meta = {**(model.meta or {}), MetaKey.NUM_STEPS_CURRENT_ROUND: self._trainer.dp_weight()}
        return self._api.send(model, clear_cache)
