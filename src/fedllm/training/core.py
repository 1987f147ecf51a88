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

Metric names (what reports and the server's round_metrics.jsonl read):
    train_loss, val_loss[, val_accuracy, ...]  the site's model after local training
    global_val_loss[, global_val_accuracy]    the global model the site received, before training
                                               (the templates' key metric: NVFlare's model selector
                                               takes FLModel.metrics to be the received model's)
    bytes_sent                                 bytes of the exchanged state this round (before filters)
    round_seconds                              wall time of the site's round (load → send)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from nvflare.apis.dxo import MetaKey


@dataclass
class TrainOutcome:
    steps: int  # optimizer steps taken this round
    train_loss: float  # mean training loss of the last epoch


class SiteTask(Protocol):
    """What a backend provides for one site; see the module docstring."""

    def exchanged_state(self) -> dict[str, torch.Tensor]: ...

    def load_exchanged_state(self, state: Mapping[str, Any]) -> None: ...

    def train(self, epochs: int, seed: int) -> TrainOutcome: ...

    def evaluate(self) -> dict[str, float]: ...


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

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, step)
            if self._stream is not None:
                self._stream.add_scalar(name, float(value), global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def run_round(task: SiteTask, incoming_params: Mapping[str, Any], epochs: int, seed: int) -> tuple[dict, dict, int]:
    """One round on one site without NVFlare (unit-testable): returns (state to send, metrics, steps)."""
    started = time.monotonic()
    task.load_exchanged_state(as_tensors(incoming_params))
    before = task.evaluate()
    outcome = task.train(epochs, seed)
    after = task.evaluate()
    state = {k: v.detach().cpu().contiguous() for k, v in task.exchanged_state().items()}
    metrics = {
        **after,
        **{f"global_{k}": v for k, v in before.items()},
        "train_loss": outcome.train_loss,
        "bytes_sent": float(state_bytes(state)),
        "round_seconds": time.monotonic() - started,
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
) -> None:
    """The Client API loop: what every fedllm site runs inside an NVFlare job."""
    import nvflare.client as flare

    flare.init()
    site = flare.get_site_name()
    task = build_task(site)
    metrics_log = MetricsLog(tensorboard_dir(tb_dir, site, flare.get_job_id() or ""))
    try:
        while flare.is_running():
            incoming = flare.receive()
            current = incoming.current_round or 0
            if flare.is_evaluate():  # the server's final global model (fedllm.jobs.create adds that evaluation)
                metrics = evaluate_received(task, incoming.params)
                shown = "  ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
                log(f"[{site}] final global model: {shown}")
                flare.send(flare.FLModel(metrics=metrics))
                continue
            state, metrics, steps = run_round(task, incoming.params, epochs, seed * 1000 + current)
            metrics_log.log(metrics, current)
            shown = "  ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
            log(f"[{site}] round {current}: {shown} ({steps} steps)")
            flare.send(flare.FLModel(params=state, metrics=metrics, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: steps}))
    finally:
        metrics_log.close()
