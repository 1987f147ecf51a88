"""What a NeMo site's Lightning trainer carries from round to round: the seeds' `RestoreState`, on disk as well.

Each FL round is one more `trainer.fit()`, and fit() builds the optimizer and the LR scheduler anew
(NeMo's `configure_optimizers`). The seeds' NeMo example passes NVFlare's `RestoreState` callback,
which copies their state (and the loss scaler's) at the end of a fit and loads it at the start of the
next, so Adam's moments and the schedule go on across rounds. `RoundState` does that for NeMo 2's
trainer (NVFlare's callback is built on the separate `pytorch_lightning` package; NeMo 2 trains on
`lightning.pytorch`) and makes a round that starts from a snapshot on disk (a continuation job's
first round, fedllm.training.lineage) train what the same round of the uninterrupted run trains:

- the schedule spans the job as first submitted: the trainer's max_steps, which NeMo's scheduler reads
  when fit() builds it, is steps per round × the lineage's rounds, and each round stops after its own
  steps (NeMo's CosineAnnealing sized to one round, then restored, would decay to min_lr after it);
- the data position is the lineage's, not the process's: the round tells the data loader where to
  start (`place_data`: p-tuning's sampler epoch, SFT's consumed samples), since Lightning's own
  counters start at 0 in every process and NeMo's SFT loader restarts at sample 0 on every fit();
- the random state is reseeded at each round's first batch from the round's seed (seed·1000 + round).

The end-of-round state stays in memory for the next round, on the CPU (RestoreState keeps a deep copy on
the GPU: one more copy of Adam's moments there), and `save` writes it to the round's snapshot, one file
per rank (a tensor-parallel rank holds its own shard's moments).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedllm.fileio import atomic_path
from fedllm.training.lineage import RoundContext

# (LightningModule, round, epoch of the round): put the module's training data where that epoch starts.
PlaceData = Callable[[Any, int, int], None]


def _to_cpu(value: Any) -> Any:
    """A detached CPU copy of a (nested) state dict: what survives the next fit() rebuilding the optimizer."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value


def scaler_of(trainer: Any) -> Any:
    """The mixed-precision plugin's gradient scaler (fp16 on GPUs), or None (bf16, fp32, CPU)."""
    return getattr(getattr(trainer, "precision_plugin", None), "scaler", None)


def optimizer_steps(state: dict[str, Any]) -> float:
    """Adam's step count in an optimizer state dict (torch's Adam per parameter, apex's FusedAdam per group)."""
    for per_param in state.get("state", {}).values():
        if "step" in per_param:
            return float(per_param["step"])
    for group in state.get("param_groups", []):
        if "step" in group:
            return float(group["step"])
    return float("nan")


def reseed(seed: int) -> None:
    """NeMo's own seeding (Python, NumPy, torch and Megatron's model-parallel RNG tracker around dropout).

    On a CPU the tracker forks the CPU generator and fedllm.training.nemo.cpu_layer seeds it here too;
    it keeps its own stream, so reseeding torch alone would leave dropout on the process's history.
    NeMo wants a positive seed: the round's seed + 1.
    """
    from nemo.collections.nlp.modules.common.megatron import megatron_init

    megatron_init._set_random_seed(seed + 1)


def _round_state_class():
    from lightning.pytorch import Callback  # NeMo 2 trains on Lightning 2

    class RoundState(Callback):
        """See the module docstring; the task calls `start_round` before each round's fit()."""

        def __init__(self, steps_per_round: int, place_data: PlaceData):
            super().__init__()
            self.steps_per_round = steps_per_round
            self.place_data = place_data
            self.round = 0
            self.seed = 0
            self.round_end = 0
            self.saved: dict[str, Any] | None = None  # the state at the end of the last round
            self._epoch = 0  # epochs of this round begun so far
            self._reseeded = False
            self.lr_first = self.lr_last = float("nan")  # the LR of the round's first and last optimizer step

        def start_round(self, trainer: Any, round_: int, seed: int) -> None:
            self.round, self.seed = round_, seed
            self.round_end = trainer.global_step + self.steps_per_round
            self._epoch, self._reseeded = 0, False
            trainer.should_stop = False

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            # After fit() built the optimizer and scheduler, before the first batch is drawn.
            if self.saved is not None:
                trainer.strategy.load_optimizer_state_dict({"optimizer_states": self.saved["optimizers"]})
                for config, state in zip(trainer.lr_scheduler_configs, self.saved["schedulers"], strict=True):
                    config.scheduler.load_state_dict(state)
                scaler = scaler_of(trainer)
                if scaler is not None and self.saved.get("scaler") is not None:
                    scaler.load_state_dict(self.saved["scaler"])
            # Lightning draws a process's first epoch before on_train_epoch_start: place it now.
            self.place_data(pl_module, self.round, 0)

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self.place_data(pl_module, self.round, self._epoch)
            self._epoch += 1

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self.lr_last = float(trainer.optimizers[0].param_groups[0]["lr"])
            if not self._reseeded:
                reseed(self.seed)
                self._reseeded = True
                self.lr_first = self.lr_last

        def on_train_batch_end(self, trainer: Any, *_: Any) -> None:
            if trainer.global_step >= self.round_end:
                trainer.should_stop = True

        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            scaler = scaler_of(trainer)
            self.saved = {
                "optimizers": [_to_cpu(opt.state_dict()) for opt in trainer.optimizers],
                "schedulers": [_to_cpu(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs],
                "scaler": _to_cpu(scaler.state_dict()) if scaler is not None else None,
            }

        def round_metrics(self) -> dict[str, float]:
            """What the round's metrics show of the state: the LR of its first and last step, Adam's step count."""
            steps = optimizer_steps(self.saved["optimizers"][0]) if self.saved else float("nan")
            return {"lr_first_step": self.lr_first, "lr_last_step": self.lr_last, "optimizer_steps": steps}

        def save(self, folder: Path, rank: int) -> None:
            """This rank's part of the state at the end of the round, into the round's snapshot folder."""
            if self.saved is None:
                raise RuntimeError("no round has ended yet: nothing to save")
            with atomic_path(folder / f"rank-{rank}.pt") as temp:
                torch.save(self.saved, temp)

        def load(self, folder: Path, rank: int) -> None:
            """The state a continuation's first round starts from: this rank's part of the snapshot."""
            self.saved = torch.load(folder / f"rank-{rank}.pt", map_location="cpu", weights_only=True)

    return RoundState


def round_state(steps_per_round: int, place_data: PlaceData) -> Any:
    """A RoundState callback (Lightning is imported here, on the site)."""
    return _round_state_class()(steps_per_round, place_data)


def begin_round(trainer: Any, state: Any, context: RoundContext, snapshot: Path | None, rank: int) -> None:
    """What the NeMo tasks' `begin_round` does: a continuation's state from disk, the lineage-wide step budget."""
    if snapshot is not None:
        state.load(snapshot, rank)
    # NeMo's scheduler is sized by trainer.max_steps when fit() builds it: the lineage's steps, whatever round this is.
    trainer.fit_loop.epoch_loop.max_steps = state.steps_per_round * context.total_rounds
