"""fedllm's federated training loop: p-tuning, the NeMo backend and the toy trainers run it.

(SFT and LoRA on Hugging Face models run NVFlare's own HF integration instead, fedllm.training.hf.federated.)
A trainer only says *what* a site trains; this module says *how* a site takes part in a round:

    flare.init() → build the site's task → per round: receive the global state → load it →
    evaluate it ("global_*" metrics) → train local epochs → evaluate again → send ONLY the
    exchanged state, the steps taken (FedAvg's weight) and the metrics. Every metric also goes to the
    site's own TensorBoard and, through NVFlare's experiment tracking, to the server's. An evaluation
    task (the final global model, after the last round) is answered with the global_* metrics alone.

The interface is deliberately small (`SiteTask`), so a backend implements four methods:

    class MyTask:
        def exchanged_state(self) -> dict[str, torch.Tensor]: ...   # what crosses the wire
        def load_exchanged_state(self, state: dict) -> None: ...     # the server's global values
        def train(self, epochs: int, seed: int) -> TrainOutcome: ...
        def evaluate(self) -> dict[str, float]: ...                  # at least {"val_loss": ...}

    def main():
        run_site(lambda site: MyTask(...), epochs=args.epochs, seed=args.seed, tb_dir=args.tb_dir)

A trainer that carries state from round to round (an optimizer's moments, an LR schedule, a data position:
the NeMo trainers) also implements `TrainerStateTask`; the loop keeps that state per job lineage on disk
(fedllm.training.lineage), so that a continuation job after a server or site restart goes on with it. The
others (p-tuning on HF, the toy trainers) build a fresh, seeded optimizer every round and carry nothing.
A round's seed is `seed * 1000 + round`, the round counted from the job as first submitted: a round
redone by a continuation draws what it drew the first time.

Metric names (what reports and the server's round_metrics.jsonl read):
    train_loss, val_loss[, val_accuracy, ...]  the site's model after local training
    global_val_loss[, global_val_accuracy]    the global model the site received, before training
                                               (the templates' key metric: NVFlare's model selector
                                               takes FLModel.metrics to be the received model's)
    bytes_sent                                 bytes of the exchanged state this round (before filters)
    round_seconds                              wall time of the site's round (load → send)
    dp_epsilon, dp_delta, dp_noise_multiplier, under `--dp` (a `DPTask`, fedllm.training.dp): the privacy the
    dp_sample_rate, dp_steps_total             site has spent in the job's lineage so far; train_loss then
                                               stays in the site's own TensorBoard (it is computed on
                                               private records without noise) and leaves the site nowhere
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from nvflare.apis.dxo import MetaKey

from fedllm.training.dp import LEDGER_NAME, STOPPED_META, DPError, DPSettings, SiteBudget, steps_per_round
from fedllm.training.lineage import LineageState, RoundContext, safe_name, state_root

PRIVATE_UNDER_DP = ("train_loss",)  # metrics a DP site keeps in its own TensorBoard only


@dataclass
class TrainOutcome:
    steps: int  # optimizer steps taken this round
    train_loss: float  # mean training loss of the last epoch
    metrics: dict[str, float] = field(default_factory=dict)  # more of the round's metrics (e.g. its LR)


class SiteTask(Protocol):
    """What a backend provides for one site; see the module docstring."""

    def exchanged_state(self) -> dict[str, torch.Tensor]: ...

    def load_exchanged_state(self, state: Mapping[str, Any]) -> None: ...

    def train(self, epochs: int, seed: int) -> TrainOutcome: ...

    def evaluate(self) -> dict[str, float]: ...


@runtime_checkable
class DPTask(SiteTask, Protocol):
    """A SiteTask that can train a round with DP-SGD (fedllm.training.dp.dp_round) for `--dp` jobs."""

    def train_dp(self, settings: DPSettings, steps: int, seed: int) -> TrainOutcome:
        """`steps` DP-SGD steps with Poisson batches at the job's rate (an empty batch is a step: noise only)."""
        ...


@runtime_checkable
class TrainerStateTask(SiteTask, Protocol):
    """A SiteTask whose trainer carries state from one round to the next (see the module docstring)."""

    def begin_round(self, context: RoundContext, snapshot: Path | None) -> None:
        """Before round `context.round`. `snapshot`, the state saved at the end of the round before, is given
        only to a process that did not train that round itself (a continuation's first round), else None."""
        ...

    def save_round_state(self, folder: Path) -> None:
        """Write this process's part of the state at the end of the round into `folder` (it exists)."""
        ...


