"""A tiny classifier on synthetic data: the smallest job that really trains through the federation.

Each site holds a label-skewed slice of a 3-class problem, so a site alone learns its own
classes and FedAvg learns all of them. It runs the same round loop as every fedllm trainer
(fedllm.training.core). Job template `demo-mlp`:
    fedllm job create demo-mlp --mode fedavg --rounds 5 --out runs/jobs
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedllm.data.io import DataError
from fedllm.fileio import atomic_path
from fedllm.flare.server_models import CLASSES, FEATURES, TinyClassifier
from fedllm.training.core import TrainOutcome, resolve_path, run_site
from fedllm.training.dp import DPSettings, dp_round

# ---- data ---------------------------------------------------------------------------------


def _sample(rng: np.random.Generator, centers: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return (centers[labels] + rng.normal(scale=1.6, size=(len(labels), centers.shape[1]))).astype(np.float32)


def write_demo_data(
    site_dirs: list[Path], val_path: Path | None = None, seed: int = 0, per_site: int = 300
) -> list[Path]:
    """Write train.npz into every site dir and one balanced validation set shared by all; return the files.

    Site i gets mostly class i mod 3 (70%), the rest spread over the other classes: the
    label skew that makes local-only training worse than FedAvg. Every site gets its own
    copy of the validation set (val.npz), as a site sees only its own data directory;
    `val_path`, if given, gets one more copy.
    """
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=2.0, size=(CLASSES, FEATURES))
    for i, site_dir in enumerate(site_dirs):
        major = i % CLASSES
        probs = np.full(CLASSES, 0.3 / (CLASSES - 1))
        probs[major] = 0.7
        y = rng.choice(CLASSES, size=per_site, p=probs)
        _save(site_dir / "train.npz", _sample(rng, centers, y), y)
    y = np.repeat(np.arange(CLASSES), 200)
    vx = _sample(rng, centers, y)
    val_paths = [*([val_path] if val_path else []), *(d / "val.npz" for d in site_dirs)]
    for path in val_paths:
        _save(path, vx, y)
    return [*(d / "train.npz" for d in site_dirs), *val_paths]


def _save(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    with atomic_path(path) as temp, open(temp, "wb") as handle:
        np.savez(handle, x=x, y=y.astype(np.int64))


def load_split(path: Path, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not path.is_file():
        raise DataError(
            f"{what} file {path} not found (the site's data dir is {os.environ.get('FEDLLM_DATA_DIR') or 'unset'}). "
            "Fix: write the demo data into every site's data dir (`fedllm data demo -c <site config>`), "
            "or pass --data/--validation to `fedllm job create`"
        )
    with np.load(path) as data:
        return torch.from_numpy(data["x"]), torch.from_numpy(data["y"])


# ---- training ------------------------------------------------------------------------------


class ClassifierTask:
    """One site's demo training: the `SiteTask` the shared loop drives; the whole model is exchanged."""

    def __init__(self, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], *,
                 lr: float = 0.05, batch_size: int = 32):  # fmt: skip
        (self.x, self.y), (self.vx, self.vy) = train, val
        self.lr, self.batch_size = lr, batch_size
        self.model: TinyClassifier | None = None  # its sizes come with the server's first global model

    def load_exchanged_state(self, state: Mapping[str, Any]) -> None:
        if self.model is None:
            self.model = TinyClassifier.from_state_dict(state)
        else:
            self.model.load_state_dict(state)

    def exchanged_state(self) -> dict[str, torch.Tensor]:
        return dict(self._model().state_dict())

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        model = self._model().eval()
        logits = model(self.vx)
        return {
            "val_loss": nn.functional.cross_entropy(logits, self.vy).item(),
            "val_accuracy": (logits.argmax(1) == self.vy).float().mean().item(),
        }

    def train(self, epochs: int, seed: int) -> TrainOutcome:
        """Plain SGD with momentum, a fresh optimizer per round; the loss is the last epoch's mean."""
        model = self._model().train()
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9)
        gen = torch.Generator().manual_seed(seed)
        steps, last = 0, 0.0
        for _ in range(epochs):
            order = torch.randperm(len(self.x), generator=gen)
            losses = []
            for start in range(0, len(self.x), self.batch_size):
                idx = order[start : start + self.batch_size]
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(self.x[idx]), self.y[idx])
                loss.backward()
                opt.step()
                losses.append(loss.item())
                steps += 1
            last = float(np.mean(losses))
        return TrainOutcome(steps=steps, train_loss=last)

    def train_dp(self, settings: DPSettings, steps: int, seed: int) -> TrainOutcome:
        """The same SGD with DP-SGD (fedllm.training.dp): Poisson batches, per-record clipping, Gaussian noise."""
        model = self._model()
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9)

        def batch_loss(indices: list[int]) -> torch.Tensor:
            return nn.functional.cross_entropy(model(self.x[indices]), self.y[indices])  # mean of per-record losses

        outcome = dp_round(model, opt, batch_loss, num_records=len(self.x), settings=settings, steps=steps)
        return TrainOutcome(steps=outcome.steps, train_loss=outcome.mean_loss)

    def _model(self) -> TinyClassifier:
        if self.model is None:
            raise RuntimeError("no global model loaded yet: the server sends one before every round")
        return self.model


def argument_parser() -> argparse.ArgumentParser:
    """The trainer's arguments (`fedllm job create` checks a job's against them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", default="{data_dir}/train.npz")
    parser.add_argument("--val", default="{data_dir}/val.npz")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dp", default="", help="DP-SGD settings (set by `fedllm job create --dp`)")
    parser.add_argument("--tb-dir", default=None, help="TensorBoard dir (default: tb/ in the job workspace)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = argument_parser().parse_args(argv)

    def build(site: str) -> ClassifierTask:
        train = load_split(resolve_path(args.train, site), "training")
        val = load_split(resolve_path(args.val, site), "validation")
        print(f"[{site}] {len(train[0])} training and {len(val[0])} validation examples")
        return ClassifierTask(train, val, lr=args.lr, batch_size=args.batch_size)

    dp = DPSettings.from_arg(args.dp) if args.dp else None
    run_site(build, epochs=args.epochs, seed=args.seed, tb_dir=args.tb_dir, dp=dp)