class CarriedState:
    """The rounds of a TrainerStateTask: what it starts each round from, and its snapshot after each round."""

    def __init__(self, task: TrainerStateTask, root: Path, log: Callable[[str], None] = print):
        self.task, self.root, self.log = task, root, log
        self.state: LineageState | None = None
        self.trained: RoundContext | None = None  # the last round this process trained

    def begin(self, context: RoundContext) -> None:
        if self.state is None:
            self.state = LineageState(self.root, context.lineage)
        self.state.begin_round(context.round)
        snapshot = None
        if self.trained is None and context.round > 0:
            snapshot = self.state.snapshot(context.round - 1)
            if snapshot is None:
                self.log(
                    f"[fedllm] no trainer state of round {context.round - 1} in {self.state.folder}: round "
                    f"{context.round} starts a fresh optimizer and LR schedule (the uninterrupted run would not)"
                )
            else:
                self.log(f"[fedllm] round {context.round} goes on from the trainer state in {snapshot}")
        self.task.begin_round(context, snapshot)

    def end(self, context: RoundContext) -> None:
        """Snapshot the state at the end of `context.round`: on disk, complete, before the site sends its update."""
        assert self.state is not None
        self.trained = context
        if context.is_last:  # no round follows: nothing will start from it
            self.state.after_last_round(context.round)
            return
        folder = self.state.folder_for(context.round)
        folder.mkdir(parents=True, exist_ok=True)
        self.task.save_round_state(folder)
        self.state.mark(folder, context.round)

    def finish(self) -> None:
        """The final global model's evaluation came after this site trained the lineage's last round: the server's
        checkpoints are all on disk, no round will be redone, the lineage's state goes."""
        if self.state is not None and self.trained is not None and self.trained.is_last:
            self.state.finish()


def state_bytes(state: Mapping[str, Any]) -> int:
    """Bytes of the tensors (or numpy arrays) in a state dict: what a site puts on the wire."""
    total = 0
    for value in state.values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif hasattr(value, "nbytes"):
            total += int(value.nbytes)
    return total


def as_tensors(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The global state as float32 CPU tensors, whatever the server sent (numpy, fp16 after a filter...)."""
    out = {}
    for key, value in state.items():
        tensor = torch.as_tensor(value)
        out[key] = tensor.float() if tensor.is_floating_point() else tensor
    return out


def resolve_path(template: str, site: str) -> Path:
    """Expand {data_dir} (the site's own data directory, from its kit) and {site} in a path argument."""
    data_dir = os.environ.get("FEDLLM_DATA_DIR", "")
    return Path(template.format(data_dir=data_dir, site=site)).expanduser()


def job_folder(site: str, job_id: str = "") -> Path:
    """The site's folder of this job, <site workspace>/<job id> (where its log.txt is).

    An in-process trainer runs in the site workspace; an external one (torchrun) in the job's app
    folder inside it. Elsewhere (a trainer run by hand) a folder per job under the current one.
    """
    here = Path.cwd()
    if job_id:
        for candidate in (here / job_id, here.parent, here):
            if candidate.name == job_id and candidate.is_dir():
                return candidate
    return here / "fedllm-jobs" / (job_id or site)


def tensorboard_dir(tb_dir: str | None, site: str, job_id: str = "") -> Path:
    """Default: <site workspace>/<job id>/tb (one folder per job and site)."""
    if tb_dir:
        return resolve_path(tb_dir, site)
    return job_folder(site, job_id) / "tb"


class MetricsLog:
    """Every metric twice: the site's own TensorBoard, and the server's through NVFlare's experiment tracking.

    `nvflare.client.tracking.SummaryWriter` sends each scalar to the server while the job runs
    (the job's TBAnalyticsReceiver writes it under the site's name, fedllm.jobs.create adds it), so
    the server's TensorBoard shows every site's curves live and they come back with the result.
    The step is the round.
    """

    def __init__(self, log_dir: Path, stream: bool = True):
        from torch.utils.tensorboard import SummaryWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(str(log_dir))
        self._stream = None
        if stream:
            from nvflare.client.tracking import SummaryWriter as FlareSummaryWriter

            self._stream = FlareSummaryWriter()

    def log(self, metrics: Mapping[str, float], step: int, private: tuple[str, ...] = ()) -> None:
        """`private` metrics go to the site's own TensorBoard only, never to the server."""
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, step)
            if self._stream is not None and name not in private:
                self._stream.add_scalar(name, float(value), global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def run_round(
    task: SiteTask,
    incoming_params: Mapping[str, Any],
    epochs: int,
    seed: int,
    budget: SiteBudget | None = None,
    round_: int = 0,
) -> tuple[dict, dict, int]:
    """One round on one site without NVFlare (unit-testable): returns (state to send, metrics, steps).

    With a `budget` (a `--dp` job) the round trains with DP-SGD and is in the site's privacy ledger, on disk,
    before anything leaves the site; its metrics then hold the dp_* numbers (and train_loss, for the site only).
    """
    started = time.monotonic()
    task.load_exchanged_state(as_tensors(incoming_params))
    before = task.evaluate()
    if budget is None:
        outcome = task.train(epochs, seed)
    else:
        if not isinstance(task, DPTask):
            raise DPError(f"{type(task).__name__} has no DP-SGD training: this trainer cannot run a --dp job")
        outcome = task.train_dp(budget.settings, steps_per_round(budget.settings, epochs), seed)
        budget.spend(outcome.steps, round_)
    after = task.evaluate()
    state = {k: v.detach().cpu().contiguous() for k, v in task.exchanged_state().items()}
    metrics = {
        **after,
        **{f"global_{k}": v for k, v in before.items()},
        "train_loss": outcome.train_loss,
        **outcome.metrics,
        "bytes_sent": float(state_bytes(state)),
        "round_seconds": time.monotonic() - started,
        **(budget.metrics() if budget is not None else {}),
    }
    return state, metrics, outcome.steps


def evaluate_received(task: SiteTask, incoming_params: Mapping[str, Any]) -> dict[str, float]:
    """Load a global model and evaluate it without training: its metrics are named global_*."""
    task.load_exchanged_state(as_tensors(incoming_params))
    return {f"global_{k}": v for k, v in task.evaluate().items()}


def run_site(
    build_task: Callable[[str], SiteTask],
    *,
    epochs: int,
    seed: int = 0,
    tb_dir: str | None = None,
    log: Callable[[str], None] = print,
    dp: DPSettings | None = None,
) -> None:
    """The Client API loop: what every fedllm site runs inside an NVFlare job (with DP-SGD where `dp` is given)."""
    import nvflare.client as flare

    flare.init()
    site = flare.get_site_name()
    job_id = flare.get_job_id() or ""
    task = build_task(site)
    metrics_log = MetricsLog(tensorboard_dir(tb_dir, site, job_id))
    carried = (
        CarriedState(task, state_root(job_folder(site, job_id)), log) if isinstance(task, TrainerStateTask) else None
    )
    budget: SiteBudget | None = None
    private = PRIVATE_UNDER_DP if dp is not None else ()
    try:
        while flare.is_running():
            incoming = flare.receive()
            current = incoming.current_round or 0
            if flare.is_evaluate():  # the server's final global model (fedllm.jobs.create adds that evaluation)
                metrics = evaluate_received(task, incoming.params)
                shown = "  ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
                log(f"[{site}] final global model: {shown}")
                flare.send(flare.FLModel(metrics=metrics))
                if carried is not None:
                    carried.finish()
                continue
            context = RoundContext.of_task(incoming, job_id)
            if dp is not None:
                budget = budget or SiteBudget(dp, ledger_path(site, job_id, context.lineage))
                if (over := budget.would_exceed(steps_per_round(dp, epochs))) is not None:
                    stop_over_budget(flare, budget, context, over, epochs, site, log, metrics_log)
                    continue
            if carried is not None:
                carried.begin(context)
            state, metrics, steps = run_round(task, incoming.params, epochs, seed * 1000 + current, budget, current)
            if carried is not None:
                carried.end(context)
            metrics_log.log(metrics, current, private)
            metrics = {k: v for k, v in metrics.items() if k not in private}
            shown = "  ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
            log(f"[{site}] round {current}: {shown} ({steps} steps)")
            flare.send(flare.FLModel(params=state, metrics=metrics, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: steps}))
    finally:
        metrics_log.close()


def ledger_path(site: str, job_id: str, lineage: str) -> Path:
    """A site's privacy ledger of one job lineage: beside its trainer state, where a continuation job finds it."""
    return state_root(job_folder(site, job_id)) / safe_name(lineage) / LEDGER_NAME


def stop_over_budget(flare, budget: SiteBudget, context: RoundContext, over: float, epochs: int, site: str,
                     log: Callable[[str], None], metrics_log: MetricsLog) -> None:  # fmt: skip
    """The backstop: a round that would take the site past the job's ε is not trained; the site says why and
    answers with its dp_* metrics and no weights (FedAvg skips an empty result)."""
    settings = budget.settings
    spent = budget.metrics()
    log(
        f"[{site}] round {context.round} NOT trained: its {steps_per_round(settings, epochs)} DP-SGD steps would take "
        f"this site's ε from {spent['dp_epsilon']:.4g} to {over:.4g}, over the job's budget ε={settings.epsilon:g} "
        f"(δ={settings.delta:g}); its privacy ledger is {budget.path}"
    )
    metrics_log.log(spent, context.round)
    flare.send(flare.FLModel(metrics=spent, meta={STOPPED_META: True, MetaKey.NUM_STEPS_CURRENT_ROUND: 0}))
